"""Accuracy-aware mixed precision: static INT8 with the most sensitive layers kept in float, the fewest that
meet the gate on the calibration images (:mod:`..mixed_precision`). The last resort of a CNN: built only when
no candidate before it passed.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from imgembed.export.engines import LAST_RESORT, Inputs, batches_of, with_input_format
from imgembed.export.quantize import PRESETS, quantized_op_counts
from imgembed.export.recipes.onnxruntime import int8_rules
from imgembed.export.recipes.registry import Recipe, register


def ort_int8_mixed(preset: str) -> Callable[[Inputs, Path], tuple[dict[str, Path], dict]]:
    config = PRESETS[preset]

    def build(inputs: Inputs, directory: Path) -> tuple[dict[str, Path], dict]:
        from imgembed.export.int8_search import _embed
        from imgembed.export.mixed_precision import mixed_int8

        pixels, _, info = inputs.calibration()
        batches = batches_of(pixels)
        reference = _embed(inputs.plain, batches, inputs.threads)
        q, recipe = mixed_int8(inputs.plain, directory / "search", config, batches, reference,
                               inputs.spec.thresholds("int8"), threads=inputs.threads, cache=inputs.quantize_cache)
        path = with_input_format(inputs, q, directory / "model.onnx")
        return {"model": path}, {"preset": config.to_dict(), "calibration": info, "mixed_precision": recipe,
                                 "quantized_ops": quantized_op_counts(q)}
    return build


ORT_INT8_MIXED = register(Recipe("onnxruntime-int8-mixed", "onnxruntime", "int8", ort_int8_mixed("static-qdq"),
                                 frozenset({"cnn"}), 900, fallback_for=LAST_RESORT,
                                 why="static-qdq with the most sensitive layers kept float",
                                 **int8_rules(PRESETS["static-qdq"])))
