"""Static Q/DQ INT8 with output-error-aware weight rounding and bias correction (:mod:`..weight_rounding`), on the
calibration crops augmented with grayscale copies and mosaics (:func:`~..weight_rounding.augmented`). For CNNs
whose ``static-qdq`` graph failed its gate (trained depthwise-separable networks: EfficientNet-Lite, MobileNet);
its 8-bit weights follow the same VNNI rules as that preset's.
"""
from __future__ import annotations

from pathlib import Path

from imgembed.export.engines import Inputs, batches_of, with_input_format
from imgembed.export.quantize import PRESETS, prepared, quantize, quantized_op_counts
from imgembed.export.recipes.onnxruntime import ORT_INT8_STATIC_QDQ, int8_rules
from imgembed.export.recipes.registry import Recipe, register

PRESET = "static-qdq"


def ort_int8_rounded(inputs: Inputs, directory: Path) -> tuple[dict[str, Path], dict]:
    from imgembed.export.weight_rounding import augmented, optimize
    from imgembed.preprocess.fast import crops_to_pixels

    config = PRESETS[PRESET]
    directory.mkdir(parents=True, exist_ok=True)
    _, crops, info = inputs.calibration()
    pixels = crops_to_pixels(augmented(crops), inputs.spec.preprocess)
    q = quantize(inputs.plain, directory / "qdq.onnx", config, batches_of(pixels), input_name=inputs.input_name,
                 cache=inputs.quantize_cache)
    prepped = prepared(inputs.plain, inputs.quantize_cache, directory / "prepped.onnx")   # the graph q was made of
    rounded, record = optimize(q, prepped, pixels, directory / "int8.onnx", input_name=inputs.input_name,
                               threads=inputs.threads)
    record.pop("per_layer", None)
    path = with_input_format(inputs, rounded, directory / "model.onnx")
    return {"model": path}, {"preset": config.to_dict(), "calibration": {**info, "augmented": int(len(pixels))},
                             "weight_rounding": record, "quantized_ops": quantized_op_counts(rounded)}


ORT_INT8_ROUNDED = register(Recipe(
    "onnxruntime-int8-rounded", "onnxruntime", "int8", ort_int8_rounded, frozenset({"cnn"}), 102,
    fallback_for=ORT_INT8_STATIC_QDQ,
    why="static-qdq with GPTQ-style weight rounding and bias correction on augmented calibration crops",
    **int8_rules(PRESETS[PRESET])))
