"""The artifact format, version 2: the typed contract between export and every reader of an artifact.

An artifact directory holds ``manifest.json`` (a :class:`Manifest`) and the files it lists with their sha256.
Export builds these objects and writes them with :meth:`Manifest.to_json`; ``load``, ``serve``, ``bench``,
``parity``, jobs and Ray read them through :func:`imgembed.artifact.read_manifest`, which migrates older
formats in memory (:mod:`.migrate`) and validates the result here. No other module reads manifest keys.

Rules every reader relies on (the JSON Schema ``docs/artifact-format-2.schema.json`` is generated from these
types by :func:`json_schema`; ``docs/artifact-format.md`` describes them for readers in other languages):

* Unknown keys are errors (``extra="forbid"``): a format change that adds a field bumps ``format_version``.
* Every path (engine files, the tokenizer) is a relative POSIX path that must also appear in ``files`` with its
  sha256; the resolver (:mod:`.files`) enforces the rest (inside the directory, regular file, size cap).
* ``default_engine`` names one of ``engines``; engine ids are unique; the text tower's the same way.
"""
from __future__ import annotations

import json
from collections import Counter
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

FORMAT_VERSION = 2
MANIFEST = "manifest.json"

Precision = Literal["fp32", "bf16", "fp16", "int8"]
Device = Literal["cpu", "cuda"]
Status = Literal["passed", "failed"]
Tower = Literal["image", "text"]
Id = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._+@-]{0,199}$")]
SHA256_PATTERN = r"^[0-9a-f]{64}$"
Sha256 = Annotated[str, StringConstraints(pattern=SHA256_PATTERN)]
RelPath = Annotated[str, StringConstraints(min_length=1, max_length=1024)]  # the resolver judges the rest
Name = Annotated[str, StringConstraints(min_length=1, max_length=200)]
Count = Annotated[int, Field(ge=0, le=1 << 62)]
Metrics = dict[str, float]   # min_cosine, mean_cosine, knn_agreement, max_abs, batch_variation ...
Record = dict[str, Any]      # free-form records whose keys depend on the recipe (quantization, op counts ...)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, validate_assignment=True, strict=True)


class Host(_Model):
    """The CPU an export ran on (``imgembed.runtime.host.cpu_summary``)."""

    model: str
    arch: str
    flags: list[str]


class GpuTarget(_Model):
    """What a TensorRT plan was built for: a plan runs only on the same GPU model, compute capability and
    TensorRT version, within its batch profile."""

    key: str
    gpu: Record                 # name, compute_capability, memory ...
    tensorrt: str
    profile: dict[str, int]     # min, opt, max batch
    build: Record | None = None
    created: str | None = None


class Engine(_Model):
    """One engine of an artifact: a backend, a precision and the files it runs. Every engine — ONNX Runtime,
    OpenVINO, TensorRT, image or text tower — is one of these, in one list per tower."""

    id: Id
    backend: Name
    precision: Precision
    inference_precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    device: Device = "cpu"
    batch_invariant: bool = False
    needs_vnni: bool = False    # 8-bit int8 engine gated with VNNI kernels: sums saturate on x86 CPUs without VNNI
    files: dict[Name, RelPath]  # role ("model", "weights", "plan") -> path in the artifact
    quantization: Record | None = None
    img_per_s: float | None = None
    parity: Metrics | None = None
    target: GpuTarget | None = None   # TensorRT: the GPU and TensorRT version the plan was built for


class Candidate(_Model):
    """One row of an export's engine race: what was tried, whether it passed the gate, and why not."""

    id: Id
    backend: Name
    precision: Precision
    inference_precision: str = "fp32"
    batch_invariant: bool = False
    portable: bool = False
    needs_vnni: bool = False
    passed: bool
    why_not: str | None = None
    metrics: Metrics | None = None
    img_per_s: float | None = None


class Selection(_Model):
    """How the default engine was chosen: the host, the timing setup and every candidate."""

    cpu: Host | None = None
    threads: int | None = None
    batch_size: int | None = None
    forced_backend: str | None = None
    candidates: list[Candidate] = []


class ParityRecord(_Model):
    """A parity gate's verdict (:class:`imgembed.gate.parity.ParityReport` in JSON form)."""

    precision: Precision
    passed: bool
    failures: list[str]
    thresholds: Metrics
    metrics: Metrics
    by_batch_size: dict[str, Metrics]
    images: list[str]
    knn_k: int = 5
    engine: str | None = None


class RandomInitSource(_Model):
    kind: Literal["random-init"]
    seed: int
    arch: Record


class LocalSource(_Model):
    kind: Literal["local"]
    path: str


class HubSource(_Model):
    kind: Literal["hub"]
    repo: str
    revision: str | None = None


class ModuleWeights(_Model):
    path: str
    sha256: Sha256


class ModuleSource(_Model):
    """A user's own ``torch.nn.Module``. ``factory`` is a record, never imported from the manifest: re-checks
    rebuild the original from the factory the user names (``--module``)."""

    kind: Literal["module"]
    factory: str | None = None
    class_: str = Field(alias="class")
    seed: int
    weights: ModuleWeights | None = None
    state_sha256: str


Source = Annotated[Union[RandomInitSource, LocalSource, HubSource, ModuleSource], Field(discriminator="kind")]


class Preprocess(_Model):
    """The preprocessing the engines expect (``imgembed.preprocess.PreprocessSpec``)."""

    processor: Name
    size: dict[str, int]
    resample: str
    crop_size: dict[str, int] | None = None
    crop_pct: float | None = None
    image_mean: list[float]
    image_std: list[float]
    rescale_factor: float = 1 / 255


class PreprocessSource(_Model):
    """Where the preprocessing came from (the registry, or the checkpoint's ``preprocessor_config.json``)."""

    model_config = ConfigDict(extra="allow")
    source: str


class Input(_Model):
    name: Name
    dtype: Literal["float32", "uint8", "int64"]
    shape: list[int | None] | None = None
    layout: str
    values: str | None = None


class Output(_Model):
    name: Name = "embedding"
    dim: Annotated[int, Field(ge=1, le=1 << 20)]
    normalized: bool
    dtype: Literal["float32"] = "float32"


class Stage(_Model):
    """One stage of an export (loading, ONNX export, building or gating one candidate...) and its wall time."""

    name: Annotated[str, StringConstraints(max_length=2000)]
    seconds: Annotated[float, Field(ge=0)]


class ExportRecord(_Model):
    """How the graphs were made: graph surgery and fusions, the winner's quantization, op counts, time (in all
    and per stage), size."""

    optimizations: list[str] = []
    fused_ops: dict[str, int] = {}
    quantization: Record | None = None
    op_counts: dict[str, int] = {}
    seconds: float | None = None
    stages: list[Stage] = []
    model_bytes: Count | None = None


class Tokenizer(_Model):
    """The text tower's tokenizer: a ``tokenizer.json`` in the artifact, and how texts are padded."""

    model_config = ConfigDict(extra="allow")
    file: RelPath
    max_length: Annotated[int, Field(ge=1, le=1 << 20)]
    padding: str
    pad_id: int
    padding_side: Literal["left", "right"] = "right"
    class_: str | None = Field(default=None, alias="class")


class TextTower(_Model):
    """The text tower of a CLIP / SigLIP artifact: its engines, race, gate and tokenizer."""

    status: Status
    dim: Annotated[int, Field(ge=1, le=1 << 20)]
    input: Input
    tokenizer: Tokenizer
    tokenizer_check: Record | None = None
    source: Record | None = None
    reference: str | None = None
    default_engine: Id
    batch_invariant: bool = False
    selection: Selection | None = None
    quantization: Record | None = None
    parity: ParityRecord | None = None
    engines: Annotated[list[Engine], Field(min_length=1)]

    @model_validator(mode="after")
    def _default_is_held(self) -> "TextTower":
        _check_engines(self.engines, self.default_engine, "text.")
        return self

    def engine(self, engine_id: str) -> Engine:
        return _engine(self.engines, engine_id)


class Space(_Model):
    """The shared image-text embedding space: how similarities become scores."""

    dim: int
    normalized: bool
    scores: Literal["softmax", "sigmoid"]
    logit_scale: float
    logit_bias: float | None = None


class Manifest(_Model):
    """``manifest.json`` of an artifact, format 2. Image-tower fields sit at the top level; the text tower, when
    exported, under ``text``."""

    format_version: Literal[2] = FORMAT_VERSION
    status: Status
    name: Name
    model: Record                       # the registry entry (imgembed.models.registry.ModelSpec.to_dict)
    source: Source
    precision: Precision
    opset: int | None = None
    input: Input
    output: Output
    preprocess: Preprocess
    preprocess_source: PreprocessSource | None = None
    default_engine: Id
    batch_invariant: bool = False
    engines: Annotated[list[Engine], Field(min_length=1)]
    selection: Selection | None = None
    export: ExportRecord = ExportRecord()
    parity: ParityRecord | None = None
    towers: list[Tower] = ["image"]
    text: TextTower | None = None
    space: Space | None = None
    warnings: list[str] = []
    versions: dict[str, str | None] = {}
    created: str | None = None
    files: dict[RelPath, Sha256] = {}

    @model_validator(mode="after")
    def _consistent(self) -> "Manifest":
        _check_engines(self.engines, self.default_engine, "")
        if ("text" in self.towers) != (self.text is not None):
            raise ValueError(f"'towers' {self.towers} and the 'text' section disagree")
        return self

    # ---- typed accessors readers use
    def engine(self, engine_id: str) -> Engine:
        return _engine(self.engines, engine_id)

    def preprocess_spec(self):
        """The :class:`~imgembed.preprocess.PreprocessSpec` of the image tower."""
        from imgembed.preprocess import PreprocessSpec

        return PreprocessSpec.from_dict(self.preprocess.model_dump())

    def model_spec(self):
        """The registry entry of the model (:class:`~imgembed.models.registry.ModelSpec`)."""
        from imgembed.models.registry import ModelSpec

        return ModelSpec.from_dict(self.name, self.model)

    def source_record(self) -> dict[str, Any]:
        """``source`` as the plain mapping the original loaders take."""
        return self.source.model_dump(by_alias=True)

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json", by_alias=True), indent=2) + "\n"


def _check_engines(engines: list[Engine], default: str, where: str) -> None:
    ids = [e.id for e in engines]
    dupes = sorted(i for i, n in Counter(ids).items() if n > 1)   # linear: a manifest may list many engines
    if dupes:
        raise ValueError(f"{where}engines: duplicate engine ids {dupes}")
    if default not in ids:
        raise ValueError(f"{where}default_engine {default!r} is not one of the engines {ids}")


def _engine(engines: list[Engine], engine_id: str) -> Engine:
    for e in engines:
        if e.id == engine_id:
            return e
    raise KeyError(engine_id)


def json_schema() -> dict[str, Any]:
    """The JSON Schema of format 2, generated from :class:`Manifest` (published as
    ``docs/artifact-format-2.schema.json``; ``tests/test_artifact_schema.py`` keeps the file current)."""
    schema = Manifest.model_json_schema(by_alias=True, mode="validation")
    return {"$schema": "https://json-schema.org/draft/2020-12/schema",
            "$id": "https://imgembed.dev/schemas/artifact-format-2.schema.json",
            "title": "imgembed artifact manifest, format 2", **schema}
