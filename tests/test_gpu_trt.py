"""TensorRT export and runtime: everything decidable without a GPU, on real graphs and fakes of TensorRT's API.

Pure Python: batch profiles, engine keys, compatibility between where an engine was built and where it is
loaded, chunking, network flags and precision settings per TensorRT generation (fakes of the ``tensorrt``
module), the graph checks on real exported ONNX, ``export --trt`` racing the TensorRT recipe through the gate
on a fake GPU (builder, runner and availability faked; everything else real), adding a plan for another GPU
to an artifact through the same race, and ``export --trt`` failing fast without TensorRT. Building and running
real engines: the ``trt-cuda-*`` runners of tests/test_runtime_conformance.py and the GPU test at the end
(skipped here).
"""
from __future__ import annotations

import dataclasses
import re
import shutil
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from imgembed.artifact import MANIFEST, MODEL_FILE, read_manifest, verify
from imgembed.errors import ArtifactError, BackendUnavailableError, EngineMismatchError, ExportError, ParityError
from imgembed.export import engines
from imgembed.export import recipes as R
from imgembed.export import tensorrt as trt_export
from imgembed.export.add_plan import add_engine
from imgembed.export.tensorrt import (
    TRT_INT8_PRESET,
    check_trt_onnx,
    configure_precision,
    network_creation_flags,
    prepare_trt_export,
    trt_export_overrides,
)
from imgembed.runtime import backends
from imgembed.runtime.gpu import GpuIdentity
from imgembed.runtime.runners.onnxruntime import OrtRunner
from imgembed.runtime.runners.tensorrt import TrtRunner, artifact_engine, tensorrt_unavailable
from imgembed.runtime.runners.tensorrt_plans import (
    DEFAULT_PROFILE,
    BatchProfile,
    EngineEnv,
    engine_key,
    engine_record,
    incompatibilities,
    parse_profile,
    plan_chunks,
    select_engine,
)

H100 = EngineEnv(GpuIdentity("NVIDIA H100 80GB HBM3", "9.0"), "10.5.0")
A100 = EngineEnv(GpuIdentity("NVIDIA A100-SXM4-40GB", "8.0"), "10.5.0")


# -- profiles, keys, compatibility, chunking ------------------------------------------------------------
def test_parse_profile_accepts_min_opt_max_and_names_bad_text():
    assert parse_profile("1,32,256") == BatchProfile(1, 32, 256) == DEFAULT_PROFILE
    assert parse_profile(" 4, 8 ,8") == BatchProfile(4, 8, 8)
    for bad, why in [("8,1,64", "1 <= min <= opt <= max"), ("0,1,2", "1 <= min"), ("1,2", "three comma-separated"),
                     ("a,b,c", "three comma-separated"), ("1,2,3,4", "three"), ("-1,2,3", "three")]:
        with pytest.raises(ValueError, match=why) as e:
            parse_profile(bad)
        assert repr(bad) in str(e.value)
    assert BatchProfile.from_dict(BatchProfile(2, 4, 16).to_dict()) == BatchProfile(2, 4, 16)


def test_engine_key_names_gpu_capability_version_precision_and_profile():
    key = engine_key(H100, "fp16", BatchProfile(1, 32, 256))
    assert key == "nvidia-h100-80gb-hbm3-sm90-trt10.5.0-fp16-b1-32-256"
    rec = engine_record(H100, "fp16", BatchProfile(1, 32, 256), parity={"passed": True})
    assert rec["file"] == f"engine-{key}.plan" and rec["gpu"] == {"name": "NVIDIA H100 80GB HBM3",
                                                                   "compute_capability": "9.0"}
    assert rec["tensorrt"] == "10.5.0" and rec["profile"] == {"min": 1, "opt": 32, "max": 256}
    others = {engine_key(A100, "fp16", DEFAULT_PROFILE), engine_key(H100, "fp32", DEFAULT_PROFILE),
              engine_key(H100, "fp16", BatchProfile(1, 8, 64)),
              engine_key(EngineEnv(H100.gpu, "10.6.0"), "fp16", DEFAULT_PROFILE)}
    assert key not in others and len(others) == 4
    with pytest.raises(ValueError, match="'bf16'"):
        engine_key(H100, "bf16", DEFAULT_PROFILE)


def test_incompatibilities_name_both_sides():
    rec = engine_record(H100, "fp16", DEFAULT_PROFILE)
    assert incompatibilities(rec, H100) == []
    assert incompatibilities(rec, A100) == [
        "built for GPU 'NVIDIA H100 80GB HBM3', this GPU is 'NVIDIA A100-SXM4-40GB'"]
    newer = EngineEnv(H100.gpu, "10.6.0")
    assert incompatibilities(rec, newer) == ["built with TensorRT 10.5.0, this machine has TensorRT 10.6.0"]
    same_name_other_cc = EngineEnv(GpuIdentity(H100.gpu.name, "9.1"), "10.6.0")
    assert len(incompatibilities(rec, same_name_other_cc)) == 2
    assert "compute capability 9.0" in incompatibilities(rec, same_name_other_cc)[0]


def test_select_engine_picks_this_machines_engine_or_explains_why_none_runs():
    h_small = engine_record(H100, "fp16", BatchProfile(1, 8, 64))
    h_big = engine_record(H100, "fp16", BatchProfile(1, 32, 256))
    a = engine_record(A100, "fp16", DEFAULT_PROFILE)
    h32 = engine_record(H100, "fp32", DEFAULT_PROFILE)
    assert select_engine([a, h_small, h_big, h32], H100, "fp16") is h_big     # largest max batch wins
    assert select_engine([a, h32], H100) is h32
    with pytest.raises(EngineMismatchError) as e:
        select_engine([a, h32], A100, "fp32", where="artifacts/x")
    msg = str(e.value)
    assert "artifacts/x" in msg and "NVIDIA H100 80GB HBM3" in msg and "NVIDIA A100-SXM4-40GB" in msg
    assert h32["file"] in msg and "imgembed export NAME --trt" in msg
    with pytest.raises(EngineMismatchError, match=r"no TensorRT engine at precision int8 \(engines: \['fp16'"):
        select_engine([a], A100, "int8")
    with pytest.raises(EngineMismatchError, match="has no TensorRT engine; build one"):
        select_engine([], H100)


def test_plan_chunks_splits_above_max_and_pads_below_min():
    assert plan_chunks(600, BatchProfile(1, 32, 256)) == [(0, 256, 256), (256, 512, 256), (512, 600, 88)]
    assert plan_chunks(3, BatchProfile(4, 8, 8)) == [(0, 3, 4)]
    assert plan_chunks(9, BatchProfile(4, 8, 8)) == [(0, 8, 8), (8, 9, 4)]
    assert plan_chunks(1, DEFAULT_PROFILE) == [(0, 1, 1)]
    with pytest.raises(ValueError, match="batch of 0"):
        plan_chunks(0, DEFAULT_PROFILE)


# -- builder decisions, against fakes of the tensorrt module -----------------------------------------------
class FakeConfig:
    def __init__(self):
        self.set, self.cleared = [], []

    def set_flag(self, f):
        self.set.append(f)

    def clear_flag(self, f):
        self.cleared.append(f)


class FakeLayer:
    def __init__(self, name, type_, outputs=1):
        self.name, self.type, self.num_outputs = name, type_, outputs
        self.precision, self.output_types = None, {}

    def set_output_type(self, i, t):
        self.output_types[i] = t


def fake_trt(strongly_typed: bool):
    flags = {"EXPLICIT_BATCH": 0} | ({"STRONGLY_TYPED": 5} if strongly_typed else {})
    builder_flags = ["TF32"] + ([] if strongly_typed else ["FP16", "INT8", "OBEY_PRECISION_CONSTRAINTS"])
    return SimpleNamespace(
        NetworkDefinitionCreationFlag=SimpleNamespace(**flags),
        BuilderFlag=SimpleNamespace(**{f: f for f in builder_flags}),
        LayerType=SimpleNamespace(**{t: t for t in ("NORMALIZATION", "SOFTMAX", "REDUCE", "UNARY", "CONVOLUTION",
                                                      "MATRIX_MULTIPLY", "ELEMENTWISE")}),
        float32="float32")


def fake_network():
    layers = [FakeLayer("ln", "NORMALIZATION"), FakeLayer("qk", "MATRIX_MULTIPLY"), FakeLayer("sm", "SOFTMAX"),
              FakeLayer("conv", "CONVOLUTION"), FakeLayer("l2", "REDUCE"), FakeLayer("sqrt", "UNARY", 2),
              FakeLayer("add", "ELEMENTWISE")]
    return SimpleNamespace(num_layers=len(layers), get_layer=layers.__getitem__, layers=layers)


def test_network_flags_strongly_typed_where_tensorrt_has_it_else_explicit_batch():
    assert network_creation_flags(fake_trt(strongly_typed=True)) == (1 << 5, True)
    assert network_creation_flags(fake_trt(strongly_typed=False)) == (1 << 0, False)


def test_strongly_typed_builds_take_precision_from_the_graph_and_keep_fp32_exact():
    trt, net = fake_trt(True), fake_network()
    for precision in ("fp32", "fp16", "int8"):
        config = FakeConfig()
        assert configure_precision(trt, config, net, precision, True) == {"typing": "strong", "fp32_pinned_layers": 0}
        assert config.set == [] and config.cleared == ["TF32"]
    assert net.layers and all(layer.precision is None for layer in net.layers)


def test_weakly_typed_fp16_pins_normalisation_softmax_reduce_and_unary_layers_to_fp32():
    trt, net, config = fake_trt(False), fake_network(), FakeConfig()
    info = configure_precision(trt, config, net, "fp16", False)
    assert info == {"typing": "weak", "fp32_pinned_layers": 4}
    assert config.set == ["FP16", "OBEY_PRECISION_CONSTRAINTS"] and config.cleared == ["TF32"]
    pinned = {layer.name: (layer.precision, layer.output_types) for layer in net.layers if layer.precision}
    assert pinned == {"ln": ("float32", {0: "float32"}), "sm": ("float32", {0: "float32"}),
                      "l2": ("float32", {0: "float32"}), "sqrt": ("float32", {0: "float32", 1: "float32"})}
    int8 = FakeConfig()
    configure_precision(trt, int8, fake_network(), "int8", False)
    assert int8.set == ["FP16", "INT8", "OBEY_PRECISION_CONSTRAINTS"]
    fp32 = FakeConfig()
    assert configure_precision(trt, fp32, fake_network(), "fp32", False)["fp32_pinned_layers"] == 0
    assert fp32.set == []


# -- which graphs TensorRT can build ----------------------------------------------------------------------------
def _graph(nodes, inits=(), opset=17, domain_opsets=()):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])
    g = helper.make_graph(nodes, "g", [x], [y], initializer=list(inits))
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset), *domain_opsets])


def _qdq(zero_point: np.ndarray):
    inits = [numpy_helper.from_array(np.array(0.1, np.float32), "s"), numpy_helper.from_array(zero_point, "z")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], name="q0"),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], name="dq0")]
    return _graph(nodes, inits)


def test_check_trt_onnx_names_every_problem():
    check_trt_onnx(_qdq(np.array(0, np.int8)))        # symmetric int8 Q/DQ at opset 17: fine
    with pytest.raises(ExportError, match="2 Q/DQ nodes whose zero point is not int8 zeros .*'q0'"):
        check_trt_onnx(_qdq(np.array(3, np.int8)))
    with pytest.raises(ExportError, match="zero point is not int8 zeros"):
        check_trt_onnx(_qdq(np.array(0, np.uint8)))
    with pytest.raises(ExportError, match="opset 13 < 17"):
        check_trt_onnx(_graph([helper.make_node("Relu", ["x"], ["y"])], opset=13))
    contrib = _graph([helper.make_node("FastGelu", ["x"], ["y"], domain="com.microsoft")],
                     domain_opsets=[helper.make_opsetid("com.microsoft", 1)])
    with pytest.raises(ExportError, match=r"contrib ops \['FastGelu'\]"):
        check_trt_onnx(contrib)
    dyn = _graph([helper.make_node("DynamicQuantizeLinear", ["x"], ["a", "b", "c"]),
                  helper.make_node("Identity", ["x"], ["y"])])
    with pytest.raises(ExportError, match=r"\['DynamicQuantizeLinear'\].*static-qdq-trt"):
        check_trt_onnx(dyn)


def test_fused_transformer_artifacts_are_refused_and_trt_exports_are_accepted(artifact_dir, tmp_path):
    from imgembed.export.pipeline import ExportOptions, export_model

    with pytest.raises(ExportError, match=r"contrib ops \[.*'Attention'.*--trt implies it"):
        check_trt_onnx(artifact_dir("test-vit-tiny", "fp32") / MODEL_FILE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = export_model("test-vit-tiny", tmp_path / "int8", ExportOptions(
            precision="int8", random_init=True, speed_check=False, **trt_export_overrides("int8", None)))
    assert res.manifest.status == "passed" and res.manifest.export.optimizations == []
    assert res.manifest.export.quantization["preset"]["name"] == TRT_INT8_PRESET
    model = onnx.load(str(res.path / MODEL_FILE))
    check_trt_onnx(model)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("QuantizeLinear") >= 10 and "MatMulInteger" not in ops and "LayerNormalization" in ops
    zero_points = [i for i in model.graph.initializer if i.name.endswith("zero_point")]
    assert zero_points and all(z.data_type == TensorProto.INT8 and not numpy_helper.to_array(z).any()
                               for z in zero_points)


def test_trt_export_overrides_and_prepare_fail_before_exporting():
    assert trt_export_overrides("fp32", None) == {"optimize": False}
    assert trt_export_overrides("fp16", None) == {"optimize": False}
    assert trt_export_overrides("int8", None) == {"optimize": False, "int8_preset": TRT_INT8_PRESET}
    with pytest.raises(ExportError, match="--int8-preset 'static-qdq' cannot be built by TensorRT"):
        trt_export_overrides("int8", "static-qdq")
    with pytest.raises(ValueError, match="--trt-batch '4,2,8'"):
        prepare_trt_export("fp32", "4,2,8")
    with pytest.raises(ExportError, match="--uint8-input"):
        prepare_trt_export("fp32", "1,2,4", "uint8")
    with pytest.raises(ExportError, match="--trt builds fp32/fp16/int8 engines, not bf16"):
        prepare_trt_export("bf16", "1,2,4")
    if tensorrt_unavailable("cuda") is None:
        pytest.skip("TensorRT and a GPU are present: nothing fails")
    with pytest.raises(BackendUnavailableError, match="--trt needs TensorRT and an NVIDIA GPU: "):
        prepare_trt_export("fp16", "1,8,64")


def test_without_a_gpu_the_trt_candidates_are_unavailable_and_the_export_fails_before_any_work(tmp_path,
                                                                                             monkeypatch):
    from imgembed.export import pipeline
    from imgembed.export.pipeline import ExportOptions, export_model

    reason = tensorrt_unavailable("cuda")
    if reason is None:
        pytest.skip("TensorRT and a GPU are present")
    for precision, recipe in [("fp32", R.TRT_FP32), ("fp16", R.TRT_FP16), ("int8", R.TRT_INT8)]:
        plan = R.plan(precision, kind="cnn", gpu=True)
        assert plan[-1].id == recipe.id and plan[-1].device == "cuda" and plan[-1].unavailable == reason  # listed
        assert [c.id for c in plan[:-1]] == [c.id for c in R.plan(precision, kind="cnn")]   # the CPU plan as is
        with pytest.raises(BackendUnavailableError, match=f"GPU engines were asked for.*{recipe.id}: "):
            engines.check_available(plan, precision)
    monkeypatch.setattr(pipeline, "load_original", lambda *a, **k: pytest.fail("the export did work"))
    out = tmp_path / "a"
    with pytest.raises(BackendUnavailableError, match="tensorrt-fp16: " + re.escape(reason)):
        export_model("test-resnet-tiny", out, ExportOptions(precision="fp16", random_init=True,
                                                             trt=trt_export.TrtOptions()))
    with pytest.raises(BackendUnavailableError, match="no engine can build a fp32 artifact.*tensorrt-fp32: "):
        export_model("test-resnet-tiny", out, ExportOptions(random_init=True, backend="tensorrt"))
    assert not out.exists()


def test_cli_export_trt_fails_fast_without_tensorrt(tmp_path):
    from imgembed.cli import app

    runner = CliRunner()
    bad = runner.invoke(app, ["export", "test-resnet-tiny", "--random-init", "--trt", "--trt-batch", "8,1,4",
                              "-o", str(tmp_path / "a")])
    assert bad.exit_code == 2 and "min=8, opt=1, max=4" in bad.output
    if tensorrt_unavailable("cuda") is None:
        pytest.skip("TensorRT and a GPU are present")
    res = runner.invoke(app, ["export", "test-resnet-tiny", "--random-init", "--trt", "-o", str(tmp_path / "a")])
    assert res.exit_code == 1 and "BackendUnavailableError" in res.output and "TensorRT" in res.output
    assert "Traceback" not in res.output and not (tmp_path / "a").exists()   # failed before exporting


def test_trt_runner_needs_an_engine_file_and_tensorrt(tmp_path):
    with pytest.raises(ArtifactError, match="engine .*missing.plan does not exist"):
        TrtRunner(tmp_path / "missing.plan", 8)
    if tensorrt_unavailable("cuda") is None:
        pytest.skip("TensorRT and a GPU are present")
    (tmp_path / "e.plan").write_bytes(b"not an engine")
    runner = TrtRunner(tmp_path / "e.plan", 8)
    with pytest.raises(BackendUnavailableError):
        runner.activate()
    assert not runner.is_active


# -- the race on a fake GPU: builder, runner and availability faked; graphs, gate, timing, records real ------------
class FakeTrtRunner(OrtRunner):
    """A "plan" of the fake builder (the very ONNX graph TensorRT was given) run by ONNX Runtime; with
    ``state["passed"]`` False its vectors are perturbed past any gate."""

    backend = "tensorrt"

    def __init__(self, plan, dim, state, name):
        super().__init__(plan, dim, name=name)
        self.state = state

    def _infer_impl(self, x):
        y = super()._infer_impl(x)
        if not self.state["passed"]:
            y = y + np.random.default_rng(0).standard_normal(y.shape).astype(y.dtype)
        return y


@pytest.fixture
def fake_gpu(monkeypatch):
    """An H100 with TensorRT 10.5: ``build_engine`` returns the graph it was given, the ``tensorrt`` row of the
    backend table opens it with :class:`FakeTrtRunner` (on ``cuda`` only) and says TensorRT is usable there."""
    state = {"env": H100, "passed": True, "built": [], "opened": [], "build_error": None}

    def build(onnx_path, precision, profile, env, **kw):
        state["built"].append((Path(onnx_path).name, precision, profile, env.gpu.name))
        if state["build_error"]:
            raise ExportError(state["build_error"])
        return Path(onnx_path).read_bytes(), {"typing": "strong", "build_seconds": 0.1}

    def open_trt(target, device, threads, precision):
        assert device == "cuda" and target.record.device == "cuda" and target.record.target is not None
        state["opened"].append(target.record.id)
        return FakeTrtRunner(target.file("plan"), target.output_dim, state, f"fake-tensorrt[{target.label}]")

    row = backends.get_backend("tensorrt")
    monkeypatch.setitem(backends.BACKENDS, "tensorrt", dataclasses.replace(
        row, open=open_trt, unavailable=lambda d: None if d == "cuda" else "TensorRT runs on CUDA GPUs only"))
    monkeypatch.setattr(trt_export, "build_engine", build)
    monkeypatch.setattr(trt_export, "current_env", lambda: state["env"])
    monkeypatch.setattr(trt_export, "tensorrt_unavailable", lambda device="cuda": None)
    return state


def _trt_export(tmp_path, precision="fp32", backend="onnxruntime", profile=BatchProfile(1, 8, 64), name="a"):
    from imgembed.export.pipeline import ExportOptions, export_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Int8SlowerWarning on a busy machine
        return export_model("test-resnet-tiny", tmp_path / name, ExportOptions(
            precision=precision, random_init=True, threads=2, backend=backend,
            trt=trt_export.TrtOptions(profile=profile)))


@pytest.mark.parametrize("precision, backend, graph", [("fp32", None, "exported.onnx"),
                                                       ("fp16", "onnxruntime", "fp16.onnx"),
                                                       ("int8", "onnxruntime", "int8.onnx")])
def test_trt_export_races_the_plan_through_the_gate_on_the_gpu_and_keeps_it_as_an_engine(
        tmp_path, fake_gpu, precision, backend, graph):
    import imgembed

    profile = BatchProfile(1, 8, 64)
    res = _trt_export(tmp_path, precision, backend, profile)
    assert fake_gpu["built"] == [(graph, precision, profile, H100.gpu.name)]    # the recipe's own graph
    trt_id = f"tensorrt-{precision}"
    assert fake_gpu["opened"] == [trt_id]   # opened once, on cuda: timed briefly, gated, then timed side by side
    m = verify(res.path)                                                         # the manifest validates
    cpu_ids = [c.id for c in R.plan(precision, kind="cnn", backend=backend)]
    rows = {r.id: r for r in m.selection.candidates}
    assert list(rows) == [*cpu_ids, trt_id]                                     # the CPU race as without --trt
    row = rows[trt_id]
    assert row.passed and row.why_not is None and row.backend == "tensorrt" and row.img_per_s > 0
    assert m.default_engine in cpu_ids and m.engine(m.default_engine).device == "cpu"
    key = engine_key(H100, precision, profile)
    e = m.engine(trt_id)
    assert (e.backend, e.precision, e.device, e.files) == (
        "tensorrt", precision, "cuda", {"plan": f"{trt_id}/engine-{key}.plan"})
    assert (e.target.key, e.target.gpu, e.target.tensorrt, e.target.profile) == (
        key, H100.gpu.to_dict(), "10.5.0", profile.to_dict())
    assert e.target.build["typing"] == "strong" and e.img_per_s == row.img_per_s
    assert e.parity == row.metrics and e.parity["min_cosine"] > 0.99
    if precision == "int8":
        assert e.quantization["preset"]["name"] == TRT_INT8_PRESET and e.quantization["calibration"]["images"] > 0
    plan, rec = artifact_engine(res.path, precision, env=H100)                # through the artifact's resolver
    assert rec["id"] == trt_id and plan.read() == (res.path / e.files["plan"]).read_bytes()
    check_trt_onnx(onnx.load_from_string(plan.read()))                        # what TensorRT was given
    vecs = imgembed.load(res.path, threads=1).embed([np.zeros((40, 50, 3), np.uint8)])   # the CPU path as ever
    assert vecs.shape == (1, m.output.dim)


def test_a_failing_trt_gate_or_build_is_a_failed_row_and_the_cpu_artifact_is_written(tmp_path, fake_gpu):
    fake_gpu["passed"] = False
    m = verify(_trt_export(tmp_path, name="gate").path)
    row = {r.id: r for r in m.selection.candidates}[R.TRT_FP32.id]
    assert not row.passed and "min_cosine" in row.why_not and row.img_per_s is None
    assert m.status == "passed" and [e.backend for e in m.engines] == ["onnxruntime"]
    assert fake_gpu["opened"] == [R.TRT_FP32.id]                                   # gated, never timed
    fake_gpu["passed"], fake_gpu["build_error"] = True, "TensorRT could not build a fp32 engine"
    m = verify(_trt_export(tmp_path, name="build").path)
    row = {r.id: r for r in m.selection.candidates}[R.TRT_FP32.id]
    assert not row.passed and row.why_not == "ExportError: TensorRT could not build a fp32 engine"
    assert m.status == "passed" and [e.backend for e in m.engines] == ["onnxruntime"]


def test_cli_export_trt_races_the_plan(tmp_path, fake_gpu):
    from imgembed.cli import app

    out = tmp_path / "cli"
    res = CliRunner().invoke(app, ["export", "test-resnet-tiny", "--random-init", "--trt", "--trt-batch", "1,4,16",
                                   "--backend", "onnxruntime", "--threads", "2", "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert "tensorrt-fp32" in res.output and "Traceback" not in res.output
    m = verify(out)
    assert m.engine(R.TRT_FP32.id).target.profile == {"min": 1, "opt": 4, "max": 16}
    assert fake_gpu["built"] == [("exported.onnx", "fp32", BatchProfile(1, 4, 16), H100.gpu.name)]   # once


def test_backend_tensorrt_exports_plans_only_and_the_plan_is_the_default(tmp_path, fake_gpu):
    from imgembed.export.pipeline import ExportOptions, export_model

    res = export_model("test-resnet-tiny", tmp_path / "gpu-only", ExportOptions(
        random_init=True, threads=2, backend="tensorrt"))
    m = verify(res.path)
    assert [r.id for r in m.selection.candidates] == [R.TRT_FP32.id] and m.default_engine == R.TRT_FP32.id
    assert m.engine(R.TRT_FP32.id).target.profile == DEFAULT_PROFILE.to_dict()


# -- adding a plan for another GPU to an artifact: the same recipe, race and gate -------------------------------
def test_add_engine_races_the_tensorrt_recipe_and_keeps_the_artifact_verifiable(artifact_dir, tmp_path, fake_gpu):
    import imgembed

    art = tmp_path / "resnet"
    shutil.copytree(artifact_dir("test-resnet-tiny", "fp32"), art)
    e = add_engine(art, trt_export.TrtOptions(profile=BatchProfile(1, 8, 64)))
    key = engine_key(H100, "fp32", BatchProfile(1, 8, 64))
    assert fake_gpu["built"] == [("exported.onnx", "fp32", BatchProfile(1, 8, 64), "NVIDIA H100 80GB HBM3")]
    assert fake_gpu["opened"] == [R.TRT_FP32.id]                                    # gated by the race, untimed
    assert (e.id, e.device, e.files, e.target.key) == (f"tensorrt-{key}", "cuda", {"plan": f"engine-{key}.plan"},
                                                       key)
    manifest = verify(art)                                    # checksums cover the engine
    assert f"engine-{key}.plan" in manifest.files and manifest.engines[-1] == e
    assert manifest.default_engine == "onnxruntime-fp32"                      # the CPU default is unchanged
    assert e.parity["min_cosine"] > 0.99 and e.target.build["typing"] == "strong"
    plan = artifact_engine(art, "fp32", env=H100)[0]  # through the artifact's resolver: verified bytes on read
    assert plan.path == art / e.files["plan"] and plan.read() == (art / e.files["plan"]).read_bytes()
    with pytest.raises(EngineMismatchError, match="built for GPU 'NVIDIA H100 80GB HBM3', this GPU is 'NVIDIA A100"):
        artifact_engine(art, env=A100)

    fake_gpu["env"] = A100                                    # the same artifact, built again on another GPU
    e_a = add_engine(art, trt_export.TrtOptions(profile=BatchProfile(1, 8, 64)))
    add_engine(art, trt_export.TrtOptions(profile=BatchProfile(1, 8, 64)))   # same key: replaced
    trt = [x for x in verify(art).engines if x.backend == "tensorrt"]
    assert [x.target.key for x in trt] == [key, e_a.target.key]
    assert artifact_engine(art, env=A100)[1]["gpu"]["name"] == "NVIDIA A100-SXM4-40GB"
    assert sorted(p.name for p in art.iterdir()) == sorted([MANIFEST, MODEL_FILE, e.files["plan"], e_a.files["plan"]])
    vecs = imgembed.load(art, threads=1).embed([np.zeros((40, 50, 3), np.uint8)])   # the CPU path is unchanged
    assert vecs.shape == (1, read_manifest(art).output.dim)


def test_add_engine_replaces_the_plan_an_export_raced_for_the_same_gpu(tmp_path, fake_gpu):
    res = _trt_export(tmp_path)
    key = verify(res.path).engine(R.TRT_FP32.id).target.key
    e = add_engine(res.path, trt_export.TrtOptions(profile=BatchProfile(1, 8, 64)))
    m = verify(res.path)
    assert e.target.key == key and [x.id for x in m.engines if x.backend == "tensorrt"] == [e.id]
    assert not (res.path / R.TRT_FP32.id).exists()                              # its plan went with it


def test_failing_engine_parity_leaves_the_artifact_untouched_and_fused_artifacts_get_a_plain_graph(
        artifact_dir, tmp_path, fake_gpu):
    art = tmp_path / "resnet"
    shutil.copytree(artifact_dir("test-resnet-tiny", "fp32"), art)
    before = (art / MANIFEST).read_bytes()
    fake_gpu["passed"] = False
    with pytest.raises(ParityError, match="plan of .* failed the parity gate .*min_cosine.*no engine written"):
        add_engine(art)
    assert (art / MANIFEST).read_bytes() == before and sorted(p.name for p in art.iterdir()) == [MANIFEST, MODEL_FILE]
    fake_gpu["passed"] = True
    vit = tmp_path / "vit"
    shutil.copytree(artifact_dir("test-vit-tiny", "fp32"), vit)
    with pytest.raises(ExportError, match="Attention"):
        check_trt_onnx(vit / MODEL_FILE)                      # the artifact's graph is fused ...
    e = add_engine(vit)                                       # ... TensorRT gets the plain export
    check_trt_onnx(onnx.load_from_string((vit / e.files["plan"]).read_bytes()))


# -- on a GPU with TensorRT (skipped elsewhere) ------------------------------------------------------------------
@pytest.mark.gpu
def test_real_engine_export_parity_and_reload(tmp_path):
    reason = tensorrt_unavailable("cuda")
    if reason:
        pytest.skip(f"TensorRT unavailable: {reason}")
    from imgembed.export.pipeline import ExportOptions, export_model
    from imgembed.models.registry import get_spec
    from imgembed.runtime.runners.tensorrt import load_trt_runner

    for precision in ("fp32", "fp16", "int8"):
        out = tmp_path / precision
        res = export_model("test-dinov2-tiny", out, ExportOptions(
            precision=precision, random_init=True, backend="onnxruntime",
            trt=trt_export.TrtOptions(profile=BatchProfile(1, 4, 16), cache_dir=tmp_path)))
        row = {r.id: r for r in res.manifest.selection.candidates}[f"tensorrt-{precision}"]
        assert row.passed, row.why_not
        assert res.manifest.engine(row.id).device == "cuda" and row.img_per_s > 0
        assert any(p.name.startswith("timing-") for p in tmp_path.iterdir())
        with load_trt_runner(out) as runner:
            hw = get_spec("test-dinov2-tiny").input_hw
            x = np.random.default_rng(0).standard_normal((37, 3, *hw)).astype(np.float32)
            assert runner.infer(x).shape == (37, read_manifest(out).output.dim)   # split above max 16
