"""Where a model's preprocessing comes from: the checkpoint's ``preprocessor_config.json``, else the registry.

A checkpoint (a ``save_pretrained`` directory or a hub repo) owns its preprocessing: when it ships a
``preprocessor_config.json``, :func:`resolve_preprocess` reads it with
:meth:`~imgembed.preprocess.PreprocessSpec.from_hf_config` (slow and ``*Fast`` processor names alike; imgembed
runs the slow processors' semantics, see docs/export.md) and the registry's ``preprocess`` is only the default
for checkpoints without one, and for ``random_init``. Where the processor config has no ``size``, the input
size comes from the checkpoint's ``config.json`` (``image_size``, for families whose ``image_size`` is the
input size), as the model would otherwise refuse the processor's class default.

Export, :func:`imgembed.runtime.embedder.load_original` and the parity re-check all call
:func:`resolve_preprocess`; its record goes into the manifest as ``preprocess_source``.
"""
from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imgembed.errors import CheckpointPreprocessError, RegistryError, WeightsError
from imgembed.models.families import family_of
from imgembed.preprocess import PreprocessSpec
from imgembed.preprocess.processors import CROP_NONE, CROP_SIZE, processor

if TYPE_CHECKING:
    from imgembed.models.registry import ModelSpec

PREPROCESSOR_CONFIG = "preprocessor_config.json"
MODEL_CONFIG = "config.json"


def resolve_preprocess(spec: "ModelSpec", weights: str | Path | None = None,
                       random_init: bool = False) -> tuple[PreprocessSpec, dict]:
    """(the preprocessing to use, a record of where it came from) for ``spec`` loaded from ``weights``
    (a save_pretrained directory), the hub (``spec.source``, when ``weights`` is None) or ``random_init``.

    The record: ``{"source": "checkpoint", "file": ..., "processor_type": ..., "differs_from_registry":
    {key: {"registry": ..., "checkpoint": ...}}}`` (plus ``"input_size_from": "config.json"`` when the size
    came from there), or ``{"source": "registry", "reason": ...}``. Settings imgembed cannot reproduce raise
    :class:`~imgembed.errors.CheckpointPreprocessError` naming the key.
    """
    if random_init:
        return spec.preprocess, {"source": "registry", "reason": "random-init"}
    if weights is not None:
        where, cfg, model_cfg = _read_dir(Path(weights))
    elif spec.source is not None:
        where, cfg, model_cfg = _read_hub(spec.source.hub, spec.source.revision)
    else:
        return spec.preprocess, {"source": "registry", "reason": "no weight source"}
    if cfg is None:
        return spec.preprocess, {"source": "registry", "reason": f"no {PREPROCESSOR_CONFIG} in {where}"}
    pre, size_from_config = _from_checkpoint(spec, cfg, model_cfg, f"{where}/{PREPROCESSOR_CONFIG}")
    record = {"source": "checkpoint", "file": f"{where}/{PREPROCESSOR_CONFIG}",
              "processor_type": cfg.get("image_processor_type") or cfg.get("feature_extractor_type"),
              "differs_from_registry": differing_keys(spec.preprocess, pre)}
    if size_from_config:
        record["input_size_from"] = MODEL_CONFIG
    return pre, record


def with_checkpoint_preprocess(spec: "ModelSpec", weights: str | Path | None = None,
                               random_init: bool = False) -> tuple["ModelSpec", dict]:
    """``spec`` with the preprocessing :func:`resolve_preprocess` finds, and its record."""
    pre, record = resolve_preprocess(spec, weights, random_init)
    return (spec if pre == spec.preprocess else replace(spec, preprocess=pre)), record


def differing_keys(registry: PreprocessSpec, checkpoint: PreprocessSpec) -> dict[str, dict]:
    """``{key: {"registry": value, "checkpoint": value}}`` for every field where the two differ."""
    a, b = registry.to_dict(), checkpoint.to_dict()
    return {k: {"registry": a[k], "checkpoint": b[k]} for k in a if a[k] != b[k]}


def describe(record: dict) -> str:
    """One line for the export output: where the preprocessing came from and what differs from the registry."""
    if record.get("source") != "checkpoint":
        return f"preprocessing: registry default ({record.get('reason', 'no checkpoint processor')})"
    diff = record.get("differs_from_registry") or {}
    what = f"differs from the registry default in {', '.join(diff)}" if diff else "same as the registry default"
    size = f"; input size from {record['input_size_from']}" if record.get("input_size_from") else ""
    return f"preprocessing: {record['file']} ({record.get('processor_type')}; {what}{size})"


# ------------------------------------------------------------------------------------------ reading
def _read_json(path: Path) -> dict | None:
    """A JSON object from ``path``; None if the file does not exist."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise WeightsError(f"{path}: unreadable ({e})") from None
    if not isinstance(raw, dict):
        raise WeightsError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    return raw


def _read_dir(weights: Path) -> tuple[str, dict | None, dict | None]:
    if not weights.is_dir():
        raise WeightsError(f"weights directory {weights} does not exist (expected a save_pretrained directory)")
    where = str(weights.resolve())
    return where, _read_json(weights / PREPROCESSOR_CONFIG), _read_json(weights / MODEL_CONFIG)


def _read_hub(repo: str, revision: str) -> tuple[str, dict | None, dict | None]:
    """The two config files of a hub repo at ``revision`` (None where the repo has no such file)."""
    where = f"hub:{repo}@{revision}"
    files = [_hub_file(repo, revision, name) for name in (PREPROCESSOR_CONFIG, MODEL_CONFIG)]
    return where, *(None if f is None else _read_json(f) for f in files)


def _hub_file(repo: str, revision: str, filename: str) -> Path | None:
    """``filename`` of ``repo@revision`` from the hub (or its cache); None if the repo has no such file."""
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError
    except ImportError as e:  # pragma: no cover - transformers depends on huggingface_hub
        raise WeightsError(f"huggingface_hub is needed to read {filename} of {repo} ({e})") from None
    try:
        return Path(hf_hub_download(repo, filename, revision=revision))
    except LocalEntryNotFoundError as e:  # offline and not cached (a subclass of EntryNotFoundError)
        raise WeightsError(f"could not download {filename} of {repo}@{revision} from the Hugging Face hub ({e}). "
                           "Offline? Pass --weights DIR (a save_pretrained directory) or --random-init.") from None
    except EntryNotFoundError:
        return None
    except Exception as e:  # network, auth, unknown repo or revision: the hub client's own error types
        raise WeightsError(f"could not read {filename} of {repo}@{revision} from the Hugging Face hub "
                           f"({type(e).__name__}: {e}). Offline? Pass --weights DIR or --random-init.") from None


def preprocess_from_file(path: str | Path) -> tuple[PreprocessSpec, dict]:
    """(PreprocessSpec, record) of a standalone ``preprocessor_config.json`` in the Hugging Face format (for
    your own encoders, which have no config.json beside it). Unsupported settings raise
    :class:`~imgembed.errors.CheckpointPreprocessError` naming the key, as for checkpoints."""
    path = Path(path)
    cfg = _read_json(path)
    if cfg is None:
        raise WeightsError(f"preprocessor config {path} does not exist (expected a preprocessor_config.json "
                           "in the Hugging Face format)")
    pre, _ = _from_checkpoint(None, cfg, None, str(path))
    return pre, {"source": "file", "file": str(path.resolve()),
                 "processor_type": cfg.get("image_processor_type") or cfg.get("feature_extractor_type")}


# -------------------------------------------------------------------------------------- converting
def _from_checkpoint(spec: "ModelSpec | None", cfg: dict, model_cfg: dict | None,
                     file: str) -> tuple[PreprocessSpec, bool]:
    """PreprocessSpec of the processor config ``file``; True when its input size came from config.json."""
    try:
        proc = processor(_slow_name(cfg))
    except RegistryError as e:
        raise CheckpointPreprocessError(f"{file}: image_processor_type: {e}", "image_processor_type") from None
    _check_supported(cfg, proc, file)
    size = _config_input_size(spec, model_cfg) if "size" not in cfg and spec is not None else None
    if size is not None:
        cfg = {**cfg, "size": size}
        if proc.crop == CROP_SIZE and cfg.get("crop_size") is None:
            cfg["crop_size"] = size
    try:
        return PreprocessSpec.from_hf_config(cfg), size is not None
    except RegistryError as e:
        raise CheckpointPreprocessError(f"{file}: {e}", _key_of(str(e))) from None


def _slow_name(cfg: dict) -> str:
    """The slow class name of a processor config's type (``*Fast`` and legacy FeatureExtractor names map)."""
    from imgembed.preprocess.spec import _hf_processor_name

    return _hf_processor_name(cfg)


def _check_supported(cfg: dict, proc: Any, file: str) -> None:
    """Settings that from_hf_config would silently drop but that the HF processor applies."""
    if proc.crop == CROP_NONE and cfg.get("do_center_crop"):
        raise CheckpointPreprocessError(
            f"{file}: do_center_crop=true is not supported for {proc.name} (imgembed runs it without a center "
            "crop, as the slow processors of this family do); expected false or absent", "do_center_crop")


def _config_input_size(spec: "ModelSpec", model_cfg: dict | None) -> int | None:
    """``image_size`` of config.json (a full image-text checkpoint: its vision config) where it is the
    input size of the family; else None."""
    fam = family_of(spec)
    if model_cfg is None or fam.config_input_size is None:
        return None
    vision = fam.vision_tower(model_cfg)
    value = (vision if vision is not None else model_cfg).get(fam.config_input_size)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _key_of(message: str) -> str | None:
    """The config key a from_hf_config error names (``field 'size'`` or ``resample=...``)."""
    m = re.search(r"field '(\w+)'", message) or re.search(r"\b(\w+)=", message)
    return m.group(1) if m else None


def check_artifact_preprocess(spec: "ModelSpec", source: dict, weights: str | Path | None, where: str) -> None:
    """Raise ArtifactError if the checkpoint of an artifact (its manifest ``source``, or ``weights``) now
    asks for other preprocessing than the artifact's ``spec.preprocess`` (the artifact is stale)."""
    from imgembed.errors import ArtifactError
    from imgembed.models.registry import Source

    kind = source.get("kind") if isinstance(source, dict) else None
    if kind in ("random-init", "module"):  # no checkpoint directory: the manifest's preprocessing is the truth
        return
    if weights is None and kind == "local":
        weights = source["path"]
    elif weights is None and kind == "hub":
        spec = replace(spec, source=Source(hub=str(source["repo"]), revision=str(source.get("revision", "main"))))
    pre, record = resolve_preprocess(spec, weights)
    if record["source"] == "checkpoint" and pre != spec.preprocess:
        keys = ", ".join(differing_keys(spec.preprocess, pre))
        raise ArtifactError(f"{where}: the checkpoint's {record['file']} asks for other preprocessing than the "
                            f"artifact was exported with (differs in {keys}); re-export the artifact")
