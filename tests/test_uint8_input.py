"""uint8 NHWC input artifacts: normalisation inside the graph, parity with the float-input artifact."""
from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest

import imgembed
from imgembed.errors import ExportError
from imgembed.export.pipeline import ExportOptions, export_model, recheck_artifact
from imgembed.gate.samples import parity_images
from imgembed.models.registry import get_spec
from imgembed.preprocess import preprocess_batch
from imgembed.preprocess.fast import crops_of, crops_to_pixels
from imgembed.runtime.runners.onnxruntime import OrtRunner

from .conftest import TINY
from .helpers import manifest_json


@pytest.fixture(scope="session")
def uint8_artifact(tmp_path_factory):
    """``uint8_artifact(name, precision)`` -> a uint8-input artifact, exported once per session."""
    root = tmp_path_factory.mktemp("uint8-artifacts")
    cache = {}

    def get(name: str, precision: str = "fp32"):
        if (name, precision) not in cache:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                cache[name, precision] = export_model(name, root / f"{name}-{precision}", ExportOptions(
                    precision=precision, random_init=True, speed_check=False, input_format="uint8"))
        return cache[name, precision]

    return get


@pytest.fixture(scope="module")
def images():
    return [img for _, img in parity_images()]


@pytest.mark.parametrize("name", TINY)
def test_uint8_artifact_equals_float_artifact_on_every_family(name, uint8_artifact, artifact_dir, images):
    res = uint8_artifact(name)
    spec = get_spec(name)
    h, w = spec.input_hw
    assert manifest_json(res)["input"] == {"name": "pixel_values", "dtype": "uint8", "shape": [None, h, w, 3],
                                     "layout": "NHWC", "values": manifest_json(res)["input"]["values"]}
    assert res.manifest.status == "passed" and "uint8-input" in res.manifest.export.optimizations
    assert res.manifest.parity.metrics["min_cosine"] >= 0.99999
    crops = crops_of(images, spec.preprocess)
    dim = spec.embedding.dim
    with OrtRunner(res.path / "model.onnx", dim) as u8, OrtRunner(artifact_dir(name) / "model.onnx", dim) as f32:
        assert u8.input_spec.dtype == "uint8" and u8.input_spec.shape == (None, h, w, 3)
        a, b = u8.infer(crops), f32.infer(preprocess_batch(images, spec.preprocess))
    # the in-graph normalisation gives the model part the very same float pixels: identical outputs
    np.testing.assert_array_equal(a, b)


def test_int8_uint8_artifact_matches_int8_float_artifact(uint8_artifact, artifact_dir, images):
    res = uint8_artifact("test-clip-tiny", "int8")
    spec = get_spec("test-clip-tiny")
    crops = crops_of(images, spec.preprocess)
    with OrtRunner(res.path / "model.onnx", 24) as u8, \
            OrtRunner(artifact_dir("test-clip-tiny", "int8") / "model.onnx", 24) as f32:
        for b in (1, 8):  # same batches -> same dynamic quantization ranges
            np.testing.assert_allclose(u8.infer(crops[:b]), f32.infer(crops_to_pixels(crops[:b], spec.preprocess)),
                                       rtol=0, atol=1e-6)
    assert res.manifest.parity.passed and res.manifest.export.quantization["quantized_ops"]


def test_graph_normalises_inside(uint8_artifact):
    model = onnx.load(str(uint8_artifact("test-vit-tiny").path / "model.onnx"))
    inp = model.graph.input[0]
    assert inp.name == "pixel_values" and inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    assert dims[1:] == [64, 64, 3] and isinstance(dims[0], str)  # dynamic batch axis
    assert [n.op_type for n in model.graph.node[:5]] == ["Transpose", "Cast", "Div", "Sub", "Div"]
    consts = {i.name.rsplit("_", 1)[-1]: onnx.numpy_helper.to_array(i) for i in model.graph.initializer
              if i.name.startswith("imgembed_uint8_")}
    assert consts["divisor"] == 255 and consts["mean"].ravel().tolist() == [0.5] * 3  # ViT: mean 0.5, std 0.5


def _identity_model(path, hw):
    """A float32 NCHW graph that returns its input flattened: shows exactly what the model part receives."""
    from onnx import TensorProto, helper

    h, w = hw
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["pixel_values"], ["embedding"], axis=1)], "identity",
        [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, ["batch", 3, h, w])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", 3 * h * w])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


@pytest.mark.parametrize("rescale", [1 / 255, 0.0037])
def test_prefix_reproduces_the_lookup_table_bit_for_bit(tmp_path, rescale):
    from dataclasses import replace

    from imgembed.export.uint8_input import add_uint8_input, arithmetic_is_exact

    spec = replace(get_spec("clip-vit-b32").preprocess, rescale_factor=rescale, size={"shortest_edge": 8},
                   crop_size={"height": 8, "width": 16})
    # 1/255: Div/Sub/Div arithmetic is exact; an odd factor falls back to the table itself (Gather)
    assert arithmetic_is_exact(spec) == (rescale == 1 / 255)
    model = add_uint8_input(_identity_model(tmp_path / "f.onnx", (8, 16)), tmp_path / "u.onnx", spec)
    ops = [n.op_type for n in onnx.load(str(model)).graph.node]
    assert ("Gather" in ops) == (rescale != 1 / 255)
    crops = np.arange(2 * 8 * 16 * 3).reshape(2, 8, 16, 3).astype(np.uint8)  # every value 0..255 occurs
    with OrtRunner(model, 3 * 8 * 16) as r:
        np.testing.assert_array_equal(r.infer(crops), crops_to_pixels(crops, spec).reshape(2, -1))


def test_embedder_picks_the_uint8_path_and_matches_float(uint8_artifact, artifact_dir, images, tmp_path):
    paths = []
    for i, img in enumerate(images[:6]):
        paths.append(tmp_path / f"{i}.png")
        img.save(paths[-1])
    u8 = imgembed.load(uint8_artifact("test-dinov2-tiny").path)
    f32 = imgembed.load(artifact_dir("test-dinov2-tiny"))
    assert (u8.input_format, f32.input_format) == ("uint8", "float32")
    np.testing.assert_allclose(u8.embed(paths, batch_size=4), f32.embed(paths, batch_size=4), rtol=0, atol=1e-6)
    crops = crops_of(images[:3], u8.preprocess)
    np.testing.assert_allclose(u8.embed_pixels(crops), f32.embed_pixels(crops_to_pixels(crops, f32.preprocess)),
                               atol=1e-6)


def test_parity_recheck_feeds_uint8_crops(uint8_artifact):
    report = recheck_artifact(uint8_artifact("test-resnet-tiny").path)
    assert report.passed and report.metrics["min_cosine"] >= 0.99999


def test_unknown_input_format_is_a_typed_error(tmp_path):
    with pytest.raises(ExportError, match=r"input_format 'uint16' is not supported; expected one of "
                                          r"\['float32', 'uint8'\]"):
        export_model("test-clip-tiny", tmp_path / "x", ExportOptions(random_init=True, input_format="uint16"))
