"""OpenVINO IR from the plain exported ONNX graph, and INT8 through NNCF post-training quantization.

The IR is converted from the *plain* graph (before ONNX Runtime's fusions: the fused graph holds
``com.microsoft`` ops OpenVINO cannot read) and saved with FP32 weights (``compress_to_fp16=False``; BF16
is an inference-time hint, see :mod:`imgembed.runtime.runners.openvino`). INT8 uses ``nncf.quantize`` calibrated on
the same images as the ONNX Runtime static path: with ``model_type=TRANSFORMER`` NNCF keeps softmax/LayerNorm
paths in float and can apply SmoothQuant (activation outliers migrated into the weights); CNNs get the
default preset with bias correction.
"""
from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np

from imgembed.errors import ExportError

# NNCF's SmoothQuant alpha for MatMuls when the model is a transformer (its own default, recorded).
NNCF_SUBSET = 300


@contextlib.contextmanager
def _quiet():
    """NNCF prints progress bars and logs INFO lines; keep the CLI output to imgembed's own steps."""
    loggers = [logging.getLogger(n) for n in ("nncf", "openvino")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), \
                warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def convert_onnx(src: str | Path, dst_xml: str | Path) -> Path:
    """Convert an ONNX graph (no com.microsoft ops) to OpenVINO IR with FP32 weights."""
    from imgembed.runtime.runners.openvino import import_openvino

    ov = import_openvino()
    try:
        with _quiet():
            model = ov.convert_model(str(src))
            ov.save_model(model, str(dst_xml), compress_to_fp16=False)
    except Exception as e:
        raise ExportError(f"OpenVINO could not convert {src}: {type(e).__name__}: {str(e).splitlines()[0]}") from e
    return Path(dst_xml)


def quantize_nncf(src_xml: str | Path, dst_xml: str | Path, calibration: Sequence[np.ndarray], *,
                  transformer: bool, smooth_quant: bool = True, ignored_types: Sequence[str] = (),
                  overflow_fix: bool = False) -> dict:
    """NNCF post-training INT8 of an IR; ``calibration`` batches are split into single images. Returns the
    quantization record for the manifest. ``smooth_quant=False`` turns NNCF's SmoothQuant off for a
    transformer (its scale migration costs accuracy on weights without outlier channels). ``overflow_fix``
    keeps every layer's weights 7-bit (NNCF's OverflowFix.ENABLE): oneDNN's int8 kernels on x86 CPUs without
    VNNI saturate with full-range 8-bit weights. Without it every layer keeps 8-bit weights
    (OverflowFix.DISABLE), the first one included: NNCF's default halves the first layer's weight range, which
    took EfficientNet-Lite0 (real weights) from min cosine 0.940 to 0.662 and buys nothing on VNNI kernels (an
    engine built so is recorded ``needs_vnni``)."""
    from imgembed.runtime.runners.openvino import import_openvino

    ov = import_openvino()
    try:
        import nncf
    except ImportError as e:
        raise ExportError(f"NNCF is not installed ({e}); pip install 'imgembed[openvino]'") from None
    items = [batch[i:i + 1] for batch in calibration for i in range(len(batch))]
    if not items:
        raise ExportError("NNCF quantization needs calibration images")
    kwargs = {"model_type": nncf.ModelType.TRANSFORMER} if transformer else {}
    advanced: dict = {"overflow_fix": nncf.OverflowFix.ENABLE if overflow_fix else nncf.OverflowFix.DISABLE}
    if transformer and not smooth_quant:
        advanced["smooth_quant_alphas"] = nncf.AdvancedSmoothQuantParameters(matmul=-1)
    kwargs["advanced_parameters"] = nncf.AdvancedQuantizationParameters(**advanced)
    if ignored_types:
        kwargs["ignored_scope"] = nncf.IgnoredScope(types=list(ignored_types), validate=False)
    try:
        with _quiet():
            model = ov.Core().read_model(str(src_xml))
            quantized = nncf.quantize(model, nncf.Dataset(items), subset_size=min(len(items), NNCF_SUBSET),
                                      **kwargs)
            ov.save_model(quantized, str(dst_xml), compress_to_fp16=False)
    except Exception as e:
        raise ExportError(f"NNCF quantization of {src_xml} failed: {type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}") from e
    return {"method": "nncf.quantize", "nncf": getattr(nncf, "__version__", None),
            "model_type": "transformer" if transformer else "default", "calibration_images": len(items),
            "smooth_quant": bool(transformer and smooth_quant),
            "ignored_types": list(ignored_types), "activations": "static (per-tensor scales)",
            "weights": "per-channel int8", "overflow_fix": "enable" if overflow_fix else "disable"}


def ir_files(xml: Path) -> dict[str, Path]:
    """The two files of an IR, by manifest key."""
    return {"model": Path(xml), "weights": Path(xml).with_suffix(".bin")}
