"""Cross-layer equalization of CNN graphs and the channel-imbalance fixture it is for."""
from __future__ import annotations

import warnings

import numpy as np
import onnx
import onnxruntime as ort
import torch

import imgembed
from imgembed.export import recipes
from imgembed.export.equalize import equalize
from imgembed.export.onnx_export import export_onnx
from imgembed.export.pipeline import ExportOptions, export_model
from imgembed.models.families import load_original
from imgembed.runtime.host import int8_kernels
from imgembed.testing.outliers import add_conv_channel_imbalance

from .helpers import manifest_json


def _run(path, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"pixel_values": x})[0]


def _ranges(path) -> list[float]:
    """Largest / smallest output-channel weight range of each Conv of a graph."""
    from onnx import numpy_helper

    model = onnx.load(str(path))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    out = []
    for n in model.graph.node:
        if n.op_type == "Conv" and n.input[1] in inits:
            r = np.abs(inits[n.input[1]]).reshape(inits[n.input[1]].shape[0], -1).max(axis=1)
            out.append(float(r.max() / r.min()))
    return out


def test_fixture_and_equalization_keep_the_function(tmp_path):
    spec = imgembed.get_spec("test-resnet-tiny")
    head = load_original(spec, random_init=True)
    x = torch.randn(3, 3, *spec.input_hw)
    with torch.no_grad():
        before = head(x).numpy()
        record = add_conv_channel_imbalance(head.model, scale=40.0)
        after = head(x).numpy()
    assert record["chains"] == 8 and record["scale"] == 40.0
    np.testing.assert_allclose(after, before, atol=1e-5)
    plain = export_onnx(head, spec, tmp_path / "plain.onnx")
    rec = equalize(plain, tmp_path / "cle.onnx")
    assert rec["pairs"] == 8 and rec["worst_ratio_before"] > 40 and rec["worst_ratio_after"] < 3
    np.testing.assert_allclose(_run(tmp_path / "cle.onnx", x.numpy()), before, atol=1e-5)
    assert max(_ranges(tmp_path / "cle.onnx")) < max(_ranges(plain))
    names = {t.name for t in onnx.load(str(tmp_path / "cle.onnx")).graph.initializer}
    used = {i for n in onnx.load(str(tmp_path / "cle.onnx")).graph.node for i in n.input}
    assert names <= used  # the replaced weights are gone, not left as dead initializers


def test_depthwise_chain_and_unsafe_patterns(tmp_path):
    """Conv -> ReLU -> depthwise Conv is equalized; a ReLU output read twice, or a non-ReLU between, is not."""

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Conv2d(3, 8, 3, padding=1)
            self.dw = torch.nn.Conv2d(8, 8, 3, padding=1, groups=8)
            self.b = torch.nn.Conv2d(8, 6, 1)
            self.c = torch.nn.Conv2d(6, 6, 1)

        def forward(self, x):
            y = torch.relu(self.a(x))
            y = torch.relu(self.dw(y))
            z = torch.relu(self.b(y))
            return (self.c(z) + z).mean(dim=(2, 3))  # z read twice: b -> c is not a safe chain

    torch.manual_seed(0)
    net = Net().eval()
    with torch.no_grad():
        net.a.weight[2] *= 50
        net.a.bias[2] *= 50
        net.dw.weight[2] /= 50
        x = torch.randn(2, 3, 16, 16)
        ref = net(x).numpy()
        torch.onnx.export(net, (x,), str(tmp_path / "net.onnx"), dynamo=False, input_names=["pixel_values"],
                          opset_version=17)
    rec = equalize(tmp_path / "net.onnx", tmp_path / "cle.onnx")
    assert rec["pairs"] == 2  # a -> dw, dw -> b
    np.testing.assert_allclose(_run(tmp_path / "cle.onnx", x.numpy()), ref, atol=1e-5)
    assert _ranges(tmp_path / "cle.onnx")[0] < _ranges(tmp_path / "net.onnx")[0] / 5


def test_int8_export_of_an_imbalanced_cnn_passes_through_equalization(tmp_path):
    """Plain static INT8 fails the gate on the channel-imbalance fixture; the equalized candidate passes."""
    spec = imgembed.get_spec("test-resnet-tiny")
    head = load_original(spec, random_init=True)
    add_conv_channel_imbalance(head.model, scale=40.0)
    head.model.save_pretrained(str(tmp_path / "ckpt"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = export_model("test-resnet-tiny", tmp_path / "art",
                           ExportOptions(precision="int8", weights=tmp_path / "ckpt", backend="onnxruntime",
                                         speed_check=False))
    rows = {r["id"]: r for r in manifest_json(res)["selection"]["candidates"]}
    assert not rows[recipes.ORT_INT8_STATIC_QOPERATOR.id]["passed"]
    assert rows[recipes.ORT_INT8_STATIC_QOPERATOR.id]["metrics"]["min_cosine"] < 0.98
    assert rows[recipes.ORT_INT8_CLE.id]["passed"]
    seven = rows.get(recipes.ORT_INT8_CLE_7BIT.id)   # raced on a VNNI CPU only; wins untimed ties (portable)
    assert (seven is not None) == (int8_kernels("onnxruntime") == "vnni")
    assert res.manifest.default_engine == (recipes.ORT_INT8_CLE_7BIT.id if seven and seven["passed"]
                                              else recipes.ORT_INT8_CLE.id)
    assert rows[recipes.ORT_INT8_CLE.id]["metrics"]["min_cosine"] >= 0.99
    eq = res.manifest.export.quantization["equalization"]
    assert eq["pairs"] == 8 and eq["worst_ratio_after"] < eq["worst_ratio_before"]


def test_equalization_is_offered_to_cnns_only():
    from imgembed.export.recipes import plan

    assert not any("cle" in c.id for c in plan("int8", transformer=True))
    cnn = {c.id: c for c in plan("int8", transformer=False)}
    assert cnn[recipes.ORT_INT8_CLE.id].fallback_for == recipes.ORT_INT8_STATIC_QOPERATOR.id
    assert cnn[recipes.OV_INT8_CLE.id].fallback_for == recipes.OV_INT8.id
