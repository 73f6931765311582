"""INT8 engines that compute the same on every x86 CPU.

x86 CPUs without VNNI (AVX512_VNNI, AVX-VNNI, AMX-INT8) multiply uint8 activations by int8 weights with
VPMADDUBSW, which adds pairs of products in int16 with saturation; ONNX Runtime (MLAS) and OpenVINO (oneDNN)
both use it there. Full-range 8-bit weights then clip, so an engine gated on a VNNI CPU can drift on such a
CPU; 7-bit weights never clip. Exports race a 7-bit ONNX Runtime engine (the portable one), record which
engines need VNNI, give NNCF's overflow fix to every layer when the exporting CPU lacks VNNI, and
``load(backend="auto")`` passes engines that need VNNI over on CPUs without it.

oneDNN's AVX2 kernels run here through ONEDNN_MAX_CPU_ISA; ONNX Runtime's only under an emulated CPU
(``qemu-x86_64 -cpu Haswell``, skipped where qemu-user is not installed).
"""
from __future__ import annotations

import platform
import shutil
import subprocess
import sys
import warnings

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import imgembed
from imgembed.artifact import parse_manifest
from imgembed.export import recipes
from imgembed.export.pipeline import ExportOptions, export_model
from imgembed.runtime.backends import DegradedEngineWarning, select_engine
from imgembed.runtime.host import CPU_FLAGS_ENV, int8_kernels, int8_saturation

from .helpers import cli_env, cosine, manifest_json

pytest.importorskip("openvino")
pytest.importorskip("nncf")
if platform.machine().lower() not in ("x86_64", "amd64"):
    pytest.skip("int8 saturation is an x86 matter", allow_module_level=True)

AVX2_ONLY = "sse4_2,avx,avx2,fma"
VNNI = "sse4_2,avx,avx2,fma,avx512f,avx512_vnni"
MODEL = "test-vit-tiny"


def _export(out, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Int8SlowerWarning is expected on toy models
        return export_model(MODEL, out, ExportOptions(random_init=True, threads=2, precision="int8", **kw))


@pytest.fixture(scope="module")
def vnni_export(tmp_path_factory):
    """Every passing engine of an INT8 race on a CPU with VNNI (this one, or its flags simulated)."""
    mp = pytest.MonkeyPatch()
    if int8_kernels() != "vnni":
        mp.setenv(CPU_FLAGS_ENV, VNNI)   # the kernels stay this CPU's; the race is planned as on a VNNI CPU
    try:
        return _export(tmp_path_factory.mktemp("vnni") / "a", keep_candidates=True)
    finally:
        mp.undo()


@pytest.fixture(scope="module")
def avx2_export(tmp_path_factory):
    """The OpenVINO engines of an INT8 export planned as on a CPU without VNNI."""
    mp = pytest.MonkeyPatch()
    mp.setenv(CPU_FLAGS_ENV, AVX2_ONLY)
    try:
        return _export(tmp_path_factory.mktemp("avx2") / "a", backend="openvino", keep_candidates=True)
    finally:
        mp.undo()


def test_the_cpu_flags_decide_the_int8_kernels(monkeypatch):
    monkeypatch.setenv(CPU_FLAGS_ENV, AVX2_ONLY)
    assert int8_kernels() == "saturating"
    assert "lacks VNNI" in int8_saturation() and "saturate" in int8_saturation()
    for flags in (VNNI, "avx2,avx_vnni", "avx2,amx_int8"):
        monkeypatch.setenv(CPU_FLAGS_ENV, flags)
        assert int8_kernels() == "vnni" and int8_saturation() is None


def test_the_race_plans_a_portable_7bit_engine_and_marks_what_needs_vnni(monkeypatch):
    monkeypatch.setenv(CPU_FLAGS_ENV, VNNI)
    vit = {c.id: c for c in recipes.plan("int8", transformer=True)}
    assert vit[recipes.ORT_INT8_STATIC_QDQ_MATMUL.id].needs_vnni
    assert not vit[recipes.ORT_INT8_STATIC_QDQ_MATMUL.id].portable
    assert vit[recipes.ORT_INT8_STATIC_QDQ_MATMUL_7BIT.id].portable
    assert not vit[recipes.ORT_INT8_STATIC_QDQ_MATMUL_7BIT.id].needs_vnni
    assert vit[recipes.OV_INT8.id].needs_vnni and vit[recipes.ORT_INT8_SMOOTHQUANT.id].needs_vnni
    assert vit[recipes.ORT_INT8_SMOOTHQUANT_7BIT.id].portable
    assert vit[recipes.ORT_INT8_SMOOTHQUANT_7BIT.id].fallback_for == recipes.ORT_INT8_STATIC_QDQ_MATMUL_7BIT.id
    cnn = {c.id: c for c in recipes.plan("int8", transformer=False)}
    assert cnn[recipes.ORT_INT8_STATIC_QOPERATOR_7BIT.id].portable and cnn[recipes.ORT_INT8_STATIC_QDQ.id].needs_vnni
    assert cnn[recipes.ORT_INT8_CLE_7BIT.id].fallback_for == recipes.ORT_INT8_STATIC_QOPERATOR_7BIT.id
    monkeypatch.setenv(CPU_FLAGS_ENV, AVX2_ONLY)   # gated with the saturating kernels themselves: all portable
    for c in [*recipes.plan("int8", transformer=True), *recipes.plan("int8", transformer=False)]:
        assert not c.needs_vnni and not c.id.endswith(("smoothquant-7bit", "cle-7bit")), c.id
        assert c.portable or c.backend == "openvino", c.id
    forced = recipes.plan("int8", transformer=True, int8_preset="static-qdq-matmul")
    assert [c.id for c in forced] == [recipes.ORT_INT8_STATIC_QDQ_MATMUL.id]   # a forced preset has no twin


def _int8_weights(path) -> list[np.ndarray]:
    g = onnx.load(str(path)).graph
    return [numpy_helper.to_array(t) for t in g.initializer if t.data_type == onnx.TensorProto.INT8 and t.dims]


def test_7bit_weights_stay_in_half_the_int8_range(vnni_export):
    m = manifest_json(vnni_export)
    rows = {r["id"]: r for r in m["selection"]["candidates"]}
    assert rows[recipes.ORT_INT8_STATIC_QDQ_MATMUL_7BIT.id]["passed"], rows
    by_id = {e["id"]: e for e in m["engines"]}
    seven = _int8_weights(vnni_export.path / by_id[recipes.ORT_INT8_STATIC_QDQ_MATMUL_7BIT.id]["files"]["model"])
    assert seven and max(int(np.abs(w.astype(np.int16)).max()) for w in seven) <= 64
    assert by_id[recipes.ORT_INT8_STATIC_QDQ_MATMUL_7BIT.id]["quantization"]["preset"]["reduce_range"] is True
    if recipes.ORT_INT8_STATIC_QDQ_MATMUL.id in by_id:
        eight = _int8_weights(vnni_export.path / by_id[recipes.ORT_INT8_STATIC_QDQ_MATMUL.id]["files"]["model"])
        assert max(int(np.abs(w.astype(np.int16)).max()) for w in eight) == 127
        assert by_id[recipes.ORT_INT8_STATIC_QDQ_MATMUL.id]["needs_vnni"] is True
    for e in m["engines"]:
        if e["backend"] == "openvino":
            assert e["needs_vnni"] and e["quantization"]["overflow_fix"] == "disable"


def test_a_cpu_without_vnni_runs_a_portable_engine(vnni_export, monkeypatch):
    m = manifest_json(vnni_export.path)
    vnni_only = [e["id"] for e in m["engines"] if e.get("needs_vnni")]
    assert vnni_only and any(not e.get("needs_vnni") for e in m["engines"])
    monkeypatch.setenv(CPU_FLAGS_ENV, AVX2_ONLY)
    engine, notes = select_engine(parse_manifest({**m, "default_engine": vnni_only[0]}), "auto", "cpu")
    assert not engine.needs_vnni
    assert any(n.startswith(vnni_only[0] + ":") and "lacks VNNI" in n for n in notes), notes
    with warnings.catch_warnings():
        warnings.simplefilter("error", DegradedEngineWarning)   # a portable engine runs without a warning
        with imgembed.load(vnni_export.path, threads=2, workers=0) as emb:
            assert not emb.engine.needs_vnni
    only_vnni = parse_manifest({**m, "engines": [e for e in m["engines"] if e.get("needs_vnni")],
                                "default_engine": vnni_only[0]})
    with pytest.warns(DegradedEngineWarning, match="gated with VNNI int8 kernels but this CPU .*lacks VNNI.*"
                                                   "imgembed parity"):
        engine, _ = select_engine(only_vnni)
    assert engine.needs_vnni


def test_nncf_keeps_every_layer_7bit_when_the_cpu_lacks_vnni(avx2_export):
    m = manifest_json(avx2_export)
    ov = [e for e in m["engines"] if e["backend"] == "openvino"]
    assert ov, m["selection"]["candidates"]
    for e in ov:
        assert e["quantization"]["overflow_fix"] == "enable" and e["needs_vnni"] is False


OV_SCRIPT = """
import sys, numpy as np, imgembed
from imgembed.gate.samples import parity_images
emb = imgembed.load(sys.argv[1], backend="openvino", threads=2, workers=0)
np.save(sys.argv[2], emb.embed([i for _, i in parity_images()[:6]]))
"""


def _ov_vectors(artifact, out, **env):
    proc = subprocess.run([sys.executable, "-c", OV_SCRIPT, str(artifact), str(out)], capture_output=True,
                          text=True, env=cli_env(**env), timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return np.load(out)


def test_an_overflow_fixed_openvino_engine_gives_the_same_vectors_on_avx2_kernels(avx2_export, tmp_path):
    """oneDNN capped at AVX2 (VPMADDUBSW, saturating) against this CPU's own kernels."""
    native = _ov_vectors(avx2_export.path, tmp_path / "native.npy")
    capped = _ov_vectors(avx2_export.path, tmp_path / "avx2.npy", ONEDNN_MAX_CPU_ISA="AVX2")
    assert cosine(native, capped).min() >= 0.99999


ORT_SCRIPT = """
import sys, numpy as np, onnxruntime as ort
x = np.load(sys.argv[2])
s = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
np.save(sys.argv[3], s.run(None, {s.get_inputs()[0].name: x})[0])
"""


@pytest.mark.skipif(shutil.which("qemu-x86_64") is None, reason="qemu-user (qemu-x86_64) is not installed")
def test_the_7bit_onnxruntime_engine_is_exact_on_an_emulated_avx2_cpu(vnni_export, tmp_path):
    """ONNX Runtime's kernels on an emulated Haswell (AVX2, no VNNI) against this CPU's: the 7-bit engine gives
    the same vectors."""
    from imgembed.gate.samples import parity_images
    from imgembed.preprocess import resize_crop

    engine = next(e for e in manifest_json(vnni_export)["engines"] if e["id"].endswith("-7bit"))
    model = vnni_export.path / engine["files"]["model"]
    with imgembed.load(vnni_export.path, backend="onnxruntime", workers=0) as emb:
        crops = np.stack([resize_crop(img, emb.preprocess) for _, img in parity_images()[:6]])
        np.save(tmp_path / "x.npy", emb.model_input(crops))
    outs = []
    for prefix in ([], ["qemu-x86_64", "-cpu", "Haswell"]):
        proc = subprocess.run([*prefix, sys.executable, "-c", ORT_SCRIPT, str(model), str(tmp_path / "x.npy"),
                               str(tmp_path / f"{len(prefix)}.npy")], capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        outs.append(np.load(tmp_path / f"{len(prefix)}.npy"))
    assert cosine(outs[1], outs[0]).min() >= 0.99999


def test_a_forced_7bit_preset_is_one_portable_engine(tmp_path):
    m = manifest_json(_export(tmp_path / "a", int8_preset="static-qdq-matmul-7bit", backend="onnxruntime"))
    assert [e["id"] for e in m["engines"]] == [recipes.ORT_INT8_STATIC_QDQ_MATMUL_7BIT.id]
    engine = m["engines"][0]
    assert engine["needs_vnni"] is False and engine["quantization"]["preset"]["reduce_range"] is True
    weights = _int8_weights(tmp_path / "a" / engine["files"]["model"])
    assert weights and max(int(np.abs(w.astype(np.int16)).max()) for w in weights) <= 64
