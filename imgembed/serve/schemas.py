"""Response bodies of the HTTP API (pydantic), so the OpenAPI schema documents exactly what is sent."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class ItemError(BaseModel):
    """Why one image of a request was not embedded."""

    kind: Literal["decode", "too_large"] = Field(..., description="decode: not a readable image; too_large: "
                                                 "more pixels than the server's max_pixels.")
    message: str = Field(..., description="The problem, naming the image (index and file name).")


class EmbeddingItem(BaseModel):
    """The result for one image or text, in request order: an embedding or an error, never both."""

    index: int = Field(..., ge=0, description="Position of the image (or text) in the request.")
    embedding: list[float] | None = Field(None, description="float32 values (exact in JSON), length dim.")
    error: ItemError | None = None


class EmbeddingResponse(BaseModel):
    """Answer of ``POST /v1/embeddings`` (200: at least one image, or every text, was embedded)."""

    model: str = Field(..., description="Id of the model that produced the embeddings.")
    tower: Literal["image", "text"] = Field(..., description="The tower that embedded the request's items; text "
                                            "vectors are in the image embedding space.")
    precision: str = Field(..., description="Precision of the engine that ran (the text engine's for texts).")
    dim: int
    normalized: bool = Field(..., description="True if the vectors are L2-normalised by the model.")
    data: list[EmbeddingItem]
    embedded: int = Field(..., ge=0, description="Images (or texts) embedded.")
    failed: int = Field(..., ge=0, description="Images that could not be embedded (see their error); 0 for texts.")


class ErrorResponse(BaseModel):
    """Body of every error answer."""

    error: str = Field(..., description="Machine-readable kind: bad_request, no_text_tower, decode, unknown_model, "
                       "too_large, unsupported_media_type, queue_full, unavailable, timeout, internal.")
    message: str = Field(..., description="What was wrong, naming the bad value and the limit or valid choices.")
    models: list[str] | None = Field(None, description="Served model ids (for unknown_model / missing model).")


class SpaceInfo(BaseModel):
    """The image-text embedding space of a model with a text tower (the artifact manifest's ``space``)."""

    dim: int
    normalized: bool
    scores: Literal["softmax", "sigmoid"] = Field(..., description="How image-text logits become probabilities: "
                                                  "softmax over labels (CLIP) or a sigmoid per label (SigLIP).")
    logit_scale: float | None = Field(None, description="logits = logit_scale * cosine (+ logit_bias).")
    logit_bias: float | None = None


class TextTowerInfo(BaseModel):
    """The text tower of a model: what a text may be and which engine embeds it."""

    max_length: int = Field(..., description="Tokens per text (special tokens included); longer texts are "
                            "truncated.")
    precision: str | None = None
    backend: str = Field(..., description="Backend running the text tower.")
    engine: str | None = Field(None, description="The artifact's text engine that runs.")


class ModelInfo(BaseModel):
    id: str
    aliases: list[str]
    name: str = Field(..., description="Registry name recorded in the artifact's manifest.")
    precision: str
    dim: int
    normalized: bool
    input_size: list[int] = Field(..., description="[height, width] the images are preprocessed to.")
    backend: str = Field(..., description="Backend running the model (onnxruntime, openvino, ...).")
    engine: str | None = Field(None, description="The artifact engine that runs (manifest engine id).")
    batch_invariant: bool = Field(..., description="Whether a vector is independent of its batch-mates.")
    towers: list[Literal["image", "text"]] = Field(..., description="What the model embeds: images, and texts "
                                                   "when its artifact was exported with --text.")
    space: SpaceInfo | None = Field(None, description="The shared image-text space (models with a text tower).")
    text: TextTowerInfo | None = Field(None, description="The text tower (models with one).")


class ModelList(BaseModel):
    models: list[ModelInfo]


class Health(BaseModel):
    status: Literal["ok"]


class Readiness(BaseModel):
    ready: bool
    status: Literal["ready", "warming_up", "draining", "failed"]
    models: dict[str, bool] = Field(..., description="Model id -> warmed up.")
    message: str | None = None
