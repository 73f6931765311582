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
    """The result for one image, in request order: an embedding or an error, never both."""

    index: int = Field(..., ge=0, description="Position of the image in the request.")
    embedding: list[float] | None = Field(None, description="float32 values (exact in JSON), length dim.")
    error: ItemError | None = None


class EmbeddingResponse(BaseModel):
    """Answer of ``POST /v1/embeddings`` (200: at least one image was embedded)."""

    model: str = Field(..., description="Id of the model that produced the embeddings.")
    precision: str
    dim: int
    normalized: bool = Field(..., description="True if the vectors are L2-normalised by the model.")
    data: list[EmbeddingItem]
    embedded: int = Field(..., ge=0, description="Images embedded.")
    failed: int = Field(..., ge=0, description="Images that could not be embedded (see their error).")


class ErrorResponse(BaseModel):
    """Body of every error answer."""

    error: str = Field(..., description="Machine-readable kind: bad_request, decode, unknown_model, too_large, "
                       "unsupported_media_type, queue_full, unavailable, timeout, internal.")
    message: str = Field(..., description="What was wrong, naming the bad value and the limit or valid choices.")
    models: list[str] | None = Field(None, description="Served model ids (for unknown_model / missing model).")


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


class ModelList(BaseModel):
    models: list[ModelInfo]


class Health(BaseModel):
    status: Literal["ok"]


class Readiness(BaseModel):
    ready: bool
    status: Literal["ready", "warming_up", "draining", "failed"]
    models: dict[str, bool] = Field(..., description="Model id -> warmed up.")
    message: str | None = None
