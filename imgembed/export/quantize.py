"""INT8 quantization with ONNX Runtime, as named presets (a dataclass each, saved into the manifest).

The default presets are *static*: activation scales are calibrated once, so an image's vector does not
depend on what else is in its batch (batch invariance, gated at export). *Dynamic* presets quantize
activations per batch at run time (no calibration, often fast on transformers, but a vector moves slightly
with its batch-mates); they run only when asked for by name (``--int8-preset dynamic``).

Which presets an export races, for which graphs, is the recipe registry's (:mod:`.recipes.onnxruntime`):

* transformer families: static QDQ on the MatMuls only (per-channel weights; residual adds, softmax and
  LayerNorm stay float: quantizing them is what breaks transformer INT8).
* CNNs: static QOperator and QDQ with per-channel weights.
* portability: the first preset again with 7-bit weights (``reduce_range``). ONNX
  Runtime multiplies uint8 activations by int8 weights; on x86 CPUs without VNNI its kernels add pairs of
  8-bit products in int16 and saturate, so an 8-bit engine gated on a VNNI CPU can drift on such a CPU.
  7-bit weights never saturate: that engine computes the same everywhere, at the same speed.
The export races these against the other engines (OpenVINO + NNCF) and keeps the fastest that passes the
parity gate; an INT8 winner slower than FP32 is reported loudly (``Int8SlowerWarning``).
"""
from __future__ import annotations

import contextlib
import io
import logging
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import onnx

from imgembed.errors import ExportError


class Int8SlowerWarning(UserWarning):
    """An INT8 artifact was written although it measured slower than FP32 on this machine."""


@dataclass(frozen=True)
class QuantConfig:
    name: str
    mode: str                     # "dynamic" | "static"
    quant_format: str = "QOperator"   # static only: "QOperator" (QLinearConv...) | "QDQ"
    weight_type: str = "int8"     # "int8" | "uint8"
    activation_type: str = "uint8"
    per_channel: bool = False
    reduce_range: bool = False
    op_types: tuple[str, ...] | None = None
    calibrate_method: str = "minmax"  # static only: "minmax" | "percentile" | "entropy"
    symmetric: bool = False       # static only: zero-point-free activations and weights (TensorRT needs it)
    quantize_bias: bool = True    # QDQ only: False keeps biases float (TensorRT has no int32 DequantizeLinear)
    why: str = ""

    def to_dict(self) -> dict:
        d = asdict(self)
        d["op_types"] = list(self.op_types) if self.op_types else None
        return d


# The ops of a CNN preset. Relu and Clip (ReLU6) fold into the preceding Conv's output range: left float, the
# Conv's output would be quantized over its pre-activation range (trained ReLU6 nets lose most of their levels
# to values the activation clips away); Pad (TF "SAME" padding at stride 2) keeps its input quantized.
CNN_OPS = ("Conv", "MatMul", "Gemm", "Add", "Relu", "Clip", "Pad", "MaxPool", "GlobalAveragePool")

PRESETS: dict[str, QuantConfig] = {
    "dynamic": QuantConfig(
        "dynamic", "dynamic", weight_type="int8", per_channel=False, op_types=("MatMul", "Attention", "Gemm"),
        why="MatMul-heavy ViTs: U8S8 dynamic quantization is MLAS's fast int8 path on AVX2 without VNNI"),
    "dynamic-per-channel": QuantConfig(
        "dynamic-per-channel", "dynamic", weight_type="int8", per_channel=True,
        op_types=("MatMul", "Attention", "Gemm"), why="per-channel weight scales; slower, sometimes more accurate"),
    "static-qoperator": QuantConfig(
        "static-qoperator", "static", quant_format="QOperator", per_channel=True, calibrate_method="minmax",
        op_types=CNN_OPS, why="CNNs: QLinearConv kernels, per-channel weights, min/max calibration"),
    "static-qdq": QuantConfig(
        "static-qdq", "static", quant_format="QDQ", per_channel=True, calibrate_method="minmax",
        op_types=CNN_OPS, why="CNNs: QDQ graph; measured slower than FP32 on AVX2-only CPUs"),
    "static-qdq-matmul": QuantConfig(
        "static-qdq-matmul", "static", quant_format="QDQ", per_channel=True, calibrate_method="minmax",
        op_types=("MatMul", "Gemm"),
        why="transformers: static activation scales (batch invariant) on the MatMuls only, per-channel weights; "
            "residual adds, softmax and LayerNorm stay float"),
    "static-qdq-matmul-7bit": QuantConfig(
        "static-qdq-matmul-7bit", "static", quant_format="QDQ", per_channel=True, calibrate_method="minmax",
        op_types=("MatMul", "Gemm"), reduce_range=True,
        why="static-qdq-matmul with 7-bit weights: exact on every x86 CPU (without VNNI the 8-bit kernels "
            "saturate), same speed; the portable INT8 engine"),
    "static-qoperator-7bit": QuantConfig(
        "static-qoperator-7bit", "static", quant_format="QOperator", per_channel=True, calibrate_method="minmax",
        op_types=CNN_OPS, reduce_range=True,
        why="static-qoperator with 7-bit weights: exact on every x86 CPU (without VNNI the 8-bit kernels "
            "saturate), same speed; the portable INT8 engine"),
    "static-qdq-matmul-percentile": QuantConfig(
        "static-qdq-matmul-percentile", "static", quant_format="QDQ", per_channel=True,
        calibrate_method="percentile", op_types=("MatMul", "Gemm"),
        why="static-qdq-matmul with activation ranges at the 99.999th percentile (histograms): clips rare "
            "peaks; slower calibration. Hurts when a few channels are consistently large (use smoothquant)"),
    "static-qdq-matmul-entropy": QuantConfig(
        "static-qdq-matmul-entropy", "static", quant_format="QDQ", per_channel=True,
        calibrate_method="entropy", op_types=("MatMul", "Gemm"),
        why="static-qdq-matmul with KL-divergence (entropy) calibrated ranges; slower calibration"),
    "static-qdq-trt": QuantConfig(
        "static-qdq-trt", "static", quant_format="QDQ", weight_type="int8", activation_type="int8",
        per_channel=False, symmetric=True, quantize_bias=False, calibrate_method="minmax",
        op_types=("Conv", "MatMul", "Gemm"),
        why="TensorRT explicit quantization (export --trt --int8): symmetric int8 Q/DQ (TensorRT rejects "
            "non-zero zero points) on the compute-heavy ops, per-tensor scales; unfused graph"),
}


def saturates(config: QuantConfig) -> bool:
    """True when ``config`` gives uint8 x int8 products with full-range 8-bit weights: exact with VNNI, but
    clipped by the int16 pair sums of x86 CPUs without it (:func:`imgembed.runtime.host.int8_saturation`)."""
    return (config.activation_type == "uint8" and config.weight_type == "int8" and not config.reduce_range
            and config.mode in ("static", "dynamic"))


@contextlib.contextmanager
def _quiet():
    """ORT's quantizer prints and logs advice on the root logger; keep the CLI output clean."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        root.setLevel(level)


class ArrayCalibrationReader:
    """onnxruntime CalibrationDataReader over preprocessed batches (one method: get_next())."""

    def __init__(self, input_name: str, batches: Iterable[np.ndarray]):
        self.input_name = input_name
        self._batches = list(batches)
        self._it: Iterator[np.ndarray] = iter(self._batches)

    def get_next(self) -> dict | None:
        batch = next(self._it, None)
        return None if batch is None else {self.input_name: batch}

    def rewind(self) -> None:
        self._it = iter(self._batches)


def _qtype(name: str):
    from onnxruntime.quantization import QuantType

    try:
        return {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}[name]
    except KeyError:
        raise ExportError(f"unknown quantized type {name!r}; expected 'int8' or 'uint8'") from None


def _qdq_options(config: QuantConfig) -> dict:
    """ORT quantizer options for TensorRT-style Q/DQ (only set when asked: ORT's defaults stay otherwise)."""
    out = {"ActivationSymmetric": True, "WeightSymmetric": True} if config.symmetric else {}
    return out if config.quantize_bias else {**out, "QuantizeBias": False}


def quantize(src: str | Path, dst: str | Path, config: QuantConfig,
             calibration: Iterable[np.ndarray] | None = None, input_name: str = "pixel_values",
             exclude: Sequence[str] = (), cache: str | Path | None = None) -> Path:
    """Quantize ``src`` into ``dst`` according to ``config``; static modes need ``calibration`` batches.
    ``exclude``: names of nodes kept in float (names of the pre-processed graph, :func:`prepare_static`).

    ``cache``: a directory shared by the quantizations of one export. The pre-processed graph and the calibrated
    activation ranges are kept there, keyed by what they depend on (the source graph's bytes; the quantized op
    types, the calibration method and the calibration batches' bytes), so presets that differ only in how they
    quantize (8-bit vs 7-bit weights, QDQ vs QOperator, excluded nodes) calibrate once."""
    from onnxruntime import quantization as q

    extra = {"DefaultTensorType": onnx.TensorProto.FLOAT}  # graphs fused by the ORT optimizer lack type info
    ops = list(config.op_types) if config.op_types else None
    try:
        with _quiet():
            warnings.simplefilter("ignore")
            if config.mode == "dynamic":
                q.quantize_dynamic(str(src), str(dst), weight_type=_qtype(config.weight_type),
                                   per_channel=config.per_channel, reduce_range=config.reduce_range,
                                   op_types_to_quantize=ops, extra_options=extra)
            elif config.mode == "static":
                if calibration is None:
                    raise ExportError(f"quantization preset {config.name!r} needs calibration images")
                method = {"minmax": q.CalibrationMethod.MinMax, "percentile": q.CalibrationMethod.Percentile,
                          "entropy": q.CalibrationMethod.Entropy}[config.calibrate_method]
                fmt = {"QOperator": q.QuantFormat.QOperator, "QDQ": q.QuantFormat.QDQ}[config.quant_format]
                calibration = list(calibration)
                ranges = None
                if cache is None:
                    src = prepare_static(src, Path(dst).with_suffix(".prep.onnx"))
                else:
                    src, ranges = _cached(Path(cache), Path(src), config, calibration)
                q.quantize_static(str(src), str(dst), ArrayCalibrationReader(input_name, calibration),
                                  calibration_cache_path=ranges,
                                  quant_format=fmt, op_types_to_quantize=ops, per_channel=config.per_channel,
                                  reduce_range=config.reduce_range, activation_type=_qtype(config.activation_type),
                                  weight_type=_qtype(config.weight_type), calibrate_method=method,
                                  nodes_to_exclude=list(exclude) or None,
                                  extra_options={**extra, **_qdq_options(config)})
            else:
                raise ExportError(f"unknown quantization mode {config.mode!r}")
    except ExportError:
        raise
    except Exception as e:
        raise ExportError(f"INT8 quantization ({config.name}) of {src} failed: {type(e).__name__}: {e}") from e
    return Path(dst)


def _digest(*parts) -> str:
    import hashlib

    h = hashlib.blake2b(digest_size=12)
    for part in parts:
        if isinstance(part, Path):
            with part.open("rb") as f:
                for chunk in iter(lambda: f.read(1 << 22), b""):
                    h.update(chunk)
        elif isinstance(part, np.ndarray):
            h.update(repr((part.dtype.str, part.shape)).encode())
            h.update(np.ascontiguousarray(part).data)
        else:
            h.update(repr(part).encode())
    return h.hexdigest()


def prepared(src: str | Path, cache: str | Path | None, dst: str | Path) -> Path:
    """:func:`prepare_static` of ``src``: kept in ``cache`` (keyed by the graph's bytes) and shared with the
    quantizations of the same export when a cache is given, else written to ``dst``."""
    if cache is None:
        return prepare_static(src, dst)
    return _prepared(Path(cache), Path(src))[0]


def _prepared(cache: Path, src: Path) -> tuple[Path, str]:
    cache.mkdir(parents=True, exist_ok=True)
    graph = _digest(src)
    path = cache / f"{graph}.prep.onnx"
    if not path.is_file():
        prepare_static(src, cache / f"{graph}.prep.tmp.onnx").replace(path)
    return path, graph


def _cached(cache: Path, src: Path, config: QuantConfig, calibration: list[np.ndarray]) -> tuple[Path, Path]:
    """The pre-processed graph of ``src`` and the path of its calibrated ranges for ``config`` in ``cache``
    (ONNX Runtime writes the ranges there on the first calibration and reads them afterwards)."""
    path, graph = _prepared(cache, src)
    key = _digest(graph, sorted(config.op_types or ()), config.calibrate_method, *calibration)
    return path, cache / f"{key}.ranges.json"


def prepare_static(src: str | Path, dst: str | Path) -> Path:
    """ORT's pre-processing of static quantization (shape inference + constant folding: turns Conv biases
    into initializers); node names of ``exclude`` refer to this graph."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    quant_pre_process(str(src), str(dst), skip_symbolic_shape=True)
    return Path(dst)


def quantized_op_counts(path: str | Path) -> dict[str, int]:
    """How many nodes of each quantized op type a graph holds (for manifests and structure tests)."""
    from imgembed.export.onnx_export import op_counts

    qops = ("MatMulInteger", "DynamicQuantizeLinear", "QLinearConv", "QLinearMatMul", "QAttention",
            "QuantizeLinear", "DequantizeLinear", "ConvInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat",
            "QLinearAdd", "QGemm", "QLinearGlobalAveragePool")
    return {k: v for k, v in op_counts(path).items() if k in qops}
