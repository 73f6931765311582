"""Mixed-precision INT8 (imgembed.export.mixed_precision): float layers switched by surgery on the quantized graph
come back to the float function when every layer is switched, MACs are counted per layer, and the shortest
passing prefix is found with few attempts."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from imgembed.export.int8_search import _embed, score
from imgembed.export.mixed_precision import _shortest_passing, keep_float, layers
from imgembed.export.onnx_export import INPUT_NAME
from imgembed.export.quantize import PRESETS, prepare_static, quantize

from .byo_models import depthwise_separable


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    d = tmp_path_factory.mktemp("mixed")
    torch.manual_seed(0)
    model = depthwise_separable().eval()
    torch.onnx.export(model, torch.randn(1, 3, 64, 64), str(d / "plain.onnx"), input_names=[INPUT_NAME],
                      output_names=["out"], dynamic_axes={INPUT_NAME: {0: "n"}, "out": {0: "n"}}, opset_version=17,
                      dynamo=False)
    pixels = np.random.default_rng(0).normal(size=(16, 3, 64, 64)).astype(np.float32)
    batches = [pixels[:8], pixels[8:]]
    prepped = prepare_static(d / "plain.onnx", d / "prepped.onnx")
    full = quantize(d / "plain.onnx", d / "int8.onnx", PRESETS["static-qdq"], batches)
    with torch.no_grad():
        reference = model(torch.from_numpy(pixels)).numpy()
    return d, prepped, full, batches, reference


def test_every_layer_kept_float_is_the_float_function(graphs):
    d, prepped, full, batches, reference = graphs
    convs = layers(prepped, PRESETS["static-qdq"].op_types)
    assert {la.op_type for la in convs} >= {"Conv"}
    floated = keep_float(full, prepped, [la.name for la in convs], d / "all-float.onnx")
    assert score(floated, batches, reference)["min_cosine"] > 0.99999
    error = {p.name: np.abs(_embed(p, batches, None) - reference).max() for p in (floated, full)}
    # a zero Pad in front of a float layer still reads its dequantized input: closer to float, not bit-exact
    assert error["all-float.onnx"] < 0.5 * error["int8.onnx"]


def test_macs_are_counted_per_image(graphs):
    _, prepped, _, _, _ = graphs
    by_name = {la.name: la for la in layers(prepped, ("Conv",))}
    stem = next(la for n, la in by_name.items() if "stem" in n)
    assert stem.macs == 32 * 32 * 16 * 3 * 3 * 3  # 32x32 outputs, 16 channels, 3x3x3 taps


@pytest.mark.parametrize("first", [1, 2, 5, 9, 10])
def test_shortest_passing_prefix(first):
    tried = []

    def attempt(k):
        tried.append(k)
        return k >= first

    assert _shortest_passing(10, attempt) == first
    assert len(tried) <= 8
    assert _shortest_passing(10, lambda k: False) is None
