"""TensorRT plans: the building code of the TensorRT recipes (:mod:`imgembed.export.recipes.tensorrt`).

``imgembed export NAME --trt [--fp16|--int8] [--trt-batch 1,32,256]`` races the TensorRT recipe of the precision
in the export's engine race, beside the CPU candidates (:mod:`.engines`): the recipe makes its graph from the
plain exported ONNX, checks it for TensorRT (:func:`check_trt_onnx`), parses and builds it with an explicit
batch profile and a persistent timing cache (:func:`build_engine`); the race gates the plan on the GPU with the
same parity gate as every engine and times it there; a passing plan is kept in the artifact as one more engine
(``backend: tensorrt``, ``device: cuda``, ``files: {"plan": ...}`` and a ``target`` naming the GPU, compute
capability, TensorRT version and profile), written by the code that writes every engine. The CPU default engine
is chosen among the CPU candidates as without ``--trt``; a failing plan is a failed row of the selection table.
:func:`prepare_trt_export` is what ``--trt`` checks before any work. Adding a plan for another GPU to an
existing artifact: :func:`imgembed.export.add_plan.add_engine` (the same recipe, race and gate).

Precision, per TensorRT generation:
* TensorRT >= 10: *strongly typed* networks (TensorRT 11 removed weak typing, the FP16/INT8 builder flags,
  layer precision constraints and INT8 calibrators). Precision comes from the ONNX graph itself: the FP16
  graph keeps LayerNormalization, Softmax, reductions, Pow/Sqrt/Erf in FP32 (``convert_fp16``), INT8 is
  explicit quantization from the symmetric Q/DQ graph of the ``static-qdq-trt`` preset (calibrated on the
  same images as the CPU INT8 engines). TF32 is switched off so FP32 layers stay FP32.
* TensorRT 8.6 / 9.x (no strong typing): BuilderFlag.FP16 / INT8 plus OBEY_PRECISION_CONSTRAINTS, with the
  normalisation, softmax, reduction and unary layers pinned to FP32 (:func:`constrain_fp32_layers`).

The ONNX for TensorRT is the unfused export (ONNX Runtime's contrib ops such as ``Attention`` are not ONNX
operators), at opset >= 17 so LayerNormalization is one native op. ``tensorrt`` is imported lazily.

Not yet run on GPU hardware. The pure-Python decisions (flags, precision constraints, graph checks,
profiles, keys) are unit-tested with fakes, and the race with the builder and the runner faked; building and
running engines is written to TensorRT's documented Python API only.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from imgembed.artifact import write_bytes_atomic
from imgembed.errors import BackendUnavailableError, ExportError
from imgembed.runtime.runners.tensorrt import current_env, import_tensorrt, tensorrt_unavailable  # noqa: F401
from imgembed.runtime.runners.tensorrt_plans import (
    DEFAULT_PROFILE,
    ENGINE_PRECISIONS,
    BatchProfile,
    EngineEnv,
    parse_profile,
    slug,
)

Step = Callable[[str], None]
# current_env (imported above): the TensorRT recipes read this machine's GPU through this module (fakes patch it)
TRT_INT8_PRESET = "static-qdq-trt"
MIN_OPSET = 17
CACHE_ENV = "IMGEMBED_TRT_CACHE"
# Weakly typed builds (TensorRT < 10) pin these layer types to FP32; they mirror convert_fp16's FP32 ops.
FP32_LAYER_TYPES = ("NORMALIZATION", "SOFTMAX", "REDUCE", "UNARY")
# Ops TensorRT's ONNX parser cannot take: dynamic quantization (TensorRT quantizes through Q/DQ only).
_DYNAMIC_QUANT_OPS = {"DynamicQuantizeLinear", "MatMulInteger", "ConvInteger", "QLinearConv", "QLinearMatMul"}


@dataclass
class TrtOptions:
    """How TensorRT plans are built (``ExportOptions.trt``; :func:`~imgembed.export.add_plan.add_engine`)."""

    profile: BatchProfile = DEFAULT_PROFILE
    workspace_gib: float = 4.0                  # IBuilderConfig memory pool limit for tactics
    cache_dir: str | Path | None = None         # timing caches (default: $IMGEMBED_TRT_CACHE or ~/.cache/...)
    weights: str | Path | None = None           # the original's weights, if its source directory moved
    threads: int | None = None                  # CPU threads for the PyTorch reference
    module: str | None = None                   # a module artifact's factory, as the user named it
    calibration: str | Path | None = None       # add_engine, INT8: calibration images (default: the built-in set)


def trt_export_overrides(precision: str, int8_preset: str | None) -> dict:
    """ExportOptions fields of a CPU artifact whose ``model.onnx`` TensorRT can build itself (no ORT fusion;
    INT8 through the symmetric Q/DQ preset): what the GPU conformance suite builds plans from. ``--trt`` does
    not need them: its TensorRT recipes build their own graphs from the plain export."""
    overrides: dict = {"optimize": False}
    if precision == "int8":
        if int8_preset not in (None, TRT_INT8_PRESET):
            raise ExportError(f"--int8-preset {int8_preset!r} cannot be built by TensorRT (dynamic and asymmetric "
                              f"quantization are CPU-only); with --trt use {TRT_INT8_PRESET!r} (the default)")
        overrides["int8_preset"] = TRT_INT8_PRESET
    return overrides


def prepare_trt_export(precision: str, batch: str, input_format: str = "float32") -> TrtOptions:
    """Everything ``export --trt`` checks before exporting anything: the profile text (ValueError), the
    precision and input format (ExportError) and that TensorRT and a GPU are here (BackendUnavailableError).
    Returns the options of ``ExportOptions.trt``."""
    profile = parse_profile(batch)
    if precision not in ENGINE_PRECISIONS:
        raise ExportError(f"--trt builds {'/'.join(ENGINE_PRECISIONS)} engines, not {precision} (TensorRT has no "
                          "BF16 recipe here); export BF16 without --trt")
    if input_format != "float32":
        raise ExportError(f"--trt builds engines for float32 NCHW inputs; input format {input_format!r} "
                          "(--uint8-input) is not supported with --trt")
    reason = tensorrt_unavailable("cuda")
    if reason:
        raise BackendUnavailableError(f"--trt needs TensorRT and an NVIDIA GPU: {reason}")
    return TrtOptions(profile=profile)


def check_trt_onnx(model) -> None:
    """Refuse a graph TensorRT cannot build, naming each problem and the fix (ExportError).

    ``model`` is a path or an ``onnx.ModelProto``. Checks: opset >= 17, only standard-domain ops (no ORT
    contrib ops from transformer fusion), no dynamic quantization, Q/DQ zero points int8 and zero.
    """
    import onnx

    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    problems = []
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < MIN_OPSET:
        problems.append(f"opset {opset} < {MIN_OPSET} (LayerNormalization must be one native op)")
    contrib = sorted({n.op_type for n in model.graph.node if n.domain not in ("", "ai.onnx")})
    if contrib:
        problems.append(f"ONNX Runtime contrib ops {contrib} (export without ORT fusion: --trt implies it)")
    dynamic = sorted({n.op_type for n in model.graph.node} & _DYNAMIC_QUANT_OPS)
    if dynamic:
        problems.append(f"dynamic/QOperator quantization ops {dynamic} (use the {TRT_INT8_PRESET!r} preset)")
    problems += _zero_point_problems(model)
    if problems:
        raise ExportError(f"graph {model.graph.name!r} cannot be built by TensorRT: " + "; ".join(problems))


def _zero_point_problems(model) -> list[str]:
    """TensorRT's explicit quantization is symmetric int8: every Q/DQ zero point must be int8 zeros."""
    import numpy as np
    from onnx import TensorProto, numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    bad = []
    for n in model.graph.node:
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear") or len(n.input) < 3 or not n.input[2]:
            continue
        zp = inits.get(n.input[2])
        if zp is None:
            continue
        if zp.data_type != TensorProto.INT8 or np.any(numpy_helper.to_array(zp) != 0):
            bad.append(n.name or n.output[0])
    return [f"{len(bad)} Q/DQ nodes whose zero point is not int8 zeros (e.g. {bad[0]!r}: asymmetric, uint8 or "
            f"an int32 bias); TensorRT needs symmetric int8 Q/DQ and float biases ({TRT_INT8_PRESET!r})"] if bad else []


def network_creation_flags(trt) -> tuple[int, bool]:
    """(flags for ``Builder.create_network``, strongly typed?): STRONGLY_TYPED where TensorRT has it (>= 10;
    always on in 11), else EXPLICIT_BATCH (8.x/9.x, where implicit batch was still the default)."""
    flag = trt.NetworkDefinitionCreationFlag
    if hasattr(flag, "STRONGLY_TYPED"):
        return 1 << int(flag.STRONGLY_TYPED), True
    return 1 << int(flag.EXPLICIT_BATCH), False


def constrain_fp32_layers(trt, network) -> list[str]:
    """Weak typing only: pin every layer of a type in :data:`FP32_LAYER_TYPES` (and its outputs) to FP32."""
    types = {getattr(trt.LayerType, t) for t in FP32_LAYER_TYPES if hasattr(trt.LayerType, t)}
    pinned = []
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type in types:
            layer.precision = trt.float32
            for j in range(layer.num_outputs):
                layer.set_output_type(j, trt.float32)
            pinned.append(layer.name)
    return pinned


def configure_precision(trt, config, network, precision: str, strongly_typed: bool) -> dict:
    """Builder flags for ``precision``; returns what was done (recorded in the manifest)."""
    if hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)  # FP32 layers stay FP32 (TF32 breaks the FP32 parity gate)
    if strongly_typed or precision == "fp32":
        return {"typing": "strong" if strongly_typed else "weak", "fp32_pinned_layers": 0}
    config.set_flag(trt.BuilderFlag.FP16)
    if precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)  # explicit quantization: the Q/DQ nodes decide what runs in int8
    config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
    return {"typing": "weak", "fp32_pinned_layers": len(constrain_fp32_layers(trt, network))}


def default_cache_dir() -> Path:
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "imgembed" / "tensorrt"


def timing_cache_path(cache_dir: str | Path | None, env: EngineEnv) -> Path:
    """One timing cache per GPU model and TensorRT version (TensorRT refuses a mismatched one anyway)."""
    return Path(cache_dir or default_cache_dir()) / f"timing-{slug(env.gpu.name)}-trt{env.tensorrt}.cache"


def _parse(trt, network, logger, onnx_path: Path) -> None:
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(getattr(parser, "num_errors", 0))]
        raise ExportError(f"TensorRT's ONNX parser rejected {onnx_path}: {'; '.join(errors) or 'no details'}")


def _optimization_profile(builder, network, profile: BatchProfile):
    if network.num_inputs != 1:
        raise ExportError(f"expected one network input, got {network.num_inputs}")
    inp = network.get_input(0)
    chw = tuple(inp.shape)[1:]
    if any(d < 0 for d in chw):
        raise ExportError(f"input {inp.name!r} has shape {tuple(inp.shape)}: only the batch axis may be dynamic")
    p = builder.create_optimization_profile()
    p.set_shape(inp.name, (profile.min, *chw), (profile.opt, *chw), (profile.max, *chw))
    return p


def _attach_timing_cache(config, path: Path):
    data = path.read_bytes() if path.is_file() else b""
    try:
        cache = config.create_timing_cache(data)
    except Exception:  # a corrupt or foreign cache file: start a fresh one
        cache = config.create_timing_cache(b"")
    if not config.set_timing_cache(cache, ignore_mismatch=False):  # from another device: start afresh
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)


def build_engine(onnx_path: str | Path, precision: str, profile: BatchProfile, env: EngineEnv, *,
                 cache_dir: str | Path | None = None, workspace_gib: float = 4.0) -> tuple[bytes, dict]:
    """Parse ``onnx_path`` and build a serialized engine; returns (engine bytes, build record)."""
    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags, strongly_typed = network_creation_flags(trt)
    network = builder.create_network(flags)
    _parse(trt, network, logger, Path(onnx_path))
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * 2**30))
    record = configure_precision(trt, config, network, precision, strongly_typed)
    config.add_optimization_profile(_optimization_profile(builder, network, profile))
    cache_path = timing_cache_path(cache_dir, env)
    _attach_timing_cache(config, cache_path)
    t0 = time.perf_counter()
    blob = builder.build_serialized_network(network, config)
    if blob is None:
        raise ExportError(f"TensorRT could not build a {precision} engine from {onnx_path} (see its log above)")
    write_bytes_atomic(cache_path, bytes(memoryview(config.get_timing_cache().serialize())))
    return bytes(memoryview(blob)), {**record, "build_seconds": round(time.perf_counter() - t0, 1),
                                     "timing_cache": str(cache_path), "workspace_gib": workspace_gib}
