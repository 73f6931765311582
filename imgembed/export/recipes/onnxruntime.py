"""ONNX Runtime recipes: the float graphs (FP32, FP16) and the INT8 presets of :mod:`..quantize`.

The default INT8 presets are static (batch invariant): QDQ on the MatMuls for transformers, QOperator and QDQ
for CNNs, each kind's first preset again with 7-bit weights. An 8-bit preset gated on VNNI kernels would
saturate on x86 CPUs without VNNI (``needs_vnni``); its 7-bit twin is exact everywhere at the same speed, the
portable engine. Every other preset is built only when forced (``--int8-preset``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from imgembed.export.engines import Inputs, batches_of, with_input_format
from imgembed.export.quantize import PRESETS, QuantConfig, quantize, quantized_op_counts, saturates
from imgembed.export.recipes.registry import KernelRule, Recipe, always, never, register, with_vnni, without_vnni

IMAGE_AND_TEXT = frozenset({"transformer", "cnn", "text"})
TRANSFORMERS = frozenset({"transformer", "text"})
CNNS = frozenset({"cnn"})


def int8_rules(config: QuantConfig) -> dict[str, KernelRule]:
    """``portable`` / ``needs_vnni`` of an ONNX Runtime INT8 engine quantized with ``config``: one with full-range
    8-bit weights gated on VNNI kernels is not portable (it would saturate on x86 CPUs without VNNI); one with
    7-bit weights, or gated on the saturating kernels themselves, is."""
    if saturates(config):
        return {"portable": without_vnni, "needs_vnni": with_vnni}
    return {"portable": always, "needs_vnni": never}


def ort_float(inputs: Inputs, directory: Path) -> tuple[dict[str, Path], dict]:
    path = with_input_format(inputs, inputs.ort_graph, directory / "model.onnx")
    return {"model": path}, {}


def ort_fp16(inputs: Inputs, directory: Path) -> tuple[dict[str, Path], dict]:
    from imgembed.export.onnx_export import convert_fp16

    directory.mkdir(parents=True, exist_ok=True)
    path = convert_fp16(inputs.ort_graph, directory / "fp16.onnx")
    return {"model": with_input_format(inputs, path, directory / "model.onnx")}, {"fp16": "onnxruntime float16 "
                                                                                  "converter, norms in fp32"}


def ort_int8(config: QuantConfig) -> Callable[[Inputs, Path], tuple[dict[str, Path], dict]]:
    def build(inputs: Inputs, directory: Path) -> tuple[dict[str, Path], dict]:
        directory.mkdir(parents=True, exist_ok=True)
        pixels, _, info = inputs.calibration() if config.mode == "static" else (None, None, None)
        batches = None if pixels is None else batches_of(pixels)
        # static Q/DQ goes on the plain graph (ORT fuses Q/DQ pairs into integer kernels when it loads it;
        # on the fused graph the Attention ops stay float); dynamic presets use the fused graph's QAttention
        graph = inputs.plain if config.mode == "static" else inputs.ort_graph
        q = quantize(graph, directory / "int8.onnx", config, batches, input_name=inputs.input_name,
                     cache=inputs.quantize_cache)
        path = with_input_format(inputs, q, directory / "model.onnx")
        return {"model": path}, {"preset": config.to_dict(), "calibration": info,
                                 "quantized_ops": quantized_op_counts(q)}
    return build


def preset_recipe(name: str, kinds: frozenset[str] = frozenset(), order: int = 100,
                  same_speed_as: Recipe | None = None) -> Recipe:
    """The recipe of INT8 preset ``name``: raced by default on ``kinds`` graphs, forced by name otherwise."""
    config = PRESETS[name]
    return register(Recipe(f"onnxruntime-int8-{name}", "onnxruntime", "int8", ort_int8(config), kinds, order,
                           batch_invariant=config.mode == "static", preset=name, why=config.why,
                           same_speed_as=same_speed_as, **int8_rules(config)))


ORT_FP32 = register(Recipe("onnxruntime-fp32", "onnxruntime", "fp32", ort_float, IMAGE_AND_TEXT, 20,
                           portable=always, serves=frozenset({"bf16"}),
                           why="the exported graph (fused for transformers); the portable fallback of BF16"))
ORT_FP16 = register(Recipe("onnxruntime-fp16", "onnxruntime", "fp16", ort_fp16, IMAGE_AND_TEXT, 20,
                           portable=always, why="FP16 weights and compute, norms kept FP32"))
# the 7-bit twins run the same kernels as their 8-bit presets, at the same speed: the race builds the portable
# 7-bit engine, and the 8-bit one only when it could still win (the 7-bit twin failed, or nothing faster passed)
ORT_INT8_STATIC_QDQ_MATMUL_7BIT = preset_recipe("static-qdq-matmul-7bit", TRANSFORMERS, 110)
ORT_INT8_STATIC_QOPERATOR_7BIT = preset_recipe("static-qoperator-7bit", CNNS, 110)
ORT_INT8_STATIC_QDQ_MATMUL = preset_recipe("static-qdq-matmul", TRANSFORMERS, 100,
                                           same_speed_as=ORT_INT8_STATIC_QDQ_MATMUL_7BIT)
ORT_INT8_STATIC_QOPERATOR = preset_recipe("static-qoperator", CNNS, 100, same_speed_as=ORT_INT8_STATIC_QOPERATOR_7BIT)
ORT_INT8_STATIC_QDQ = preset_recipe("static-qdq", CNNS, 101)
_RACED = {r.preset for r in (ORT_INT8_STATIC_QDQ_MATMUL, ORT_INT8_STATIC_QOPERATOR, ORT_INT8_STATIC_QDQ,
                              ORT_INT8_STATIC_QDQ_MATMUL_7BIT, ORT_INT8_STATIC_QOPERATOR_7BIT)}
# every other preset (dynamic, percentile, entropy, TensorRT's): built only when forced by name
ORT_INT8_FORCED_ONLY = {name: preset_recipe(name) for name in PRESETS if name not in _RACED}
