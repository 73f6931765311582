"""Outlier channels like trained weights (imgembed.testing.outliers) and the outlier-aware INT8 recipe
(imgembed.export.smoothquant, imgembed.export.int8_search).

Tiny models: the fixture is FP32-equivalent and creates the outliers; plain ONNX Runtime INT8 (static and
dynamic) passes the gate on the random-init model and fails on the outlier one; the smoothquant candidate
passes on it and records its recipe; the node-exclusion fallback stays within its budget.
Full size (slow): the same on clip-vit-b32 for the fixture and the static preset.
"""
from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch

from imgembed.errors import ParityError
from imgembed.export import recipes
from imgembed.export.pipeline import ExportOptions, calibration_set, export_model
from imgembed.export.smoothquant import activation_absmax, norm_linear_pairs, smooth
from imgembed.models.families import load_original
from imgembed.models.registry import get_spec
from imgembed.runtime.host import int8_kernels
from imgembed.testing.outliers import add_outlier_channels

from .helpers import manifest_json

TRANSFORMERS = ("test-clip-tiny", "test-vit-tiny", "test-dinov2-tiny", "test-dinov3-tiny", "test-siglip-tiny")


def _pixels(spec, n=4, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).standard_normal((n, 3, *spec.input_hw), dtype=np.float32))


def _spread(stats):
    """Smallest over pairs of max / median of the per-channel max |norm output|."""
    return min(float(s.max() / s.median()) for s in stats)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """save_pretrained directories of test-clip-tiny: the random-init model and the same with outliers."""
    root = tmp_path_factory.mktemp("outlier-ckpts")
    spec = get_spec("test-clip-tiny")
    head = load_original(spec, random_init=True)
    head.model.save_pretrained(root / "plain")
    add_outlier_channels(head.model, n_channels=4, scale=40.0)
    head.model.save_pretrained(root / "outlier")
    return {"plain": root / "plain", "outlier": root / "outlier"}


def _export(weights, out, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return export_model("test-clip-tiny", out, ExportOptions(precision="int8", weights=weights,
                                                                  speed_check=False, **kw))


@pytest.mark.parametrize("name", TRANSFORMERS)
def test_outlier_fixture_keeps_fp32_output_and_makes_outlier_channels(name):
    spec = get_spec(name)
    head = load_original(spec, random_init=True)
    x = _pixels(spec)
    with torch.no_grad():
        before = head(x)
        plain_spread = _spread(activation_absmax(head, norm_linear_pairs(head), [x.numpy()]))
        record = add_outlier_channels(head, n_channels=3, scale=40.0)
        after = head(x)
        outlier_spread = _spread(activation_absmax(head, norm_linear_pairs(head), [x.numpy()]))
    layers = spec.arch["num_hidden_layers"]
    assert record["pairs"] == 2 * layers + (name == "test-siglip-tiny")  # siglip: + the pooling head's norm
    assert float((after - before).abs().max()) <= 1e-5 * max(1.0, float(before.abs().max()))
    assert plain_spread < 5 and outlier_spread > 20  # 40x gamma: max/median of channel maxima ~ 40-60


def test_smoothing_is_fp32_equivalent_and_removes_the_outliers():
    spec = get_spec("test-vit-tiny")
    head = load_original(spec, random_init=True)
    add_outlier_channels(head)
    x = _pixels(spec)
    with torch.no_grad():
        before = head(x)
        stats = activation_absmax(head, norm_linear_pairs(head), [x.numpy()])
        record = smooth(head, stats, alpha=0.5)
        after = head(x)
        smoothed = _spread(activation_absmax(head, norm_linear_pairs(head), [x.numpy()]))
    assert float((after - before).abs().max()) <= 1e-5 * max(1.0, float(before.abs().max()))
    assert record["activation_max_over_median"]["before"] > 20 and smoothed < 5


@pytest.mark.parametrize("preset", ["static-qdq-matmul", "dynamic"])
def test_plain_onnxruntime_int8_fails_on_outliers_and_passes_without(checkpoints, tmp_path, preset):
    res = _export(checkpoints["plain"], tmp_path / "plain", int8_preset=preset, backend="onnxruntime")
    assert res.manifest.status == "passed"
    with pytest.raises(ParityError):
        _export(checkpoints["outlier"], tmp_path / "outlier", int8_preset=preset, backend="onnxruntime")


def test_smoothquant_candidate_passes_on_outliers_and_records_its_recipe(checkpoints, tmp_path):
    m = manifest_json(_export(checkpoints["outlier"], tmp_path / "art", backend="onnxruntime", keep_candidates=True))
    rows = {r["id"]: r for r in m["selection"]["candidates"]}
    assert not rows[recipes.ORT_INT8_STATIC_QDQ_MATMUL.id]["passed"]
    assert rows[recipes.ORT_INT8_SMOOTHQUANT.id]["passed"], rows[recipes.ORT_INT8_SMOOTHQUANT.id]["why_not"]
    # on a VNNI CPU its 7-bit twin (re-quantizing the same smoothed graph) is raced too and wins untimed ties
    seven = rows.get(recipes.ORT_INT8_SMOOTHQUANT_7BIT.id)
    assert (seven is not None) == (int8_kernels("onnxruntime") == "vnni")
    assert m["default_engine"] == (recipes.ORT_INT8_SMOOTHQUANT_7BIT.id if seven and seven["passed"]
                                   else recipes.ORT_INT8_SMOOTHQUANT.id) and m["batch_invariant"]
    if seven:
        engines = {e["id"]: e for e in m["engines"]}
        assert engines[recipes.ORT_INT8_SMOOTHQUANT_7BIT.id]["quantization"]["smoothquant"] == \
            engines[recipes.ORT_INT8_SMOOTHQUANT.id]["quantization"]["smoothquant"]   # one search, two widths
    recipe = m["export"]["quantization"]["smoothquant"]
    assert recipe["alpha"] in (0.5, 0.65, 0.8) and set(recipe["simulated_alphas"]) == {"0.5", "0.65", "0.8"}
    assert recipe["pairs"] == 4 and recipe["activation_max_over_median"]["before"] > 20
    assert m["export"]["op_counts"].get("QuantizeLinear", 0) > 0


def test_exclusion_fallback_keeps_sensitive_matmuls_float_within_budget(checkpoints, tmp_path):
    from imgembed.export.int8_search import smoothquant_int8
    from imgembed.export.quantize import PRESETS

    spec = get_spec("test-clip-tiny")
    head = load_original(spec, weights=checkpoints["outlier"])
    pixels, _, _ = calibration_set(spec, None)
    unreachable = {"min_cosine": 1.01, "mean_cosine": 1.01}
    q, _, record = smoothquant_int8(copy.deepcopy(head), spec, pixels[:16], tmp_path, PRESETS["static-qdq-matmul"],
                                    17, unreachable, alphas=(0.5,), max_excluded=0.25)
    assert record["alpha"] == 0.5 and record["exclusion_budget"] == max(1, int(0.25 * record["matmuls"]))
    assert len(record["excluded_nodes"]) == record["exclusion_budget"]
    assert record["matmuls"] == 2 * 6 + 1  # q, k, v, out, fc1, fc2 per layer + visual_projection
    import onnx

    graph = onnx.load(str(q)).graph
    producers = {o: n.op_type for n in graph.node for o in n.output}
    # an excluded MatMul reads no DequantizeLinear output
    float_matmuls = [n.name for n in graph.node if n.op_type == "MatMul"
                     and all(producers.get(i) != "DequantizeLinear" for i in n.input)]
    assert set(record["excluded_nodes"]) <= set(float_matmuls)


@pytest.mark.slow
def test_full_size_clip_outliers_break_static_int8_but_not_fp32(tmp_path):
    """clip-vit-b32 with random weights: the fixture keeps the FP32 embeddings, and the static Q/DQ preset
    that passes on the plain model fails the gate once the outlier channels are there."""
    spec = get_spec("clip-vit-b32")
    head = load_original(spec, random_init=True)
    x = _pixels(spec, n=2)
    with torch.no_grad():
        before = head(x)
        add_outlier_channels(head.model, n_channels=4, scale=40.0)
        after = head(x)
        spread = _spread(activation_absmax(head, norm_linear_pairs(head), [x.numpy()]))
    assert float((after - before).abs().max()) < 1e-4 and spread > 20
    head.model.save_pretrained(tmp_path / "outlier")
    with warnings.catch_warnings(), pytest.raises(ParityError):
        warnings.simplefilter("ignore")
        export_model("clip-vit-b32", tmp_path / "art", ExportOptions(
            precision="int8", weights=tmp_path / "outlier", int8_preset="static-qdq-matmul", backend="onnxruntime",
            speed_check=False, optimize=False))
