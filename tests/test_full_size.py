"""Tier 1: one full-size architecture per family (random weights), FP32 and INT8, through the real gate.

These take minutes on 2 cores (the default run includes them; deselect with -m "not slow"). They build the
ONNX Runtime engine; the engine race is tested on tiny models (tests/test_engines.py) and measured at full
size by benchmarks/peers.py.
"""
from __future__ import annotations

import warnings

import onnx
import pytest

from imgembed.artifact import MODEL_FILE
from imgembed.export.onnx_export import op_counts
from imgembed.export.pipeline import ExportOptions, export_model
from imgembed.models.registry import get_spec

from .helpers import manifest_json

FULL = ("clip-vit-b32", "vit-b16", "dinov2-small", "resnet50")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def full_artifacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("full")
    cache = {}

    def get(name: str, precision: str):
        if (name, precision) not in cache:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                cache[name, precision] = export_model(
                    name, root / f"{name}-{precision}",
                    ExportOptions(precision=precision, random_init=True, speed_check=False,
                                  backend="onnxruntime")).path
        return cache[name, precision]

    return get


@pytest.mark.parametrize("name", FULL)
@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_full_size_export_passes_the_gate(full_artifacts, name, precision):
    m = manifest_json(full_artifacts(name, precision))
    spec = get_spec(name)
    assert m["status"] == "passed" and m["output"]["dim"] == spec.embedding.dim
    for key, limit in spec.thresholds(precision).items():
        assert m["parity"]["metrics"][key] >= limit, (key, m["parity"]["metrics"])
    assert set(m["parity"]["by_batch_size"]) == {"1", "3", "8"}


@pytest.mark.parametrize("name", ["clip-vit-b32", "vit-b16", "dinov2-small"])
def test_full_size_transformers_fuse_attention_and_quantize_every_matmul(full_artifacts, name):
    layers = get_spec(name).arch["num_hidden_layers"]
    m = manifest_json(full_artifacts(name, "fp32"))
    assert m["export"]["fused_ops"]["Attention"] == layers
    model = onnx.load(str(full_artifacts(name, "int8") / MODEL_FILE))
    producers = {out: n.op_type for n in model.graph.node for out in n.output}
    matmuls = [n for n in model.graph.node if n.op_type == "MatMul"]
    # static Q/DQ: Q, K, V, the two attention products, the output projection and both MLP matmuls per layer
    assert len(matmuls) >= 8 * layers
    assert all(producers.get(i) == "DequantizeLinear" for n in matmuls for i in n.input)


def test_full_size_resnet_int8_quantizes_every_conv(full_artifacts):
    fp32 = op_counts(full_artifacts("resnet50", "fp32") / MODEL_FILE)
    int8 = manifest_json(full_artifacts("resnet50", "int8"))
    assert int8["export"]["quantization"]["preset"]["mode"] == "static"
    ops = op_counts(full_artifacts("resnet50", "int8") / MODEL_FILE)
    assert fp32["Conv"] == 53
    if int8["export"]["quantization"]["preset"]["quant_format"] == "QOperator":
        assert ops.get("QLinearConv", 0) == 53 and ops.get("Conv", 0) == 0
    else:  # QDQ: float Convs fed by DequantizeLinear weights and activations
        assert ops.get("DequantizeLinear", 0) >= 2 * 53
