"""Cross-layer equalization (:mod:`..equalize`) for CNNs whose channel ranges defeat the plain INT8 presets:
static QOperator INT8 (QLinearConv with the ReLU folded into its output range, per-channel weights) on the
equalized graph, built only where the plain preset fails its gate. The equalized graph is shared with
OpenVINO's CLE recipes (:mod:`.openvino`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from imgembed.errors import ExportError
from imgembed.export.engines import Inputs, batches_of, with_input_format
from imgembed.export.quantize import PRESETS, quantize, quantized_op_counts
from imgembed.export.recipes.onnxruntime import ORT_INT8_STATIC_QOPERATOR, ORT_INT8_STATIC_QOPERATOR_7BIT, int8_rules
from imgembed.export.recipes.registry import Recipe, register, with_vnni


def cle_graph(inputs: Inputs) -> tuple[Path, dict]:
    """The plain graph after cross-layer equalization, built once per export; an ExportError when the graph
    has no chain to equalize (the candidate would repeat its plain recipe)."""
    if "cle" not in inputs.built:
        from imgembed.export.equalize import equalize

        path = inputs.work / "cle.onnx"
        inputs.built["cle"] = path, equalize(inputs.plain, path)
    path, record = inputs.built["cle"]
    if not record["pairs"]:
        raise ExportError("cross-layer equalization does not apply: no Conv -> Relu -> Conv chain whose "
                          "activation is positively homogeneous (ReLU6/Clip, Sigmoid and shared tensors block it)")
    return path, record


def ort_int8_cle(preset: str) -> Callable[[Inputs, Path], tuple[dict[str, Path], dict]]:
    config = PRESETS[preset]

    def build(inputs: Inputs, directory: Path) -> tuple[dict[str, Path], dict]:
        directory.mkdir(parents=True, exist_ok=True)
        graph, equalization = cle_graph(inputs)
        pixels, _, info = inputs.calibration()
        q = quantize(graph, directory / "int8.onnx", config, batches_of(pixels), input_name=inputs.input_name,
                     cache=inputs.quantize_cache)
        path = with_input_format(inputs, q, directory / "model.onnx")
        return {"model": path}, {"preset": config.to_dict(), "calibration": info, "equalization": equalization,
                                 "quantized_ops": quantized_op_counts(q)}
    return build


def _twin(base: Recipe, suffix: str, order: int, **kw) -> Recipe:
    return register(Recipe(f"onnxruntime-int8-cle{suffix}", "onnxruntime", "int8", ort_int8_cle(base.preset),
                           frozenset({"cnn"}), order, fallback_for=base, why=f"cross-layer equalization, then "
                           f"{base.preset}", **int8_rules(PRESETS[base.preset]), **kw))


ORT_INT8_CLE = _twin(ORT_INT8_STATIC_QOPERATOR, "", 200)
# on VNNI kernels the 8-bit recipe is not portable: its 7-bit twin is raced too, behind the portable preset
ORT_INT8_CLE_7BIT = _twin(ORT_INT8_STATIC_QOPERATOR_7BIT, "-7bit", 201, planned=with_vnni)
