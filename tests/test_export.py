"""Export per family (tiny configs): FP32 and INT8, parity at batch 1/3/8, graph structure, manifests,
the failing gate, and atomic writes."""
from __future__ import annotations

import json
import warnings

import numpy as np
import onnx
import pytest

import imgembed
from imgembed.artifact import MANIFEST, MODEL_FILE, read_manifest, sha256_file
from imgembed.errors import ArtifactError, ExportError, ParityError
from imgembed.export import recipes
from imgembed.export.onnx_export import op_counts
from imgembed.export.pipeline import ExportOptions, calibration_batches, export_model
from imgembed.gate.samples import parity_images
from imgembed.models.registry import _load, get_spec
from imgembed.runtime.host import int8_kernels

from .conftest import TINY
from .helpers import manifest_json

TRANSFORMERS = ("test-clip-tiny", "test-vit-tiny", "test-dinov2-tiny")


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_export_passes_parity_at_batch_1_3_8(artifact_dir, name, precision):
    path = artifact_dir(name, precision)
    m = manifest_json(path)
    rep = m["parity"]
    assert m["status"] == "passed" and rep["passed"] and rep["precision"] == precision
    assert set(rep["by_batch_size"]) == {"1", "3", "8"}
    assert len(rep["images"]) == len(parity_images())
    limits = get_spec(name).thresholds(precision)
    for key, limit in limits.items():
        assert rep["metrics"][key] >= limit
    if precision == "fp32":
        assert rep["metrics"]["max_abs"] < 1e-4


@pytest.mark.parametrize("name", TINY)
def test_onnx_graph_has_dynamic_batch_and_passes_checker(artifact_dir, name):
    model_path = artifact_dir(name, "fp32") / MODEL_FILE
    onnx.checker.check_model(str(model_path))
    model = onnx.load(str(model_path))
    (inp,) = model.graph.input
    dims = inp.type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch"
    h, w = get_spec(name).input_hw
    assert [d.dim_value for d in dims[1:]] == [3, h, w]
    assert model.graph.output[0].name == "embedding"


@pytest.mark.parametrize("name", TRANSFORMERS)
def test_transformer_int8_is_static_and_quantizes_every_matmul(artifact_dir, name):
    int8 = artifact_dir(name, "int8")
    m = manifest_json(int8)
    q = m["export"]["quantization"]
    # untimed: the first passing candidate (the 8-bit preset; its 7-bit twin where 8-bit fails on this CPU)
    assert m["default_engine"] in (recipes.ORT_INT8_STATIC_QDQ_MATMUL.id, recipes.ORT_INT8_STATIC_QDQ_MATMUL_7BIT.id)
    assert m["batch_invariant"] is True
    assert q["preset"]["mode"] == "static" and q["preset"]["op_types"] == ["MatMul", "Gemm"]
    model = onnx.load(str(int8 / MODEL_FILE))
    producers = {out: n.op_type for n in model.graph.node for out in n.output}
    matmuls = [n for n in model.graph.node if n.op_type == "MatMul"]
    # every MatMul (projections and attention alike) reads both operands through DequantizeLinear
    assert len(matmuls) >= 4 * get_spec(name).arch["num_hidden_layers"]
    assert all(producers.get(i) == "DequantizeLinear" for n in matmuls for i in n.input)
    assert "Softmax" in {n.op_type for n in model.graph.node}             # float: not quantized
    assert not any(producers.get(i) == "DequantizeLinear" for n in model.graph.node if n.op_type == "Softmax"
                   for i in n.input)


@pytest.mark.parametrize("name", TRANSFORMERS)
def test_transformer_fp32_graph_has_one_fused_attention_per_layer(artifact_dir, name):
    m = manifest_json(artifact_dir(name, "fp32"))
    layers = get_spec(name).arch["num_hidden_layers"]
    assert m["export"]["optimizations"][-1] == "ort-transformer-fusion"
    assert m["export"]["fused_ops"].get("Attention", 0) == layers
    assert m["export"]["op_counts"].get("Softmax", 0) == 0  # nothing left unfused
    assert m["export"]["fused_ops"].get("SkipLayerNormalization", 0) > 0


def test_cnn_int8_is_static_with_calibration(artifact_dir):
    m = manifest_json(artifact_dir("test-resnet-tiny", "int8"))
    q = m["export"]["quantization"]
    assert q["preset"]["mode"] == "static"
    assert q["calibration"]["images"] == 32 and "built-in" in q["calibration"]["source"]
    ort = {r["id"]: r for r in m["selection"]["candidates"] if r["backend"] == "onnxruntime"}
    vnni = int8_kernels("onnxruntime") == "vnni"
    outlier_recipes = {recipes.ORT_INT8_CLE.id, recipes.ORT_INT8_MIXED.id, recipes.ORT_INT8_ROUNDED.id,
                       *([recipes.ORT_INT8_CLE_7BIT.id] if vnni else [])}
    assert set(ort) == {recipes.ORT_INT8_STATIC_QOPERATOR.id, recipes.ORT_INT8_STATIC_QDQ.id,
                        recipes.ORT_INT8_STATIC_QOPERATOR_7BIT.id, *outlier_recipes}
    for recipe in outlier_recipes:   # equalization, rounding, mixed precision only where the presets fail
        assert ort[recipe]["why_not"].startswith("not needed"), ort[recipe]
    ops = op_counts(artifact_dir("test-resnet-tiny", "int8") / MODEL_FILE)
    assert ops.get("QLinearConv", 0) + ops.get("QuantizeLinear", 0) > 0
    assert ops.get("Conv", 0) == 0 or q["preset"]["quant_format"] == "QDQ"


def test_manifest_records_how_it_was_made(artifact_dir):
    path = artifact_dir("test-clip-tiny", "int8")
    m = manifest_json(path)
    assert m["name"] == "test-clip-tiny" and m["precision"] == "int8" and m["opset"] == 17
    assert m["source"] == {"kind": "random-init", "seed": 0, "arch": dict(get_spec("test-clip-tiny").arch)}
    assert m["input"] == {"name": "pixel_values", "dtype": "float32", "shape": [None, 3, 64, 64], "layout": "NCHW",
                          "values": "preprocessed (rescaled and mean/std-normalised) RGB"}
    assert m["output"] == {"name": "embedding", "dim": 24, "normalized": True, "dtype": "float32"}
    assert m["preprocess"] == get_spec("test-clip-tiny").preprocess.to_dict()
    assert m["files"] == {MODEL_FILE: sha256_file(path / MODEL_FILE)}
    assert set(m["versions"]) >= {"torch", "transformers", "onnx", "onnxruntime", "imgembed"}
    assert json.loads((path / MANIFEST).read_text())["status"] == "passed"


def test_normalized_model_outputs_unit_vectors(artifact_dir):
    vecs = imgembed.load(artifact_dir("test-clip-tiny", "int8")).embed([img for _, img in parity_images()[:4]])
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)


@pytest.fixture
def strict_registry(tmp_path, monkeypatch):
    """A variant of test-vit-tiny whose FP32 gate cannot pass (max_abs must be exactly 0)."""
    src = get_spec("test-vit-tiny").to_dict()
    src.pop("name")
    src["parity"] = {"fp32": {"min_cosine": 0.99999, "max_abs": 0.0}}
    path = tmp_path / "strict.yaml"
    path.write_text(json.dumps({"models": {"strict-vit": src}}))  # JSON is valid YAML
    monkeypatch.setenv("IMGEMBED_MODELS", str(path))
    _load.cache_clear()
    yield "strict-vit"
    monkeypatch.delenv("IMGEMBED_MODELS")
    _load.cache_clear()


def test_failing_gate_leaves_no_artifact_and_names_each_metric(tmp_path, strict_registry):
    out = tmp_path / "exports" / "out"
    with pytest.raises(ParityError) as info:
        export_model(strict_registry, out, ExportOptions(random_init=True))
    msg = str(info.value)
    assert "failed the parity gate on every engine (onnxruntime-fp32: max_abs = " in msg
    assert "no artifact written" in msg
    assert "max_abs = " in msg and "required <= 0.0" in msg
    assert info.value.report.passed is False
    assert not out.exists()
    assert [p for p in out.parent.iterdir() if not p.name.endswith(".lock")] == []  # no staging/work dirs


def test_keep_failed_marks_manifest_and_load_refuses_it(tmp_path, strict_registry):
    out = tmp_path / "kept"
    res = export_model(strict_registry, out, ExportOptions(random_init=True, keep_failed=True))
    assert res.manifest.status == "failed" and read_manifest(out).status == "failed"
    with pytest.raises(ArtifactError, match="failed its parity gate"):
        imgembed.load(out)
    assert imgembed.load(out, allow_failed=True).dim == 32


def test_reexport_replaces_previous_artifact_atomically(tmp_path):
    out = tmp_path / "a"
    export_model("test-resnet-tiny", out, ExportOptions(random_init=True, seed=1, speed_check=False))
    first = read_manifest(out).files[MODEL_FILE]
    export_model("test-resnet-tiny", out, ExportOptions(random_init=True, seed=2, speed_check=False))
    assert read_manifest(out).files[MODEL_FILE] != first
    leftovers = sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock"))  # lock files stay
    assert leftovers == ["a"]


def test_refuses_to_overwrite_a_non_artifact_directory(tmp_path):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(ArtifactError, match="exists and is not an imgembed artifact"):
        export_model("test-resnet-tiny", out, ExportOptions(random_init=True, speed_check=False))
    assert (out / "notes.txt").read_text() == "keep me"


def test_calibration_directory_skips_unreadable_files(tmp_path):
    for i, (_, img) in enumerate(parity_images()[:5]):
        img.convert("RGB").save(tmp_path / f"{i}.jpg")
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    batches, info = calibration_batches(get_spec("test-resnet-tiny"), tmp_path, batch=2)
    assert [b.shape[0] for b in batches] == [2, 2, 1]
    assert info["images"] == 5 and len(info["skipped"]) == 1 and "broken.jpg" in info["skipped"][0]
    with pytest.raises(ExportError, match="holds no readable images"):
        calibration_batches(get_spec("test-resnet-tiny"), _empty(tmp_path))
    with pytest.raises(ExportError, match="calibration directory .*missing does not exist"):
        calibration_batches(get_spec("test-resnet-tiny"), tmp_path / "missing")


def _empty(tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    (d / "x.png").write_bytes(b"")
    return d


def test_unknown_precision_and_preset_are_typed_errors(tmp_path):
    with pytest.raises(ExportError, match="precision 'int4' is not supported"):
        export_model("test-vit-tiny", tmp_path / "x", ExportOptions(precision="int4", random_init=True))
    with pytest.raises(ExportError, match="unknown INT8 preset 'fast'; expected one of"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            export_model("test-vit-tiny", tmp_path / "y",
                         ExportOptions(precision="int8", random_init=True, int8_preset="fast"))


def test_dinov2_position_embeddings_are_interpolated_once_at_export(artifact_dir):
    """The 7x7 trained grid (98 px) is resized to the 4x4 grid of the 56 px input in PyTorch, not in the
    graph: no Resize node, and parity (checked by the gate) holds."""
    assert get_spec("test-dinov2-tiny").arch["image_size"] // 14 == 7
    ops = op_counts(artifact_dir("test-dinov2-tiny", "fp32") / MODEL_FILE)
    assert "Resize" not in ops and ops["Attention"] == 2


@pytest.mark.parametrize("name", ["test-clip-tiny", "test-resnet-tiny"])
def test_fp16_artifact_has_half_weights_float_io_and_fp32_normalisations(artifact_dir, name):
    path = artifact_dir(name, "fp16")
    model = onnx.load(str(path / MODEL_FILE))
    big = [t for t in model.graph.initializer if len(t.dims) >= 2]
    assert big and all(t.data_type == onnx.TensorProto.FLOAT16 for t in big)
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    fp32 = onnx.load(str(artifact_dir(name, "fp32") / MODEL_FILE))
    weight_bytes = [sum(len(t.raw_data) for t in m.graph.initializer if len(t.dims) >= 2) for m in (model, fp32)]
    assert weight_bytes[0] == pytest.approx(weight_bytes[1] / 2, rel=0.01)
    assert read_manifest(path).default_engine == recipes.ORT_FP16.id
