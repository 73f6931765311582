"""What to benchmark: registry names or artifact directories, resolved into :class:`BenchModel` records.

A :class:`BenchModel` is one original model (spec + how to rebuild its PyTorch original) and the artifacts
exported from it. A registry name exports artifacts at the requested precisions (FP32 by default) through
:func:`ensure_artifact`, cached by name, precision and weight source; artifact directories are verified and
grouped by the original they came from, which is rebuilt from the manifest's ``source`` record.
:func:`ensure_artifact` is also what the pytest-benchmark suites in ``benchmarks/`` use.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

from imgembed.artifact import ArtifactFiles, Engine, Manifest, read_manifest, verify
from imgembed.errors import ArtifactError, ParityError, UnknownModelError
from imgembed.models.registry import ModelSpec, get_spec, registry

Step = Callable[[str], None]
CACHE_ENV = "IMGEMBED_BENCH_CACHE"
ARTIFACT_PRECISIONS = ("fp32", "bf16", "int8")


@dataclass(frozen=True)
class ArtifactRef:
    """One exported artifact to benchmark."""

    path: Path
    precision: str
    status: str          # the manifest's parity status: "passed" | "failed"
    engines: tuple = field(default=(), compare=False)  # manifest engine records; () = one ONNX Runtime engine
    checksums: tuple = field(default=(), compare=False)  # the manifest's ``files``: (path, sha256) pairs

    def files(self) -> ArtifactFiles:
        """The artifact's resolver: engines read their verified bytes through it."""
        return ArtifactFiles(self.path, dict(self.checksums) or read_manifest(self.path).files)

    def engine_records(self) -> list[Engine]:
        if self.engines:
            return list(self.engines)
        return [Engine(id="onnxruntime", backend="onnxruntime", precision=self.precision,
                       files={"model": "model.onnx"})]

    @classmethod
    def from_manifest(cls, path: Path, manifest: Manifest) -> "ArtifactRef":
        from imgembed.runtime.backends import engines_of

        return cls(path, manifest.precision, manifest.status, tuple(engines_of(manifest)),
                   tuple(sorted(manifest.files.items())))


@dataclass
class BenchModel:
    """One original model and the artifacts made from it."""

    spec: ModelSpec
    source: dict                       # manifest-style source record (families.source_record)
    artifacts: list[ArtifactRef] = field(default_factory=list)
    weights_override: Path | None = None
    module: str | None = None              # a module artifact's factory, as the user named it
    trust_manifest_factory: bool = False   # or the recorded one, on this explicit opt-in

    @property
    def key(self) -> str:
        return f"{self.spec.name}@{source_tag(self.source)}"

    def check_original(self) -> None:
        """Raise the ArtifactError :meth:`build_original` would, before anything runs: a module artifact's
        original needs a factory the user named (or the explicit opt-in)."""
        if self.source.get("kind") == "module":
            from imgembed.models.user_module import require_factory_choice

            require_factory_choice(f"module artifact {self.spec.name!r}", self.source, self.module,
                                   self.trust_manifest_factory)

    def build_original(self, attn: str = "sdpa"):
        """The PyTorch original (an EmbeddingHead), rebuilt from the source record."""
        from imgembed.models.families import original_from_source

        return original_from_source(self.spec, self.source, self.weights_override, attn=attn, module=self.module,
                                    trust_manifest_factory=self.trust_manifest_factory)


def source_tag(source: dict) -> str:
    """A short, file-name-safe tag for a source record: random-s0, hub-main, local-1a2b3c4d5e, module-0f1e2d3c4b."""
    kind = source.get("kind")
    if kind == "random-init":
        return f"random-s{source['seed']}"
    if kind == "hub":
        return f"hub-{source.get('revision', 'main')}".replace("/", "_")
    if kind == "local":
        return "local-" + hashlib.sha1(str(source["path"]).encode()).hexdigest()[:10]
    if kind == "module":  # the module's state identifies it (factory, seed and weights file alike)
        return "module-" + str(source.get("state_sha256", ""))[:10]
    raise ArtifactError(f"unknown source kind {kind!r} in {source}; expected random-init, hub, local or module")


def default_cache_dir() -> Path:
    """``$IMGEMBED_BENCH_CACHE`` or ``~/.cache/imgembed/bench``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "imgembed" / "bench"


def _normalized(x) -> object:
    return json.loads(json.dumps(x))


def _cached(out: Path, spec: ModelSpec, precision: str, source: dict, input_format: str = "float32") -> bool:
    """Is ``out`` a verified, passing artifact of exactly this model, precision, source and input format?"""
    try:
        m = verify(out)
    except ArtifactError:
        return False
    return (m.status == "passed" and m.precision == precision and m.input.dtype == input_format
            and _normalized(m.model) == _normalized(spec.to_dict())
            and _normalized(m.source_record()) == _normalized(source))


def ensure_artifact(spec: ModelSpec | str, precision: str, source: dict, cache_dir: str | Path | None = None, *,
                    threads: int | None = None, step: Step = lambda s: None, input_format: str = "float32") -> Path:
    """The cached artifact of ``spec`` at ``precision`` from ``source``; exported (and parity-gated) if absent.

    ``source`` is a source record (``families.source_record``): random-init with a seed, local or hub.
    ``input_format="uint8"``: the uint8 NHWC input variant (cached under a ``-uint8`` suffix). Every engine
    that passes the gate is kept (``keep_candidates``), so a benchmark covers each installed engine.
    """
    from imgembed.export.pipeline import ExportOptions, export_model

    spec = get_spec(spec) if isinstance(spec, str) else spec
    if precision not in ARTIFACT_PRECISIONS:
        raise ArtifactError(f"cannot export {spec.name} at precision {precision!r}; "
                            f"expected one of {list(ARTIFACT_PRECISIONS)}")
    suffix = "" if input_format == "float32" else f"-{input_format}"
    out = Path(cache_dir or default_cache_dir()) / f"{spec.name}-{precision}-{source_tag(source)}{suffix}"
    if _cached(out, spec, precision, source, input_format):
        step(f"using cached {out}")
        return out
    kind = source["kind"]
    opts = ExportOptions(precision=precision, random_init=kind == "random-init", seed=int(source.get("seed", 0)),
                         weights=source["path"] if kind == "local" else None, threads=threads,
                         input_format=input_format, keep_candidates=True)
    export_model(spec, out, opts, step=step)
    return out


def model_from_registry(name: str, *, precisions: Sequence[str] = ("fp32",), random_init: bool,
                        weights: Path | None, seed: int = 0,
                        cache_dir: Path | None = None, threads: int | None = None, step: Step = lambda s: None,
                        notes: list[str] | None = None) -> BenchModel:
    """A registry model with its artifacts at ``precisions``, exported into the cache when needed.

    An export that fails its parity gate is left out with a line in ``notes`` (the original and the other
    precision are still benchmarked); without ``notes`` the ParityError propagates.
    """
    from imgembed.models.families import source_record

    spec = get_spec(name)
    source = source_record(spec, weights, random_init, seed)
    model = BenchModel(spec, source)
    for precision in precisions:
        step(f"{name}: {precision} artifact")
        try:
            path = ensure_artifact(spec, precision, source, cache_dir, threads=threads, step=step)
        except ParityError as e:
            if notes is None:
                raise
            notes.append(f"{name} {precision}: export failed its parity gate, not benchmarked: "
                         f"{str(e).splitlines()[0]}")
            continue
        model.artifacts.append(ArtifactRef.from_manifest(path, read_manifest(path)))
    return model


def add_artifact_dir(models: dict[str, BenchModel], path: Path, weights: Path | None, module: str | None = None,
                     trust_manifest_factory: bool = False) -> None:
    """Verify the artifact at ``path`` and add it to the BenchModel of its original (created if new); a module
    artifact's original comes from ``module`` or, with ``trust_manifest_factory``, the recorded factory."""
    manifest = verify(path, read_manifest(path))
    spec = manifest.model_spec()
    model = BenchModel(spec, manifest.source_record(), weights_override=weights, module=module,
                       trust_manifest_factory=trust_manifest_factory)
    model = models.setdefault(model.key, model)
    ref = ArtifactRef.from_manifest(path, manifest)
    if ref not in model.artifacts:
        model.artifacts.append(ref)


def resolve_targets(items: Iterable[str], *, precisions: Sequence[str] = ("fp32",), random_init: bool = False,
                    weights: Path | None = None, cache_dir: Path | None = None, threads: int | None = None,
                    step: Step = lambda s: None, notes: list[str] | None = None, module: str | None = None,
                    trust_manifest_factory: bool = False) -> list[BenchModel]:
    """Registry names and artifact directories -> BenchModels, in the order first mentioned.

    ``notes`` collects exports left out after failing their parity gate (see :func:`model_from_registry`).
    ``module`` / ``trust_manifest_factory``: where module artifacts' originals come from (see
    :func:`imgembed.models.user_module.original_from_record`).
    """
    models: dict[str, BenchModel] = {}
    for item in items:
        path = Path(item)
        if path.is_dir():
            add_artifact_dir(models, path, weights, module, trust_manifest_factory)
        elif item in registry():
            m = model_from_registry(item, precisions=precisions, random_init=random_init, weights=weights,
                                    cache_dir=cache_dir, threads=threads, step=step, notes=notes)
            known = models.setdefault(m.key, m)
            known.artifacts += [a for a in m.artifacts if a not in known.artifacts]
        elif path.exists() or os.sep in item:
            raise ArtifactError(f"{item} is not an artifact directory (expected a directory with manifest.json)"
                                if path.exists() else f"artifact directory {item} does not exist")
        else:
            get_spec(item)  # raises UnknownModelError naming close matches
            raise UnknownModelError(item)  # pragma: no cover
    if not models:
        raise ArtifactError("nothing to benchmark: give registry names or artifact directories")
    return list(models.values())
