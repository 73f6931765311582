"""TensorRT recipes: a plan for this GPU, raced, gated and timed on the GPU like every other engine.

Planned only when the export asks for GPU engines (``imgembed export NAME --trt``, ``--backend tensorrt``:
``plan(..., gpu=True)``); a plain CPU export's plan never holds them. Without TensorRT or a GPU each is listed
as unavailable with the reason (the backend table's ``tensorrt_unavailable("cuda")``).

Each builds its own graph from the plain exported ONNX (never ONNX Runtime's fused one), checks it for
TensorRT (:func:`~imgembed.export.tensorrt.check_trt_onnx`) and builds the plan with
:func:`~imgembed.export.tensorrt.build_engine` for the batch profile of the export (``Inputs.backend_options``:
a :class:`~imgembed.export.tensorrt.TrtOptions`): FP32 from the plain graph, FP16 from ``convert_fp16`` of it
(norms, softmax and reductions kept FP32), INT8 from the symmetric Q/DQ graph of the ``static-qdq-trt`` preset
calibrated on the same images as the CPU INT8 engines. The builder records the plan's ``target`` (GPU, compute
capability, TensorRT version, profile, build record): the engine of the artifact carries it.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from imgembed.errors import ExportError, ImgembedError
from imgembed.export import tensorrt as trt_export
from imgembed.export.engines import Inputs, batches_of
from imgembed.export.quantize import PRESETS, quantize, quantized_op_counts
from imgembed.export.recipes.registry import Recipe, register

IMAGES = frozenset({"transformer", "cnn"})   # image towers: the text tower's token ids are not a TensorRT profile
ORDER = 1000                                 # behind every CPU recipe (and its last resort)


def _graph(inputs: Inputs, precision: str, directory: Path) -> tuple[Path, dict]:
    """The ONNX graph TensorRT builds at ``precision``, and its record."""
    if precision == "fp32":
        return inputs.plain, {"onnx": "the plain exported graph (unfused)"}
    if precision == "fp16":
        from imgembed.export.onnx_export import convert_fp16

        return convert_fp16(inputs.plain, directory / "fp16.onnx"), {
            "onnx": "convert_fp16 of the plain graph: norms, softmax, reductions and Pow/Sqrt/Erf kept FP32"}
    config = PRESETS[trt_export.TRT_INT8_PRESET]
    pixels, _, info = inputs.calibration()
    q = quantize(inputs.plain, directory / "int8.onnx", config, batches_of(pixels), input_name=inputs.input_name)
    return q, {"onnx": "symmetric Q/DQ of the plain graph", "preset": config.to_dict(), "calibration": info,
               "quantized_ops": quantized_op_counts(q)}


def trt_plan(precision: str) -> Callable[[Inputs, Path], tuple[dict[str, Path], dict]]:
    def build(inputs: Inputs, directory: Path) -> tuple[dict[str, Path], dict]:
        from imgembed.runtime.runners.tensorrt_plans import engine_file_name, engine_key

        if inputs.input_format != "float32":
            raise ExportError(f"TensorRT builds engines for float32 NCHW inputs, not {inputs.input_format!r} "
                              "(--uint8-input)")
        options = inputs.backend_options.get("tensorrt") or trt_export.TrtOptions()
        directory.mkdir(parents=True, exist_ok=True)
        graph, record = _graph(inputs, precision, directory)
        trt_export.check_trt_onnx(graph)
        env = trt_export.current_env()
        try:
            blob, build_record = trt_export.build_engine(graph, precision, options.profile, env,
                                                         cache_dir=options.cache_dir,
                                                         workspace_gib=options.workspace_gib)
        except ImgembedError:
            raise
        except Exception as e:  # TensorRT's and CUDA's own errors: a failed candidate, not a failed export
            raise ExportError(f"TensorRT could not build a {precision} plan: {type(e).__name__}: {e}") from e
        key = engine_key(env, precision, options.profile)
        plan = directory / engine_file_name(key)
        plan.write_bytes(blob)
        target = {"key": key, "gpu": env.gpu.to_dict(), "tensorrt": env.tensorrt,
                  "profile": options.profile.to_dict(), "build": build_record,
                  "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        return {"plan": plan}, {**record, "target": target}
    return build


def _trt(precision: str, order: int, why: str) -> Recipe:
    # batch_invariant False: TensorRT chooses its kernels per input shape, so a vector may differ (within the
    # gate) with the batch it ran in
    return register(Recipe(f"tensorrt-{precision}", "tensorrt", precision, trt_plan(precision), IMAGES, order,
                           batch_invariant=False, device="cuda", why=why))


TRT_FP32 = _trt("fp32", ORDER, "the plain graph, TF32 off")
TRT_FP16 = _trt("fp16", ORDER, "convert_fp16 of the plain graph, norms kept FP32")
TRT_INT8 = _trt("int8", ORDER, f"explicit quantization: the symmetric Q/DQ graph of {trt_export.TRT_INT8_PRESET!r}")
