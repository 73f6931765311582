"""The recipe registry: the candidate plan is computed from registered records, and a recipe (or a backend)
registered by a test alone is planned, built, gated and raced by a real export, then gone."""
from __future__ import annotations

import dataclasses
import shutil
import warnings

import onnx
import pytest

from imgembed.errors import BackendUnavailableError, ExportError
from imgembed.export import recipes as R
from imgembed.export.pipeline import ExportOptions, export_model
from imgembed.export.quantize import PRESETS, saturates
from imgembed.runtime import backends, host

from .helpers import manifest_json

# ------------------------------------------------------------------------------ the plan, as a table of records
PRESET_RECIPES = {r.preset: r for r in (R.ORT_INT8_STATIC_QDQ_MATMUL, R.ORT_INT8_STATIC_QDQ_MATMUL_7BIT,
                                        R.ORT_INT8_STATIC_QOPERATOR, R.ORT_INT8_STATIC_QOPERATOR_7BIT,
                                        R.ORT_INT8_STATIC_QDQ, *R.ORT_INT8_FORCED_ONLY.values())}
# full-range 8-bit weights
EIGHT_BIT_RECIPES = {R.ORT_INT8_SMOOTHQUANT, R.ORT_INT8_CLE, R.ORT_INT8_MIXED, R.ORT_INT8_ROUNDED}
FALLBACKS = {R.ORT_INT8_SMOOTHQUANT: R.ORT_INT8_STATIC_QDQ_MATMUL,
             R.ORT_INT8_SMOOTHQUANT_7BIT: R.ORT_INT8_STATIC_QDQ_MATMUL_7BIT,
             R.ORT_INT8_ROUNDED: R.ORT_INT8_STATIC_QDQ,
             R.ORT_INT8_CLE: R.ORT_INT8_STATIC_QOPERATOR, R.ORT_INT8_CLE_7BIT: R.ORT_INT8_STATIC_QOPERATOR_7BIT,
             R.OV_INT8_CLE: R.OV_INT8, R.OV_INT8_CLE_BF16: R.OV_INT8_BF16,
             R.OV_INT8_SMOOTHQUANT: R.OV_INT8, R.OV_INT8_SMOOTHQUANT_BF16: R.OV_INT8_BF16}
HOSTS = [(ort, ov, ov_reason, bf16_reason) for ort in (True, False) for ov in (True, False)
         for ov_reason in (None, "OpenVINO is not installed") for bf16_reason in (None, "no AVX512_BF16")]
TRT = {"fp32": R.TRT_FP32, "fp16": R.TRT_FP16, "int8": R.TRT_INT8}   # GPU recipes: planned only when asked for
NO_TRT = "TensorRT is not installed (No module named 'tensorrt')"


def expected_plan(precision: str, kind: str, preset: str | None, vnni: bool) -> list[R.Recipe]:
    """Today's candidate list, in race order (``vnni``: ONNX Runtime's int8 kernels here are VNNI ones)."""
    if precision == "fp32":
        return [R.ORT_FP32, R.OV_FP32]
    if precision == "bf16":  # no fast BF16 path in ONNX Runtime: its FP32 graph is the portable fallback
        return [R.OV_BF16, R.ORT_FP32]
    if precision == "fp16":
        return [R.ORT_FP16]
    if preset:
        return [PRESET_RECIPES[preset]]
    ov = [R.OV_INT8, R.OV_INT8_BF16]
    if kind == "cnn":
        return [R.ORT_INT8_STATIC_QOPERATOR, R.ORT_INT8_STATIC_QDQ, R.ORT_INT8_ROUNDED,
                R.ORT_INT8_STATIC_QOPERATOR_7BIT, R.ORT_INT8_CLE,
                *([R.ORT_INT8_CLE_7BIT] if vnni else []), *ov, R.OV_INT8_CLE, R.OV_INT8_CLE_BF16, R.ORT_INT8_MIXED]
    smoothquant = [R.ORT_INT8_SMOOTHQUANT, *([R.ORT_INT8_SMOOTHQUANT_7BIT] if vnni else [])]
    return [R.ORT_INT8_STATIC_QDQ_MATMUL, R.ORT_INT8_STATIC_QDQ_MATMUL_7BIT,
            *(smoothquant if kind == "transformer" else []),  # the text tower has no original to re-export
            *ov, R.OV_INT8_SMOOTHQUANT, R.OV_INT8_SMOOTHQUANT_BF16]


def expected_gpu_plan(precision: str, kind: str, preset: str | None, vnni: bool, gpu: bool) -> list[R.Recipe] | None:
    """``expected_plan`` with the TensorRT recipe of ``precision`` behind it when GPU engines are asked for;
    None when they are asked for and no GPU recipe builds that precision on that graph (an error)."""
    cpu = expected_plan(precision, kind, preset, vnni)
    if not gpu:
        return cpu
    return None if precision not in TRT or kind == "text" else [*cpu, TRT[precision]]


def expected_flags(r: R.Recipe, vnni: bool, vnni_ov: bool, ov: str | None, bf16: str | None,
                   trt: str | None = None) -> dict:
    if r.backend == "tensorrt":
        return {"portable": False, "needs_vnni": False, "unavailable": trt}
    if r.backend == "openvino":
        unavailable = ov or (bf16 if r.inference_precision == "bf16" else None)
        return {"portable": False, "needs_vnni": vnni_ov and r.precision == "int8", "unavailable": unavailable}
    eight_bit = r in EIGHT_BIT_RECIPES or (r.preset is not None and saturates(PRESETS[r.preset]))
    return {"portable": not (vnni and eight_bit), "needs_vnni": vnni and eight_bit, "unavailable": None}


@pytest.fixture
def host_as(monkeypatch):
    """``host_as(ort_vnni, ov_vnni, ov_reason, bf16_reason, trt_reason)``: plan as on such a host."""
    ov_backend, trt_backend = backends.get_backend("openvino"), backends.get_backend("tensorrt")

    def set_host(vnni: bool, vnni_ov: bool, ov: str | None, bf16: str | None, trt: str | None = NO_TRT) -> None:
        kernels = {"onnxruntime": vnni, "openvino": vnni_ov}
        monkeypatch.setattr(host, "int8_kernels", lambda b=None: "vnni" if kernels[b] else "saturating")
        monkeypatch.setitem(backends.BACKENDS, "openvino", dataclasses.replace(ov_backend, unavailable=lambda d: ov))
        monkeypatch.setitem(backends.BACKENDS, "tensorrt", dataclasses.replace(
            trt_backend, unavailable=lambda d: trt if d == "cuda" else f"TensorRT runs on CUDA GPUs only, not {d}"))
        monkeypatch.setattr(host, "missing_bf16_instructions", lambda: bf16)
    return set_host


def test_every_quantize_preset_has_a_recipe():
    assert set(PRESET_RECIPES) == set(PRESETS) and R.presets() == sorted(PRESETS)


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16", "int8"])
@pytest.mark.parametrize("kind", R.KINDS)
@pytest.mark.parametrize("gpu", [False, True], ids=["cpu-export", "gpu-engines-asked"])
def test_the_plan_is_the_table_of_records_on_every_host(host_as, precision, kind, gpu):
    """A plain export's plan is the CPU table, whatever the GPU; with GPU engines asked for (``--trt``) the
    TensorRT recipe of the precision follows it, on ``cuda``, unavailable with its reason where TensorRT is."""
    for (vnni, vnni_ov, ov, bf16), trt in [(h, t) for h in HOSTS for t in (NO_TRT, None)]:
        host_as(vnni, vnni_ov, ov, bf16, trt)
        for preset in [None, *PRESETS]:
            want = expected_gpu_plan(precision, kind, preset, vnni, gpu)
            if want is None:
                with pytest.raises(ExportError, match=f"no GPU engine recipe builds a {precision} {kind} engine"):
                    R.plan(precision, kind=kind, int8_preset=preset, gpu=gpu)
                continue
            for backend in (None, "onnxruntime", "openvino"):
                mine = [r for r in want if backend in (None, r.backend) or r.device != "cpu"]
                if all(r.device != "cpu" for r in mine):
                    with pytest.raises(ExportError, match=f"backend '{backend}' offers no {precision} candidate"):
                        R.plan(precision, kind=kind, int8_preset=preset, backend=backend, gpu=gpu)
                    continue
                got = R.plan(precision, kind=kind, int8_preset=preset, backend=backend, gpu=gpu)
                where = (vnni, vnni_ov, ov, bf16, trt, preset, backend)
                assert [c.id for c in got] == [r.id for r in mine], where
                for c, r in zip(got, mine, strict=True):
                    fallback = FALLBACKS.get(r)
                    assert c.build is r.builder and c.precision == r.precision
                    assert c.device == ("cuda" if r.backend == "tensorrt" else "cpu")
                    last_resort = R.LAST_RESORT if r is R.ORT_INT8_MIXED else None
                    assert c.fallback_for == (fallback.id if fallback else last_resort)
                    assert c.batch_invariant == (r.device == "cpu" and (r.preset is None
                                                                        or PRESETS[r.preset].mode == "static"))
                    assert {"portable": c.portable, "needs_vnni": c.needs_vnni, "unavailable": c.unavailable} == \
                        expected_flags(r, vnni, vnni_ov, ov, bf16, trt), (c.id, where)


def test_tensorrt_recipes_are_planned_alone_by_their_backend_and_never_for_bf16_or_text(host_as):
    host_as(True, True, None, None, None)
    for precision, recipe in TRT.items():
        assert [c.id for c in R.plan(precision, kind="cnn", backend="tensorrt")] == [recipe.id]
        assert R.get(recipe.id) is recipe and recipe.device == "cuda" and recipe.order > R.ORT_INT8_MIXED.order
    assert [r.id for r in R.recipes(backend="tensorrt")] == [r.id for r in TRT.values()]
    with pytest.raises(ExportError, match="backend 'tensorrt' offers no bf16 candidate"):
        R.plan("bf16", kind="cnn", backend="tensorrt")
    with pytest.raises(ExportError, match="backend 'tensorrt' offers no fp32 candidate"):
        R.plan("fp32", kind="text", backend="tensorrt")   # the text tower's token ids: CPU engines only


def test_a_plan_has_no_ties_and_the_legacy_flags_name_a_kind(host_as):
    host_as(True, True, None, None)
    for kind in R.KINDS:
        for precision in ("fp32", "bf16", "fp16", "int8"):
            orders = [R.get(c.id).order for c in R.plan(precision, kind=kind)]
            assert orders == sorted(set(orders)), (kind, precision, orders)
    for transformer, reexport, kind in [(True, True, "transformer"), (True, False, "text"), (False, True, "cnn"),
                                        (False, False, "cnn")]:
        assert [c.id for c in R.plan("int8", transformer=transformer, reexport=reexport)] == \
            [c.id for c in R.plan("int8", kind=kind)]
    assert R.ORT_INT8_MIXED.fallback_for == R.LAST_RESORT


def test_plan_and_registry_errors_name_the_choices():
    with pytest.raises(ExportError, match="precision 'int4' is not supported; expected one of fp32, bf16"):
        R.plan("int4", kind="cnn")
    with pytest.raises(ExportError, match=r"unknown INT8 preset 'bogus'; expected one of \['dynamic'"):
        R.plan("int8", kind="cnn", int8_preset="bogus")
    with pytest.raises(ExportError, match=r"unknown graph kind 'audio'; expected one of \['transformer'"):
        R.plan("int8", kind="audio")
    with pytest.raises(BackendUnavailableError, match="unknown backend 'tvm'"):
        R.plan("fp32", kind="cnn", backend="tvm")
    with pytest.raises(ExportError, match=f"recipe '{R.ORT_FP32.id}' is already registered"):
        R.register(R.ORT_FP32)
    with pytest.raises(ExportError, match=r"unknown recipe 'nope'; expected one of \["):
        R.get("nope")
    with pytest.raises(ExportError, match=r"unknown kinds \['audio'\]"):
        R.Recipe("x", "onnxruntime", "int8", _copy_fp32_graph, {"audio"})
    with pytest.raises(ExportError, match="fallback_for is a Recipe or LAST_RESORT"):
        R.Recipe("x", "onnxruntime", "int8", _copy_fp32_graph, fallback_for=R.ORT_FP32.id)
    stray = R.Recipe("stray", "onnxruntime", "int8", _copy_fp32_graph)
    with pytest.raises(ExportError, match="its fallback_for 'stray' is not registered"):
        R.register(R.Recipe("x", "onnxruntime", "int8", _copy_fp32_graph, fallback_for=stray))


# ------------------------------------------------------------------------------ a recipe added by a test alone
def _copy_fp32_graph(inputs, directory):
    """A stand-in INT8 builder: the FP32 graph, copied (it passes any gate)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "model.onnx"
    shutil.copyfile(inputs.plain_in_format(), path)
    return {"model": path}, {"copied": "fp32 graph"}


def _export(tmp_path, backend):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Int8SlowerWarning: the copy is no faster than FP32
        return export_model("test-resnet-tiny", tmp_path / (backend or "race"), ExportOptions(
            precision="int8", random_init=True, threads=2, keep_candidates=True, backend=backend))


def test_a_registered_int8_recipe_is_planned_built_gated_raced_and_unregistered(tmp_path):
    copy = R.Recipe("test-int8-copy", "onnxruntime", "int8", _copy_fp32_graph, {"cnn"}, order=105)
    with R.registered(copy):
        ids = [c.id for c in R.plan("int8", kind="cnn")]
        assert ids.index(copy.id) == ids.index(R.ORT_INT8_ROUNDED.id) + 1  # order 105: behind the presets
        assert ids.index(copy.id) == ids.index(R.ORT_INT8_STATIC_QOPERATOR_7BIT.id) - 1
        assert copy.id not in [c.id for c in R.plan("int8", kind="transformer")]
        m = manifest_json(_export(tmp_path, "onnxruntime"))
    rows = {r["id"]: r for r in m["selection"]["candidates"]}
    assert list(rows).index(copy.id) == list(rows).index(R.ORT_INT8_ROUNDED.id) + 1
    row = rows[copy.id]
    assert row["passed"] and row["why_not"] is None and row["img_per_s"] > 0      # gated and timed
    assert row["metrics"]["min_cosine"] > 0.9999                                  # the FP32 graph, copied
    engine = next(e for e in m["engines"] if e["id"] == copy.id)
    assert engine["quantization"]["copied"] == "fp32 graph"
    graph = onnx.load(str(tmp_path / "onnxruntime" / engine["files"]["model"]))
    assert not {n.op_type for n in graph.graph.node} & {"QLinearConv", "QuantizeLinear", "DequantizeLinear"}
    assert copy.id not in [r.id for r in R.recipes()] and copy.id not in [c.id for c in R.plan("int8", kind="cnn")]
    with pytest.raises(ExportError, match="unknown recipe 'test-int8-copy'"):
        R.get(copy.id)


def test_a_registered_backend_and_its_recipe_are_raced(tmp_path, monkeypatch):
    ort = backends.get_backend("onnxruntime")
    monkeypatch.setitem(backends.BACKENDS, "test-backend", backends.Backend(
        "test-backend", "artifact", lambda d: ("int8",), ort.open, lambda d: None, "ONNX Runtime under another name"))
    engine = R.Recipe("test-backend-int8", "test-backend", "int8", _copy_fp32_graph, {"cnn"}, order=250)
    with R.registered(engine):
        ids = [c.id for c in R.plan("int8", kind="cnn")]
        assert ids.index(engine.id) == ids.index(R.OV_INT8.id) - 1  # order 250: behind ONNX Runtime, before OpenVINO
        m = manifest_json(_export(tmp_path, "test-backend"))
    assert [r["id"] for r in m["selection"]["candidates"]] == [engine.id]
    (row,) = m["selection"]["candidates"]
    assert row["backend"] == "test-backend" and row["passed"] and row["img_per_s"] > 0
    assert m["default_engine"] == engine.id and m["selection"]["forced_backend"] == "test-backend"
    assert m["export"]["quantization"]["speed_check"]["fp32_ms"] > 0  # timed against ONNX Runtime's FP32 graph
    assert engine.id not in [r.id for r in R.recipes()]
