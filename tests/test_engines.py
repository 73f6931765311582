"""The engine race of an export and engine selection at load time.

Exports race ONNX Runtime static presets against OpenVINO (+ NNCF) at the requested precision, gate each
candidate, keep the fastest passing one as the default engine (plus a portable ONNX Runtime fallback), and
record the table in the manifest. ``load(backend="auto")`` picks the engine this host can run; an artifact
tuned on an AVX-512 BF16 host loads on an AVX2-only host (simulated with IMGEMBED_CPU_FLAGS).
"""
from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pytest

import imgembed
from imgembed.artifact import parse_manifest, read_manifest, sha256_file
from imgembed.errors import BackendUnavailableError, ExportError, IntegrityError
from imgembed.export import engines, recipes
from imgembed.export.pipeline import ExportOptions, export_model
from imgembed.gate.parity import BATCH_INVARIANCE_LIMIT
from imgembed.gate.samples import parity_images
from imgembed.runtime.backends import DegradedEngineWarning, engines_of, select_engine
from imgembed.runtime.host import CPU_FLAGS_ENV, missing_bf16_instructions

from .helpers import cosine, manifest_json, minimal_manifest, run_cli

pytest.importorskip("openvino")
pytest.importorskip("nncf")

AVX2_ONLY = "sse4_2,avx,avx2,fma"
MODEL = "test-vit-tiny"
needs_bf16 = pytest.mark.skipif(missing_bf16_instructions() is not None,
                                reason=f"BF16 needs AVX512_BF16/AMX: {missing_bf16_instructions()}")


def _export(tmp_path, name=MODEL, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Int8SlowerWarning is expected on toy models
        return export_model(name, tmp_path / f"{name}-{kw.get('precision', 'fp32')}",
                            ExportOptions(random_init=True, threads=2, **kw))


@pytest.fixture(scope="module")
def int8_all(tmp_path_factory):
    """An INT8 artifact holding every engine that passed (ONNX Runtime static + OpenVINO/NNCF)."""
    return _export(tmp_path_factory.mktemp("int8"), precision="int8", keep_candidates=True)


@pytest.fixture(scope="module")
def images():
    return [img for _, img in parity_images()[:6]]


def test_int8_race_records_every_candidate_and_keeps_the_fastest_passing_one(int8_all):
    m = manifest_json(int8_all)
    rows = {r["id"]: r for r in m["selection"]["candidates"]}
    assert {recipes.ORT_INT8_STATIC_QDQ_MATMUL.id, recipes.OV_INT8.id} <= set(rows)
    if rows[recipes.ORT_INT8_STATIC_QDQ_MATMUL.id]["passed"]:    # the outlier recipe is built only when needed
        assert rows[recipes.ORT_INT8_SMOOTHQUANT.id]["why_not"] == \
            f"not needed: {recipes.ORT_INT8_STATIC_QDQ_MATMUL.id} passed the gate"
    assert m["selection"]["cpu"]["flags"] and m["selection"]["batch_size"] == 8
    passing = [r for r in rows.values() if r["passed"]]
    assert passing, rows
    fastest = max(passing, key=lambda r: r["img_per_s"])
    default = rows[m["default_engine"]]
    assert default["id"] == fastest["id"] or (   # a portable twin within timing noise wins the tie
        default["portable"] and default["backend"] == fastest["backend"]
        and default["img_per_s"] >= fastest["img_per_s"] / (1 + engines.TIE))
    kept = {e["id"] for e in m["engines"]}
    assert kept == {r["id"] for r in passing}          # --keep-candidates keeps every passing engine
    for r in passing:                                  # static scales: batch-invariant, gated as such
        assert r["batch_invariant"] and r["metrics"]["batch_variation"] <= BATCH_INVARIANCE_LIMIT


def test_every_engine_file_is_checksummed(int8_all, tmp_path):
    m = manifest_json(int8_all)
    listed = {rel for e in m["engines"] for rel in e["files"].values()}
    assert listed and listed == set(m["files"])
    for rel in listed:
        assert m["files"][rel] == sha256_file(int8_all.path / rel)
    copy = tmp_path / "copy"
    shutil.copytree(int8_all.path, copy)
    ov = next(e for e in m["engines"] if e["backend"] == "openvino")
    (copy / ov["files"]["weights"]).write_bytes(b"tampered")
    with pytest.raises(IntegrityError, match=f"sha256 mismatch for .*{ov['files']['weights']}"):
        imgembed.load(copy, backend="openvino")


def test_each_engine_loads_by_name_and_gives_the_same_vectors(int8_all, images):
    ref = imgembed.load(MODEL, random_init=True, workers=0).embed(images)
    for engine in manifest_json(int8_all)["engines"]:
        emb = imgembed.load(int8_all.path, backend=engine["backend"], threads=2)
        if emb.engine.id != engine["id"]:
            continue  # two engines of one backend: the named backend runs its first (default/fastest)
        assert emb.runner.backend == engine["backend"]
        assert cosine(emb.embed(images), ref).min() >= 0.99


def test_a_backend_the_artifact_lacks_is_a_typed_error_listing_what_it_holds(int8_all):
    with pytest.raises(BackendUnavailableError, match="has no 'tensorrt' engine; it holds: .*openvino-int8"):
        imgembed.load(int8_all.path, backend="tensorrt")
    with pytest.raises(BackendUnavailableError, match="unknown backend 'nope'.*expected one of"):
        imgembed.load(int8_all.path, backend="nope")


def test_cuda_without_a_gpu_is_one_clear_error(int8_all):
    from .helpers import gpu_available

    if gpu_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(BackendUnavailableError, match="--device cuda: no usable NVIDIA GPU"):
        imgembed.load(int8_all.path, device="cuda")
    proc = run_cli("embed", str(int8_all.path), "nothing.jpg", "--device", "cuda")
    assert proc.returncode != 0
    proc = run_cli("bench", str(int8_all.path), "--device", "cuda", "--max-seconds", "0.1")
    assert proc.returncode == 1 and "no usable NVIDIA GPU" in proc.stderr and "Traceback" not in proc.stderr


def test_an_avx512_tuned_artifact_runs_on_an_avx2_only_host(int8_all, images, monkeypatch):
    m = read_manifest(int8_all.path)
    monkeypatch.setenv(CPU_FLAGS_ENV, AVX2_ONLY)
    engine, notes = select_engine(m, "auto", "cpu")
    assert engine.inference_precision == "fp32"      # no BF16 hint without BF16 instructions
    assert not engine.needs_vnni                      # no 8-bit engine gated with VNNI kernels
    assert all("lacks native BF16" in n or "lacks VNNI" in n for n in notes)
    emb = imgembed.load(int8_all.path, threads=2)
    ref = imgembed.load(MODEL, random_init=True, workers=0).embed(images)
    assert cosine(emb.embed(images), ref).min() >= 0.99


AVX2_SCRIPT = """
import sys, numpy as np, imgembed
from imgembed.gate.samples import parity_images
imgs = [i for _, i in parity_images()[:6]]
ref = imgembed.load("{model}", random_init=True, workers=0).embed(imgs)
for backend in ("auto", "openvino"):
    emb = imgembed.load(sys.argv[1], backend=backend, threads=2, workers=0)
    v = emb.embed(imgs)
    cos = (v * ref).sum(1) / np.linalg.norm(v, axis=1) / np.linalg.norm(ref, axis=1)
    print(backend, emb.engine.id, emb.engine.inference_precision, float(cos.min()))
"""


def test_openvino_engines_run_with_avx2_kernels_only(int8_all):
    """oneDNN capped at AVX2 (ONEDNN_MAX_CPU_ISA) and the flags of an AVX2 host: the BF16-hinted engine is
    passed over; "auto" runs an engine without VNNI needs, and a forced OpenVINO engine still computes within
    the gate with AVX2 kernels on this model (test_int8_portability covers saturation)."""
    import subprocess
    import sys

    from .helpers import cli_env

    env = cli_env(ONEDNN_MAX_CPU_ISA="AVX2", **{CPU_FLAGS_ENV: AVX2_ONLY})
    proc = subprocess.run([sys.executable, "-c", AVX2_SCRIPT.format(model=MODEL), str(int8_all.path)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [line.split() for line in proc.stdout.strip().splitlines()]
    assert [line[0] for line in lines] == ["auto", "openvino"]
    for _, engine, hint, cos in lines:
        assert hint == "fp32" and float(cos) >= 0.99, (engine, hint, cos)


def test_forced_backend_builds_only_that_backend(tmp_path):
    res = _export(tmp_path, precision="fp32", backend="openvino")
    assert [e["backend"] for e in manifest_json(res)["engines"]] == ["openvino"]
    assert [r["id"] for r in manifest_json(res)["selection"]["candidates"]] == [recipes.OV_FP32.id]
    assert res.manifest.parity.metrics["min_cosine"] >= 0.99999
    with pytest.raises(BackendUnavailableError, match="unknown backend 'tvm'"):
        _export(tmp_path / "x", precision="fp32", backend="tvm")
    with pytest.raises(ExportError, match="backend 'openvino' offers no fp16 candidate"):
        _export(tmp_path / "y", precision="fp16", backend="openvino")


def test_dynamic_int8_is_an_explicit_opt_in_recorded_as_batch_dependent(tmp_path, images):
    res = _export(tmp_path, precision="int8", int8_preset="dynamic")
    m = manifest_json(res)
    assert m["default_engine"] == recipes.ORT_INT8_FORCED_ONLY["dynamic"].id and m["batch_invariant"] is False
    assert "batch_variation" not in m["parity"]["thresholds"]          # not claimed, so not gated
    from imgembed.serve.models import ServedModel

    served = ServedModel("m", (), res.path, imgembed.load(res.path))
    assert served.batch_dependent and served.describe()["batch_invariant"] is False
    default = _export(tmp_path / "static", precision="int8")
    assert default.manifest.batch_invariant is True
    assert default.manifest.parity.thresholds["batch_variation"] == BATCH_INVARIANCE_LIMIT


def test_default_int8_vectors_do_not_depend_on_batch_mates(int8_all, images):
    emb = imgembed.load(int8_all.path, threads=2, workers=0)
    alone = np.concatenate([emb.embed([img]) for img in images])
    together = emb.embed(images, batch_size=len(images))
    np.testing.assert_allclose(together, alone, atol=1e-5 * np.abs(alone).max())


@needs_bf16
def test_bf16_export_runs_openvino_with_a_portable_fp32_fallback(tmp_path, images, monkeypatch):
    res = _export(tmp_path, precision="bf16")
    m = manifest_json(res)
    assert m["default_engine"] == recipes.OV_BF16.id and m["precision"] == "bf16"
    assert m["parity"]["metrics"]["min_cosine"] >= 0.9999
    assert {e["id"] for e in m["engines"]} == {recipes.OV_BF16.id, recipes.ORT_FP32.id}
    ref = imgembed.load(MODEL, random_init=True, workers=0).embed(images)
    emb = imgembed.load(res.path, threads=2)
    assert emb.runner.backend == "openvino" and emb.runner.inference_precision == "bf16"
    assert cosine(emb.embed(images), ref).min() >= 0.9999
    monkeypatch.setenv(CPU_FLAGS_ENV, AVX2_ONLY)     # the same artifact on an AVX2-only host
    emb = imgembed.load(res.path, threads=2)
    assert emb.engine.id == recipes.ORT_FP32.id
    assert cosine(emb.embed(images), ref).min() >= 0.99999
    only_ov = parse_manifest({**m, "engines": [e for e in m["engines"] if e["backend"] == "openvino"]
                              + [{"id": "nope", "backend": "tensorrt", "precision": "bf16", "files": {}}]})
    with pytest.warns(DegradedEngineWarning, match="openvino-bf16 was exported for native BF16 but this CPU .*lacks "
                                                   "native BF16 instructions.*runs in FP32 here"):
        engine, _ = select_engine(only_ov)
    assert engine.inference_precision == "fp32"


def test_bf16_without_bf16_instructions_names_them(tmp_path, monkeypatch):
    monkeypatch.setenv(CPU_FLAGS_ENV, AVX2_ONLY)
    with pytest.raises(BackendUnavailableError, match="lacks native BF16 instructions.*AVX512_BF16 or AMX-BF16"):
        _export(tmp_path, precision="bf16")
    proc = run_cli("export", MODEL, "--random-init", "--bf16", "--out", str(tmp_path / "a"),
                   env=_env_with(AVX2_ONLY))
    assert proc.returncode == 1 and "AVX512_BF16" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "a").exists()


def _env_with(flags: str) -> dict[str, str]:
    from .helpers import cli_env

    return cli_env(**{CPU_FLAGS_ENV: flags})


def test_legacy_manifests_list_one_onnxruntime_engine():
    """A manifest of the first releases (no ``engines``) holds one ONNX Runtime engine, ``model.onnx``."""
    legacy = minimal_manifest(format_version=1, precision="int8", batch_invariant=True)
    del legacy["engines"], legacy["default_engine"]
    m = parse_manifest(legacy)
    assert [e.model_dump(exclude_defaults=True) for e in engines_of(m)] == [
        {"id": "onnxruntime", "backend": "onnxruntime", "precision": "int8", "batch_invariant": True,
         "files": {"model": "model.onnx"}}]
    assert m.default_engine == "onnxruntime"


def test_export_cli_prints_the_engine_table_and_parity_rechecks_an_engine(tmp_path):
    proc = run_cli("export", MODEL, "--random-init", "--int8", "--threads", "2", "--out", str(tmp_path / "a"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert recipes.ORT_INT8_STATIC_QDQ_MATMUL.id in proc.stdout and recipes.OV_INT8.id in proc.stdout
    assert "default engine" in proc.stdout
    proc = run_cli("export", MODEL, "--random-init", "--threads", "2", "--engine", "openvino",
                   "--out", str(tmp_path / "b"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--engine is deprecated; use --backend" in proc.stderr   # the old spelling still works, with a warning
    proc = run_cli("parity", str(tmp_path / "b"), "--backend", "openvino", "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert report["engine"] == recipes.OV_FP32.id and report["passed"]
    assert report["metrics"]["min_cosine"] >= 0.99999


def test_export_cli_rejects_an_engine_and_a_backend_that_disagree(tmp_path):
    proc = run_cli("export", MODEL, "--random-init", "--engine", "openvino", "--backend", "onnxruntime",
                   "--out", str(tmp_path / "a"))
    assert proc.returncode == 2 and "--engine openvino and --backend onnxruntime disagree" in proc.stderr
    assert "--engine is deprecated; use --backend" in proc.stderr and not (tmp_path / "a").exists()
