"""The model registry: ``models.yaml`` validated into frozen dataclasses.

``get_spec("clip-vit-b32")`` returns a :class:`ModelSpec`; an unknown name raises
:class:`~imgembed.errors.UnknownModelError` listing close matches. Extra registry files can be layered on
top with the ``IMGEMBED_MODELS`` environment variable (``os.pathsep``-separated YAML paths), so users add
variants without touching the package.
"""
from __future__ import annotations

import difflib
import functools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from imgembed.errors import RegistryError, UnknownModelError
from imgembed.models.families import FAMILIES
from imgembed.preprocess import PreprocessSpec

POOLINGS = ("none", "cls", "mean", "gap")
PRECISIONS = ("fp32", "bf16", "fp16", "int8")

# Default parity thresholds (docs/export.md, "What an export does", step 4: the parity gate). A registry entry
# may override any of them.
DEFAULT_PARITY: dict[str, dict[str, float]] = {
    "fp32": {"min_cosine": 0.99999},
    "bf16": {"min_cosine": 0.9999},
    "fp16": {"min_cosine": 0.999},
    "int8": {"mean_cosine": 0.995, "min_cosine": 0.99, "knn_agreement": 0.9},
}
PARITY_METRICS = ("min_cosine", "mean_cosine", "knn_agreement", "max_abs", "batch_variation")


def _registry_paths() -> list[Path]:
    """The packaged registry (inside the wheel) or the repo-root one (editable install), then user files."""
    package = Path(__file__).resolve().parents[1]   # imgembed/
    packaged = package / "models.yaml"
    paths = [packaged if packaged.exists() else package.parent / "models.yaml"]
    extra = os.environ.get("IMGEMBED_MODELS", "")
    paths += [Path(p) for p in extra.split(os.pathsep) if p]
    return paths


def _require(d: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in d:
        raise RegistryError(f"{where}: missing required key {key!r}")
    return d[key]


def _check_keys(d: Mapping[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(d) - allowed)
    if unknown:
        raise RegistryError(f"{where}: unknown key(s) {unknown}; expected some of {sorted(allowed)}")


@dataclass(frozen=True)
class Source:
    """Where real weights come from: a Hugging Face hub repo at a revision."""

    hub: str
    revision: str = "main"


@dataclass(frozen=True)
class EmbeddingSpec:
    """Which model output is the embedding, how it is pooled and whether it is L2-normalised."""

    output: str
    pooling: str
    normalize: bool
    dim: int

    def __post_init__(self) -> None:
        if self.pooling not in POOLINGS:
            raise RegistryError(f"embedding.pooling {self.pooling!r} is not one of {list(POOLINGS)}")
        if not isinstance(self.dim, int) or self.dim <= 0:
            raise RegistryError(f"embedding.dim must be a positive integer, got {self.dim!r}")
        if not isinstance(self.normalize, bool):
            raise RegistryError(f"embedding.normalize must be true or false, got {self.normalize!r}")


TEXT_PADDING = ("longest", "max_length")


@dataclass(frozen=True)
class TextSpec:
    """The text tower of an image-text family (CLIP, SigLIP), in the image embedding space.

    ``padding``: "longest" pads each batch to its longest caption (CLIP: causal attention, pooled at the end
    token, so padding never changes a vector); "max_length" always pads to ``max_length`` (SigLIP pools the
    last position and was trained on padded captions).
    """

    arch: Mapping[str, Any]
    max_length: int
    padding: str
    dim: int

    def __post_init__(self) -> None:
        if self.padding not in TEXT_PADDING:
            raise RegistryError(f"text.padding {self.padding!r} is not one of {list(TEXT_PADDING)}")
        for key in ("max_length", "dim"):
            value = getattr(self, key)
            if not isinstance(value, int) or value <= 0:
                raise RegistryError(f"text.{key} must be a positive integer, got {value!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"arch": dict(self.arch), "max_length": self.max_length, "padding": self.padding, "dim": self.dim}


@dataclass(frozen=True)
class ModelSpec:
    """One registry entry. Frozen: pass it around freely."""

    name: str
    family: str
    description: str
    source: Source | None
    arch: Mapping[str, Any]
    embedding: EmbeddingSpec
    preprocess: PreprocessSpec
    parity: Mapping[str, Mapping[str, float]]
    gflops: float | None = None
    tags: tuple[str, ...] = field(default_factory=tuple)
    text: TextSpec | None = None

    @property
    def input_hw(self) -> tuple[int, int]:
        return self.preprocess.output_hw

    @property
    def is_test(self) -> bool:
        return "test" in self.tags

    def thresholds(self, precision: str) -> dict[str, float]:
        if precision not in PRECISIONS:
            raise RegistryError(f"unknown precision {precision!r}; expected one of {list(PRECISIONS)}")
        return dict(self.parity.get(precision, DEFAULT_PARITY[precision]))

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form, recorded in artifact manifests."""
        return {
            "name": self.name,
            "family": self.family,
            "description": self.description,
            "source": None if self.source is None else {"hub": self.source.hub, "revision": self.source.revision},
            "arch": dict(self.arch),
            "embedding": {"output": self.embedding.output, "pooling": self.embedding.pooling,
                          "normalize": self.embedding.normalize, "dim": self.embedding.dim},
            "preprocess": self.preprocess.to_dict(),
            "parity": {k: dict(v) for k, v in self.parity.items()},
            "gflops": self.gflops,
            "tags": list(self.tags),
            "text": None if self.text is None else self.text.to_dict(),
        }

    @classmethod
    def from_dict(cls, name: str, d: Mapping[str, Any]) -> "ModelSpec":
        return _parse_entry(name, d)


_ENTRY_KEYS = {"family", "description", "source", "arch", "embedding", "preprocess", "parity", "gflops", "tags",
               "name", "text"}


def _parse_text(raw: Any, family: str, embedding: EmbeddingSpec, where: str) -> TextSpec | None:
    if raw is None:
        return None
    if FAMILIES[family].text is None:
        raise RegistryError(f"{where}.text: family {family!r} has no text tower (image-text families: "
                            f"{[f for f, rec in FAMILIES.items() if rec.text is not None]})")
    if not isinstance(raw, Mapping):
        raise RegistryError(f"{where}.text must be a mapping with arch, max_length, padding, dim")
    _check_keys(raw, {"arch", "max_length", "padding", "dim"}, f"{where}.text")
    try:
        text = TextSpec(arch=dict(_require(raw, "arch", f"{where}.text")),
                        max_length=_require(raw, "max_length", f"{where}.text"),
                        padding=str(raw.get("padding", "longest")), dim=_require(raw, "dim", f"{where}.text"))
    except RegistryError as e:
        raise RegistryError(f"{where}: {e}") from None
    if text.dim != embedding.dim:
        raise RegistryError(f"{where}.text.dim {text.dim} differs from embedding.dim {embedding.dim}: both towers "
                            "must share one embedding space")
    return text


def _parse_parity(raw: Any, where: str) -> dict[str, dict[str, float]]:
    parity = {k: dict(v) for k, v in DEFAULT_PARITY.items()}
    if raw is None:
        return parity
    if not isinstance(raw, Mapping):
        raise RegistryError(f"{where}.parity must be a mapping of precision -> thresholds")
    for precision, metrics in raw.items():
        if precision not in PRECISIONS:
            raise RegistryError(f"{where}.parity: unknown precision {precision!r}; expected {list(PRECISIONS)}")
        _check_keys(metrics, set(PARITY_METRICS), f"{where}.parity.{precision}")
        parity[precision].update({k: float(v) for k, v in metrics.items()})
    return parity


def _parse_entry(name: str, d: Mapping[str, Any]) -> ModelSpec:
    where = f"model {name!r}"
    if not isinstance(d, Mapping):
        raise RegistryError(f"{where}: entry must be a mapping, got {type(d).__name__}")
    _check_keys(d, _ENTRY_KEYS, where)
    family = _require(d, "family", where)
    if family not in FAMILIES:
        raise RegistryError(f"{where}: family {family!r} is not one of {list(FAMILIES)}")
    src = d.get("source")
    if src is not None:
        if not isinstance(src, Mapping) or "hub" not in src:
            raise RegistryError(f"{where}.source must be null or a mapping with 'hub' (and optional 'revision')")
        _check_keys(src, {"hub", "revision"}, f"{where}.source")
        src = Source(hub=str(src["hub"]), revision=str(src.get("revision", "main")))
    emb = _require(d, "embedding", where)
    _check_keys(emb, {"output", "pooling", "normalize", "dim"}, f"{where}.embedding")
    try:
        embedding = EmbeddingSpec(**{k: _require(emb, k, f"{where}.embedding")
                                     for k in ("output", "pooling", "normalize", "dim")})
        preprocess = PreprocessSpec.from_dict(_require(d, "preprocess", where))
    except RegistryError as e:
        raise RegistryError(f"{where}: {e}") from None
    gflops = d.get("gflops")
    return ModelSpec(
        name=name,
        family=family,
        description=str(d.get("description", "")),
        source=src,
        arch=dict(_require(d, "arch", where)),
        embedding=embedding,
        preprocess=preprocess,
        parity=_parse_parity(d.get("parity"), where),
        gflops=None if gflops is None else float(gflops),
        tags=tuple(d.get("tags") or ()),
        text=_parse_text(d.get("text"), family, embedding, where),
    )


def parse_registry(text: str, origin: str) -> dict[str, ModelSpec]:
    """Parse one registry YAML document (``origin`` names it in errors)."""
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise RegistryError(f"{origin}: not valid YAML: {e}") from None
    if not isinstance(doc, Mapping) or not isinstance(doc.get("models"), Mapping):
        raise RegistryError(f"{origin}: expected a top-level 'models:' mapping")
    specs = {str(n): _parse_entry(str(n), e) for n, e in doc["models"].items()}
    for spec in specs.values():
        if not FAMILIES[spec.family].in_registry:
            raise RegistryError(f"{origin}: model {spec.name!r}: family {spec.family!r} is for your own "
                                "torch modules (imgembed.export_module, `imgembed export --module`), not registry "
                                f"entries; expected one of {[f for f, r in FAMILIES.items() if r.in_registry]}")
    return specs


@functools.lru_cache(maxsize=None)
def _load(paths: tuple[Path, ...]) -> dict[str, ModelSpec]:
    specs: dict[str, ModelSpec] = {}
    for p in paths:
        try:
            text = p.read_text(encoding="utf-8")
        except OSError as e:
            raise RegistryError(f"cannot read registry file {p}: {e.strerror or e}") from None
        specs.update(parse_registry(text, str(p)))
    return specs


def registry() -> dict[str, ModelSpec]:
    """All registered models, by name (packaged registry plus ``IMGEMBED_MODELS`` files)."""
    return dict(_load(tuple(_registry_paths())))


def list_models(include_test: bool = False) -> list[ModelSpec]:
    return [s for s in registry().values() if include_test or not s.is_test]


def get_spec(name: str) -> ModelSpec:
    """Look a model up by name; unknown names raise UnknownModelError with close matches."""
    specs = registry()
    if name in specs:
        return specs[name]
    close = difflib.get_close_matches(name, list(specs), n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
    known = ", ".join(s.name for s in specs.values() if not s.is_test)
    raise UnknownModelError(f"unknown model {name!r}.{hint} Known models: {known}")
