"""TensorRT export and runtime: everything decidable without a GPU, on real graphs and fakes of TensorRT's API.

Pure Python: batch profiles, engine keys, compatibility between where an engine was built and where it is
loaded, chunking, network flags and precision settings per TensorRT generation (fakes of the ``tensorrt``
module), the graph checks on real exported ONNX, the artifact update with an engine (builder and GPU
faked), and ``export --trt`` failing fast without TensorRT. Building and running real engines: the
``trt-cuda-*`` runners of tests/test_runtime_conformance.py and the GPU test at the end (skipped here).
"""
from __future__ import annotations

import shutil
import warnings
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from imgembed.artifact import MANIFEST, MODEL_FILE, read_manifest, verify
from imgembed.errors import ArtifactError, BackendUnavailableError, EngineMismatchError, ExportError, ParityError
from imgembed.export import tensorrt as trt_export
from imgembed.export.tensorrt import (
    TRT_INT8_PRESET,
    check_trt_onnx,
    configure_precision,
    network_creation_flags,
    prepare_trt_export,
    trt_export_overrides,
)
from imgembed.gate.parity import ParityReport
from imgembed.runtime.gpu import GpuIdentity
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
        prepare_trt_export("fp32", None, "4,2,8")
    with pytest.raises(ExportError, match="--uint8-input"):
        prepare_trt_export("fp32", None, "1,2,4", "uint8")
    if tensorrt_unavailable("cuda") is None:
        pytest.skip("TensorRT and a GPU are present: nothing fails")
    with pytest.raises(BackendUnavailableError, match="--trt needs TensorRT and an NVIDIA GPU: "):
        prepare_trt_export("fp16", None, "1,8,64")


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


# -- adding an engine to an artifact (builder, GPU and engine parity faked) ---------------------------------------
@pytest.fixture
def fake_gpu(monkeypatch):
    """TensorRT's build and the engine's parity run faked; everything else (checks, writes, records) real."""
    state = {"env": H100, "passed": True, "built": []}

    def build(onnx_path, precision, profile, env, **kw):
        state["built"].append((onnx_path.name, precision, profile, env.gpu.name))
        return f"engine {env.gpu.name} {precision} {profile}".encode(), {"typing": "strong", "build_seconds": 0.1}

    def parity(manifest, engine_path, options):
        assert engine_path.read_bytes().startswith(b"engine ")
        return ParityReport(manifest.precision, state["passed"],
                            [] if state["passed"] else ["min_cosine 0.9 < 0.99999"], {}, {}, {}, [])

    monkeypatch.setattr(trt_export, "build_engine", build)
    monkeypatch.setattr(trt_export, "engine_parity", parity)
    monkeypatch.setattr(trt_export, "current_env", lambda: state["env"])
    return state


def test_add_engine_writes_a_keyed_engine_and_keeps_the_artifact_verifiable(artifact_dir, tmp_path, fake_gpu):
    import imgembed

    art = tmp_path / "resnet"
    shutil.copytree(artifact_dir("test-resnet-tiny", "fp32"), art)
    rec = trt_export.add_engine(art, trt_export.TrtOptions(profile=BatchProfile(1, 8, 64)))
    assert fake_gpu["built"] == [(MODEL_FILE, "fp32", BatchProfile(1, 8, 64), "NVIDIA H100 80GB HBM3")]
    assert rec["key"] == "nvidia-h100-80gb-hbm3-sm90-trt10.5.0-fp32-b1-8-64" and (art / rec["file"]).is_file()
    manifest = verify(art)                                    # checksums cover the engine
    assert rec["file"] in manifest.files
    trt = [e for e in manifest.engines if e.backend == "tensorrt"]          # one engine list for every backend
    assert [(e.id, e.device, e.files, e.target.key) for e in trt] == [
        (f"tensorrt-{rec['key']}", "cuda", {"plan": rec["file"]}, rec["key"])]
    assert manifest.default_engine == "onnxruntime-fp32"                      # the CPU default is unchanged
    assert rec["parity"]["passed"] and rec["build"]["typing"] == "strong"
    plan = artifact_engine(art, "fp32", env=H100)[0]  # through the artifact's resolver: verified bytes on read
    assert plan.path == art / rec["file"] and plan.read() == (art / rec["file"]).read_bytes()
    with pytest.raises(EngineMismatchError, match="built for GPU 'NVIDIA H100 80GB HBM3', this GPU is 'NVIDIA A100"):
        artifact_engine(art, env=A100)

    fake_gpu["env"] = A100                                    # the same artifact, built again on another GPU
    rec_a = trt_export.add_engine(art, trt_export.TrtOptions(profile=BatchProfile(1, 8, 64)))
    trt_export.add_engine(art, trt_export.TrtOptions(profile=BatchProfile(1, 8, 64)))   # same key: replaced
    engines = [e for e in verify(art).engines if e.backend == "tensorrt"]
    assert [e.target.key for e in engines] == [rec["key"], rec_a["key"]]
    assert artifact_engine(art, env=A100)[1]["gpu"]["name"] == "NVIDIA A100-SXM4-40GB"
    assert sorted(p.name for p in art.iterdir()) == sorted([MANIFEST, MODEL_FILE, rec["file"], rec_a["file"]])
    vecs = imgembed.load(art, threads=1).embed([np.zeros((40, 50, 3), np.uint8)])   # the CPU path is unchanged
    assert vecs.shape == (1, read_manifest(art).output.dim)


def test_failing_engine_parity_or_a_fused_graph_leaves_the_artifact_untouched(artifact_dir, tmp_path, fake_gpu):
    art = tmp_path / "resnet"
    shutil.copytree(artifact_dir("test-resnet-tiny", "fp32"), art)
    before = (art / MANIFEST).read_bytes()
    fake_gpu["passed"] = False
    with pytest.raises(ParityError, match="engine of .* failed the parity gate .*min_cosine 0.9 < 0.99999.*no engine"):
        trt_export.add_engine(art)
    assert (art / MANIFEST).read_bytes() == before and sorted(p.name for p in art.iterdir()) == [MANIFEST, MODEL_FILE]
    vit = tmp_path / "vit"
    shutil.copytree(artifact_dir("test-vit-tiny", "fp32"), vit)
    with pytest.raises(ExportError, match="Attention"):
        trt_export.add_engine(vit)
    assert fake_gpu["built"] == [(MODEL_FILE, "fp32", DEFAULT_PROFILE, "NVIDIA H100 80GB HBM3")]  # vit never built


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
        export_model("test-dinov2-tiny", out, ExportOptions(precision=precision, random_init=True, speed_check=False,
                                                            **trt_export_overrides(precision, None)))
        rec = trt_export.add_engine(out, trt_export.TrtOptions(profile=BatchProfile(1, 4, 16), cache_dir=tmp_path))
        assert rec["parity"]["passed"] and rec["precision"] == precision
        assert any(p.name.startswith("timing-") for p in tmp_path.iterdir())
        with load_trt_runner(out) as runner:
            hw = get_spec("test-dinov2-tiny").input_hw
            x = np.random.default_rng(0).standard_normal((37, 3, *hw)).astype(np.float32)
            assert runner.infer(x).shape == (37, read_manifest(out).output.dim)   # split above max 16
