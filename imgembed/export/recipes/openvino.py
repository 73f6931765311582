"""OpenVINO recipes: the IR in FP32, with a BF16 inference hint (CPUs with BF16 instructions), and INT8 through
NNCF, with FP32 or BF16 for the float remainder.

NNCF without SmoothQuant is raced first; with it only where that fails the gate (outlier channels), as for
ONNX Runtime. CNNs get cross-layer equalization instead, also only where the plain recipe fails. The INT8 IR is
built once per export and shared by the recipes that differ only in their inference hint. Every OpenVINO engine
runs oneDNN's kernels of the host it is opened on: none is portable.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from imgembed.export.engines import Inputs, batches_of, with_input_format
from imgembed.export.recipes.cle import cle_graph
from imgembed.export.recipes.registry import Recipe, register, with_vnni
from imgembed.runtime import host

ALL = frozenset({"transformer", "cnn", "text"})
TRANSFORMERS = frozenset({"transformer", "text"})
CNNS = frozenset({"cnn"})


def bf16_instructions() -> str | None:
    """Why this CPU cannot compute in BF16 (no AVX512_BF16 / AMX), None when it can."""
    return host.missing_bf16_instructions()


def ov_float(inputs: Inputs, directory: Path) -> tuple[dict[str, Path], dict]:
    from imgembed.export.openvino import convert_onnx, ir_files

    directory.mkdir(parents=True, exist_ok=True)
    return ir_files(convert_onnx(inputs.plain_in_format(), directory / "model.xml")), {}


def ov_int8(smooth_quant: bool, equalized: bool = False) -> Callable[[Inputs, Path], tuple[dict[str, Path], dict]]:
    """NNCF INT8 IR (SmoothQuant on or off; on the cross-layer-equalized graph when ``equalized``)."""
    key = f"openvino-int8{'-smoothquant' if smooth_quant else ''}{'-cle' if equalized else ''}"

    def build(inputs: Inputs, directory: Path) -> tuple[dict[str, Path], dict]:
        from imgembed.export.openvino import convert_onnx, ir_files, quantize_nncf

        if key in inputs.built:
            files, record = inputs.built[key]
            return files, dict(record)
        directory.mkdir(parents=True, exist_ok=True)
        pixels, crops, info = inputs.calibration()
        data = crops if inputs.input_format == "uint8" else pixels
        extra: dict = {}
        if equalized:
            graph, extra["equalization"] = cle_graph(inputs)
            graph = with_input_format(inputs, graph, directory / "cle.onnx")
        else:
            graph = inputs.plain_in_format()
        fp32 = convert_onnx(graph, directory / "fp32.xml")
        record = quantize_nncf(fp32, directory / "model.xml", batches_of(data), transformer=inputs.transformer,
                               smooth_quant=smooth_quant,
                               overflow_fix=host.int8_kernels("openvino") == "saturating")
        for p in [*ir_files(fp32).values(), *([graph] if equalized else [])]:
            p.unlink()
        inputs.built[key] = ir_files(directory / "model.xml"), {**record, **extra, "calibration": info}
        return ir_files(directory / "model.xml"), {**record, **extra, "calibration": info}
    return build


def _int8(suffix: str, builder, kinds: frozenset[str], order: int, **kw) -> Recipe:
    return register(Recipe(f"openvino-int8{suffix}", "openvino", "int8", builder, kinds, order, needs_vnni=with_vnni,
                           **kw))


def _int8_bf16(fp32_twin: Recipe, **kw) -> Recipe:
    """``fp32_twin`` (same IR) computing its float remainder in BF16."""
    return register(Recipe(f"{fp32_twin.id}-bf16", "openvino", "int8", fp32_twin.builder, fp32_twin.kinds,
                           fp32_twin.order + 1, "bf16", needs_vnni=with_vnni, probes=(bf16_instructions,),
                           why=f"{fp32_twin.why}; BF16 float remainder", **kw))


OV_BF16 = register(Recipe("openvino-bf16", "openvino", "bf16", ov_float, ALL, 10, "bf16",
                          probes=(bf16_instructions,), why="the FP32 IR with a BF16 inference hint"))
OV_FP32 = register(Recipe("openvino-fp32", "openvino", "fp32", ov_float, ALL, 30, why="the FP32 IR"))
OV_INT8 = _int8("", ov_int8(False), ALL, 300, why="NNCF")
OV_INT8_BF16 = _int8_bf16(OV_INT8)
OV_INT8_CLE = _int8("-cle", ov_int8(False, True), CNNS, 310, fallback_for=OV_INT8,
                    why="NNCF on the cross-layer-equalized graph")
OV_INT8_CLE_BF16 = _int8_bf16(OV_INT8_CLE, fallback_for=OV_INT8_BF16)
OV_INT8_SMOOTHQUANT = _int8("-smoothquant", ov_int8(True), TRANSFORMERS, 310, fallback_for=OV_INT8,
                            why="NNCF with SmoothQuant")
OV_INT8_SMOOTHQUANT_BF16 = _int8_bf16(OV_INT8_SMOOTHQUANT, fallback_for=OV_INT8_BF16)
