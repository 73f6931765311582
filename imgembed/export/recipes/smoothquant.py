"""ONNX Runtime SmoothQuant: static Q/DQ on a graph re-exported from a SmoothQuant-ed copy of the PyTorch
original, for transformers whose outlier channels defeat the plain preset (built only where it fails).

The alpha is searched on the calibration images, with the most sensitive MatMuls kept float if still needed
(:mod:`..int8_search`); the search runs once per export: the 7-bit twin re-quantizes the smoothed graph with the
same float MatMuls. Image towers only (the re-export needs the original).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from imgembed.errors import ExportError
from imgembed.export.engines import Inputs, batches_of, with_input_format
from imgembed.export.quantize import PRESETS, quantize, quantized_op_counts
from imgembed.export.recipes.onnxruntime import ORT_INT8_STATIC_QDQ_MATMUL, ORT_INT8_STATIC_QDQ_MATMUL_7BIT, int8_rules
from imgembed.export.recipes.registry import Recipe, register, with_vnni


def ort_int8_smoothquant(preset: str) -> Callable[[Inputs, Path], tuple[dict[str, Path], dict]]:
    config = PRESETS[preset]

    def build(inputs: Inputs, directory: Path) -> tuple[dict[str, Path], dict]:
        from imgembed.export.int8_search import smoothquant_int8

        if inputs.head is None:
            raise ExportError("the smoothquant candidate needs the PyTorch original (Inputs.head)")
        pixels, _, info = inputs.calibration()
        if "smoothquant" in inputs.built:
            smoothed, recipe = inputs.built["smoothquant"]
            directory.mkdir(parents=True, exist_ok=True)
            q = quantize(smoothed, directory / "int8.onnx", config, batches_of(pixels),
                         exclude=recipe["excluded_nodes"], cache=inputs.quantize_cache)
        else:
            q, smoothed, recipe = smoothquant_int8(inputs.head, inputs.spec, pixels, directory, config, inputs.opset,
                                                   inputs.spec.thresholds("int8"), threads=inputs.threads,
                                                   cache=inputs.quantize_cache)
            inputs.built["smoothquant"] = smoothed, recipe
        path = with_input_format(inputs, q, directory / "model.onnx")
        return {"model": path}, {"preset": config.to_dict(), "calibration": info, "smoothquant": recipe,
                                 "quantized_ops": quantized_op_counts(q)}
    return build


def _twin(base: Recipe, suffix: str, order: int, **kw) -> Recipe:
    return register(Recipe(f"onnxruntime-int8-smoothquant{suffix}", "onnxruntime", "int8",
                           ort_int8_smoothquant(base.preset), frozenset({"transformer"}), order, fallback_for=base,
                           why=f"SmoothQuant, then {base.preset}", **int8_rules(PRESETS[base.preset]), **kw))


ORT_INT8_SMOOTHQUANT = _twin(ORT_INT8_STATIC_QDQ_MATMUL, "", 200)
# on VNNI kernels the 8-bit recipe is not portable: its 7-bit twin is raced too, behind the portable preset
ORT_INT8_SMOOTHQUANT_7BIT = _twin(ORT_INT8_STATIC_QDQ_MATMUL_7BIT, "-7bit", 201, planned=with_vnni)
