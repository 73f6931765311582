"""Bring your own encoder: :func:`export_module` sends any ``torch.nn.Module`` that maps ``(N, 3, H, W)`` float
pixels to ``(N, D)`` vectors through the same flow as registry models (ONNX export, engine race, parity gate,
artifact); ``imgembed export --module pkg.module:factory`` calls it.

Steps: resolve the preprocessing (a preset at ``input_size`` or a ``preprocessor_config.json``) -> build the
module (:mod:`imgembed.models.user_module`: factory, safe weights) -> check its output on a dummy batch (D, or an
ExportError naming the shape) -> a :class:`~imgembed.models.registry.ModelSpec` of family ``module`` -> the shared
:func:`~imgembed.export.pipeline.export_original`. The original of the parity gate is the module itself,
wrapped to return float32 (L2-normalised unless ``normalize=False``).
"""
from __future__ import annotations

import dataclasses
import re
import time
from pathlib import Path
from typing import Any, Callable

from imgembed.artifact import export_lock
from imgembed.errors import ExportError
from imgembed.export.pipeline import ExportOptions, ExportResult, Original, export_original
from imgembed.models.families import DEFAULT_SEED, MODULE_FAMILY
from imgembed.models.registry import DEFAULT_PARITY, EmbeddingSpec, ModelSpec
from imgembed.models.user_module import (
    call_factory,
    check_output,
    factory_path,
    import_factory,
    load_weights,
    looks_like_transformer,
    source_record,
)
from imgembed.preprocess import PreprocessSpec
from imgembed.preprocess.presets import PRESETS, preset

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
CHECKPOINT_OPTIONS = ("weights", "random_init", "seed")  # ExportOptions of registry checkpoints, not of modules
DEFAULT_INPUT_SIZE = 224
Step = Callable[[str], None]


def export_module(module: Any, out: str | Path, *, name: str, preprocess: str | Path | PreprocessSpec = "imagenet",
                  input_size: int | None = None, weights: str | Path | None = None, normalize: bool = True,
                  transformer: bool | None = None, seed: int = DEFAULT_SEED, step: Step = lambda s: None,
                  **options: Any) -> ExportResult:
    """Export your own encoder to the artifact directory ``out`` and gate it on parity against itself.

    ``module``: a factory path ``"pkg.module:factory"``, a callable returning the module, or a
    ``torch.nn.Module`` (an artifact from an instance or a non-importable callable cannot be re-checked by
    ``imgembed parity``: that needs the factory). ``preprocess``: ``"clip"``, ``"imagenet"`` (at
    ``input_size``, default 224), a ``preprocessor_config.json`` path, or a PreprocessSpec. ``weights``: a
    ``.safetensors`` file or a ``torch.save(state_dict)`` file (``weights_only=True``), loaded into the module.
    ``normalize``: L2-normalise the vectors. ``transformer``: INT8 presets for transformers (True) or CNNs
    (False); None guesses from the module (attention layers). ``seed``: the torch seed the factory runs under.
    ``options``: :class:`~imgembed.export.pipeline.ExportOptions` fields (``precision="int8"``, ``backend``,
    ``calibration``, ``keep_candidates``, ``speed_check``, ...).
    """
    opts = _options(options)
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ExportError(f"name {name!r} must start with a letter or digit and hold only letters, digits, "
                          "'.', '_' and '-'")
    instance = _is_module(module)
    was_training = module.training if instance else None
    try:
        with export_lock(out):
            started = time.perf_counter()
            pre, pre_record = resolve_preprocess(preprocess, input_size)
            step(f"preprocessing: {describe(pre_record)}")
            original = build_original(module, name, pre, pre_record, weights=weights, normalize=normalize,
                                      transformer=transformer, seed=seed, step=step)
            return export_original(original, out, opts, step, started=started)
    finally:
        if instance:
            module.train(was_training)


def _is_module(obj: Any) -> bool:
    import torch

    return isinstance(obj, torch.nn.Module)


def _options(options: dict[str, Any]) -> ExportOptions:
    allowed = [f.name for f in dataclasses.fields(ExportOptions) if f.name not in CHECKPOINT_OPTIONS]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ExportError(f"export_module: unknown option(s) {unknown}; expected some of {allowed} (weights: a "
                          "weights file for the module; seed: the factory's torch seed)")
    return ExportOptions(**options)


# ------------------------------------------------------------------------------------------ preprocessing
def resolve_preprocess(preprocess: str | Path | PreprocessSpec,
                       input_size: int | None) -> tuple[PreprocessSpec, dict]:
    """(PreprocessSpec, record for the manifest's ``preprocess_source``) of a preset name, a
    ``preprocessor_config.json`` path or a spec; ``input_size`` is the crop of a preset and, when given,
    must agree with a file or spec."""
    from imgembed.models.checkpoint import preprocess_from_file

    if input_size is not None and (isinstance(input_size, bool) or not isinstance(input_size, int)
                                   or input_size <= 0):
        raise ExportError(f"input size {input_size!r} must be a positive integer (pixels)")
    if isinstance(preprocess, str) and preprocess in PRESETS:
        size = DEFAULT_INPUT_SIZE if input_size is None else input_size
        return preset(preprocess, size), {"source": "preset", "preset": preprocess, "input_size": size}
    if isinstance(preprocess, PreprocessSpec):
        pre, record = preprocess, {"source": "spec"}
    elif isinstance(preprocess, (str, Path)) and Path(preprocess).is_file():
        pre, record = preprocess_from_file(preprocess)
    else:
        raise ExportError(f"preprocess {str(preprocess)!r} is neither a preset ({', '.join(PRESETS)}) nor an "
                          "existing preprocessor_config.json file")
    if input_size is not None and pre.output_hw != (input_size, input_size):
        raise ExportError(f"input size {input_size} disagrees with the preprocessing, whose output is "
                          f"{pre.output_hw[0]}x{pre.output_hw[1]}; drop the input size or change the preprocessing")
    return pre, record


def describe(record: dict) -> str:
    """The preprocessing of a module export in a few words."""
    if record["source"] == "preset":
        return f"preset {record['preset']} at {record['input_size']} px"
    if record["source"] == "file":
        return f"{record['file']} ({record.get('processor_type')})"
    return "PreprocessSpec given by the caller"


# ------------------------------------------------------------------------------------------ the original
def build_original(module: Any, name: str, pre: PreprocessSpec, pre_record: dict, *, weights: str | Path | None,
                   normalize: bool, transformer: bool | None, seed: int, step: Step = lambda s: None) -> Original:
    """The module (from a factory path, a callable or an instance) with its weights, checked and wrapped, its
    ModelSpec and its source record."""
    from imgembed.models.heads import ModuleHead

    if not isinstance(normalize, bool):
        raise ExportError(f"normalize must be True or False, got {normalize!r}")
    if isinstance(module, str):
        step(f"importing {module}")
        factory, built = module, call_factory(import_factory(module), module, seed)
    elif _is_module(module):
        factory, built = None, module
    elif callable(module):
        factory = factory_path(module)
        built = call_factory(module, factory or getattr(module, "__qualname__", repr(module)), seed)
    else:
        raise ExportError(f"module {module!r} is not a torch.nn.Module, a callable returning one, or a factory "
                          "path 'pkg.module:factory'")
    label = factory or f"{type(built).__name__} instance"
    if weights is not None:
        step(f"loading weights {weights}")
        load_weights(built, weights)
    built.eval()
    dim = check_output(built, pre.output_hw, label)
    transformer = looks_like_transformer(built) if transformer is None else bool(transformer)
    step(f"{label}: {dim}-d vectors, {'transformer' if transformer else 'CNN'} INT8 presets")
    spec = module_spec(name, factory, built, dim, pre, normalize, transformer)
    source = source_record(factory, built, weights, seed)
    return Original(spec, ModuleHead(built, normalize).eval(), source, pre_record)


def module_spec(name: str, factory: str | None, module: Any, dim: int, pre: PreprocessSpec, normalize: bool,
                transformer: bool) -> ModelSpec:
    """The ModelSpec of a user module (family ``module``; its ``arch`` records the factory and class)."""
    cls = f"{type(module).__module__}.{type(module).__qualname__}"
    return ModelSpec(
        name=name, family=MODULE_FAMILY, description=f"{cls} ({factory or 'module instance'})", source=None,
        arch={"factory": factory, "class": cls, "transformer": transformer},
        embedding=EmbeddingSpec(output="forward", pooling="none", normalize=normalize, dim=dim),
        preprocess=pre, parity={k: dict(v) for k, v in DEFAULT_PARITY.items()},
    )
