"""uint8 NHWC input for an exported graph: the rescale and mean/std normalisation move into the model.

A uint8 artifact takes what :func:`imgembed.preprocess.resize_crop` returns -- RGB pixels 0-255, already
resized and center-cropped, ``(N, H, W, 3)`` -- so callers skip the float conversion and hand over 4x fewer
bytes. The prefix is added to the *finished* float graph (after fusion and quantization), so the model part
of a uint8 artifact is byte for byte the float artifact's, and quantization/calibration never see it:

    pixel_values uint8 (N, H, W, 3) -> Transpose (N, 3, H, W) -> Cast float -> Div 1/rescale_factor
        -> Sub mean -> Div std -> the float graph's pixel_values

For every registry model (rescale 1/255) this float32 arithmetic reproduces :mod:`imgembed.preprocess`'s
lookup table (HF's float64 rescale cast to float32, then float32 ``(x - mean) / std``) bit for bit -- checked
for all 256 x 3 values at export -- so the model part receives exactly the float pixels of the float path.
Where it would not be exact (an unusual rescale factor), the table itself is used instead (Cast int64, add
channel offset c*256, Gather from the (768,) table), which is exact by construction but slower than the
arithmetic (docs/performance.md, "Fast end-to-end embedding").
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from imgembed.errors import ExportError
from imgembed.export.onnx_export import INPUT_NAME, check_onnx
from imgembed.preprocess import PreprocessSpec
from imgembed.preprocess import normalize_table as _lut

FLOAT_INPUT = "pixel_values_float"   # the float graph's input, renamed; fed by the prefix
_PREFIX = "imgembed_uint8_"


def input_record(spec: PreprocessSpec, input_format: str) -> dict:
    """The manifest's ``input`` entry for a float32 NCHW or uint8 NHWC artifact."""
    h, w = spec.output_hw
    if input_format == "uint8":
        return {"name": INPUT_NAME, "dtype": "uint8", "shape": [None, h, w, 3], "layout": "NHWC",
                "values": "RGB 0-255 after resize and center crop; rescale and mean/std normalisation in the graph"}
    return {"name": INPUT_NAME, "dtype": "float32", "shape": [None, 3, h, w], "layout": "NCHW",
            "values": "preprocessed (rescaled and mean/std-normalised) RGB"}


def _arithmetic_constants(spec: PreprocessSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(divisor, mean, std) float32 constants of the arithmetic prefix."""
    return (np.array(1.0 / spec.rescale_factor, np.float32),
            np.asarray(spec.image_mean, np.float32).reshape(1, 3, 1, 1),
            np.asarray(spec.image_std, np.float32).reshape(1, 3, 1, 1))


def arithmetic_is_exact(spec: PreprocessSpec) -> bool:
    """Does float32 ``(v / divisor - mean) / std`` equal the lookup table for every uint8 value and channel?"""
    divisor, mean, std = _arithmetic_constants(spec)
    values = np.arange(256, dtype=np.float32)[None, :]
    table = (values / divisor - mean.reshape(3, 1)) / std.reshape(3, 1)
    return bool(np.array_equal(table, _lut(spec.rescale_factor, spec.image_mean, spec.image_std)))


def _arithmetic_nodes(spec: PreprocessSpec) -> tuple[list, list]:
    """Transpose (uint8) -> Cast -> Div -> Sub -> Div."""
    names = [_PREFIX + n for n in ("divisor", "mean", "std")]
    inits = [numpy_helper.from_array(a, n) for a, n in zip(_arithmetic_constants(spec), names, strict=True)]
    nodes = [
        helper.make_node("Transpose", [INPUT_NAME], [_PREFIX + "nchw"], perm=[0, 3, 1, 2], name=_PREFIX + "transpose"),
        helper.make_node("Cast", [_PREFIX + "nchw"], [_PREFIX + "float"], to=TensorProto.FLOAT, name=_PREFIX + "cast"),
        helper.make_node("Div", [_PREFIX + "float", names[0]], [_PREFIX + "rescaled"], name=_PREFIX + "rescale"),
        helper.make_node("Sub", [_PREFIX + "rescaled", names[1]], [_PREFIX + "centred"], name=_PREFIX + "sub_mean"),
        helper.make_node("Div", [_PREFIX + "centred", names[2]], [FLOAT_INPUT], name=_PREFIX + "div_std"),
    ]
    return nodes, inits


def _prefix_nodes(spec: PreprocessSpec) -> tuple[list, list]:
    """The prefix's nodes and initializers: the arithmetic when it is exact, else the lookup table."""
    if arithmetic_is_exact(spec):
        return _arithmetic_nodes(spec)
    lut = np.ascontiguousarray(_lut(spec.rescale_factor, spec.image_mean, spec.image_std).reshape(-1))
    offsets = (np.arange(3, dtype=np.int64) * 256).reshape(1, 3, 1, 1)
    inits = [numpy_helper.from_array(lut, _PREFIX + "lut"), numpy_helper.from_array(offsets, _PREFIX + "offsets")]
    nodes = [
        helper.make_node("Transpose", [INPUT_NAME], [_PREFIX + "nchw"], perm=[0, 3, 1, 2], name=_PREFIX + "transpose"),
        helper.make_node("Cast", [_PREFIX + "nchw"], [_PREFIX + "idx"], to=TensorProto.INT64, name=_PREFIX + "cast"),
        helper.make_node("Add", [_PREFIX + "idx", _PREFIX + "offsets"], [_PREFIX + "lut_idx"], name=_PREFIX + "add"),
        helper.make_node("Gather", [_PREFIX + "lut", _PREFIX + "lut_idx"], [FLOAT_INPUT], axis=0,
                         name=_PREFIX + "normalize"),
    ]
    return nodes, inits


def add_uint8_input(src: str | Path, dst: str | Path, spec: PreprocessSpec) -> Path:
    """Write ``dst``: the float graph ``src`` behind a uint8 NHWC ``pixel_values`` input (see module doc)."""
    model = onnx.load(str(src))
    graph = model.graph
    inputs = [i for i in graph.input if i.name == INPUT_NAME]
    if len(inputs) != 1 or inputs[0].type.tensor_type.elem_type != TensorProto.FLOAT:
        raise ExportError(f"{src}: expected one float32 input named {INPUT_NAME!r}, found "
                          f"{[(i.name, i.type.tensor_type.elem_type) for i in graph.input]}")
    batch = inputs[0].type.tensor_type.shape.dim[0]
    batch_dim = batch.dim_param or (batch.dim_value if batch.dim_value else "batch")
    for node in graph.node:
        node.input[:] = [FLOAT_INPUT if x == INPUT_NAME else x for x in node.input]
    nodes, inits = _prefix_nodes(spec)
    h, w = spec.output_hw
    new_input = helper.make_tensor_value_info(INPUT_NAME, TensorProto.UINT8, [batch_dim, h, w, 3])
    graph.input.remove(inputs[0])
    graph.input.insert(0, new_input)
    graph.initializer.extend(inits)
    kept = list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes + kept)
    onnx.save(model, str(dst))
    check_onnx(dst)
    return Path(dst)
