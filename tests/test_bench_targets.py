"""imgembed.bench targets, backends and suite on tiny models: artifact cache, grouping artifacts with their
original, the backend table, the rebuilt original, and an in-process end-to-end run."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest

from imgembed.artifact import MODEL_FILE, Engine
from imgembed.bench import backends
from imgembed.bench.backends import Backend, OriginalCache, Variant, build_runner, plan_variants
from imgembed.bench.measure import MeasureSettings
from imgembed.bench.suite import BenchConfig, run_benchmark, write_sample_files
from imgembed.bench.targets import ArtifactRef, BenchModel, _cached, ensure_artifact, resolve_targets, source_tag
from imgembed.errors import ArtifactError, BackendUnavailableError, UnknownModelError
from imgembed.gate.samples import parity_images
from imgembed.models.registry import get_spec
from imgembed.preprocess import load_image, preprocess_batch
from imgembed.runtime.runners.onnxruntime import OrtRunner, available_providers

RANDOM0 = {"kind": "random-init", "seed": 0}


def tiny_model(*precisions: str) -> BenchModel:
    return BenchModel(get_spec("test-resnet-tiny"), RANDOM0,
                      [ArtifactRef(Path(f"/x/{p}"), p, "passed") for p in precisions])


def test_source_tags_name_the_weight_source():
    assert source_tag({"kind": "random-init", "seed": 3}) == "random-s3"
    assert source_tag({"kind": "hub", "repo": "openai/clip", "revision": "v1/a"}) == "hub-v1_a"
    assert source_tag({"kind": "local", "path": "/w"}).startswith("local-")
    with pytest.raises(ArtifactError, match="'ftp'"):
        source_tag({"kind": "ftp"})


def test_cpu_plan_runs_the_original_first_then_every_artifact():
    labels = [v.label for v in plan_variants(tiny_model("int8", "fp32"), "cpu")]
    assert labels == ["torch-fp32", "torch-bf16", "onnxruntime-int8", "onnxruntime-fp32"]
    assert [v.label for v in plan_variants(tiny_model("fp32"), "cpu", compare_original=False)] == ["onnxruntime-fp32"]


def test_two_artifacts_at_one_precision_get_distinct_labels():
    model = BenchModel(get_spec("test-resnet-tiny"), RANDOM0,
                       [ArtifactRef(Path("/x/qdq"), "int8", "passed"), ArtifactRef(Path("/x/qop"), "int8", "passed")])
    labels = [v.label for v in plan_variants(model, "cpu")]
    assert labels == ["torch-fp32", "torch-bf16", "onnxruntime-int8[qdq]", "onnxruntime-int8[qop]"]


def test_every_engine_of_an_artifact_is_a_variant_and_engines_restrict_the_plan():
    engines = (Engine(id="openvino-int8", backend="openvino", precision="int8", files={}),
               Engine(id="openvino-int8-bf16", backend="openvino", precision="int8", inference_precision="bf16",
                      files={}),
               Engine(id="onnxruntime-int8-static-qoperator", backend="onnxruntime", precision="int8", files={}),
               Engine(id="onnxruntime-int8-static-qdq", backend="onnxruntime", precision="int8", files={}))
    model = BenchModel(get_spec("test-resnet-tiny"), RANDOM0, [ArtifactRef(Path("/x/a"), "int8", "passed", engines)])
    variants = plan_variants(model, "cpu")
    labels = [v.label for v in variants]
    assert labels == ["torch-fp32", "torch-bf16", "onnxruntime-int8", "onnxruntime-int8[static-qdq]",
                      "openvino-int8", "openvino-int8+bf16"]
    assert [v.engine.id for v in variants if v.engine] == [
        "onnxruntime-int8-static-qoperator", "onnxruntime-int8-static-qdq", "openvino-int8", "openvino-int8-bf16"]
    only = [v.label for v in plan_variants(model, "cpu", engines=("openvino",))]
    assert only == ["torch-fp32", "openvino-int8", "openvino-int8+bf16"]       # the baseline stays
    with pytest.raises(BackendUnavailableError, match="unknown backend 'tvm'"):
        plan_variants(model, "cpu", engines=("tvm",))


def test_cuda_plan_adds_fp16_original_and_explains_what_it_skips(monkeypatch):
    monkeypatch.setattr("imgembed.runtime.backends.cuda_unavailable", lambda: None)  # plan as on a GPU host
    notes: list[str] = []
    labels = [v.label for v in plan_variants(tiny_model("fp32", "int8"), "cuda", notes=notes)]
    assert labels[:3] == ["torch-fp32", "torch-fp16", "torch-bf16"]  # GPU backends: tests/test_gpu_backends.py
    ort = [label for label in labels if label.startswith("onnxruntime")]
    if "CUDAExecutionProvider" in available_providers():
        assert ort == ["onnxruntime-fp32"] and any("int8" in n for n in notes)
    else:
        assert ort == []
        assert any("CUDAExecutionProvider" in n and "onnxruntime-gpu" in n for n in notes)
    with pytest.raises(BackendUnavailableError, match="'tpu'"):
        plan_variants(tiny_model("fp32"), "tpu")


def test_a_new_backend_is_one_registration(monkeypatch):
    built = []

    def open_(target, device, threads, precision):
        built.append((target.record.id, device, threads))
        return OrtRunner(target.file(), target.output_dim, threads=threads)

    fake = Backend("fake", "artifact", lambda d: ("fp32",), open_, lambda d: None)
    monkeypatch.setitem(backends.BACKENDS, "fake", fake)
    engines = (Engine(id="fake-fp32", backend="fake", precision="fp32", files={"model": "model.onnx"}),)
    model = BenchModel(get_spec("test-resnet-tiny"), RANDOM0, [ArtifactRef(Path("/x/fp32"), "fp32", "passed", engines,
                                                                            (("model.onnx", "0" * 64),)),
                                                                ArtifactRef(Path("/x/int8"), "int8", "passed")])
    variants = {v.label: v for v in plan_variants(model, "cpu")}
    assert "fake-fp32" in variants and "fake-int8" not in variants
    runner = build_runner(model, variants["fake-fp32"], "cpu", 1, OriginalCache(model))
    assert built == [("fake-fp32", "cpu", 1)] and isinstance(runner, OrtRunner)  # the factory ran
    with pytest.raises(ArtifactError, match="model.onnx"):  # its file is read (and verified) only on activation
        runner.activate()
    with pytest.raises(BackendUnavailableError, match="'nope'.*expected one of"):
        build_runner(model, Variant("nope-fp32", "nope", "fp32"), "cpu", 1, OriginalCache(model))


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bench-cache")


def test_ensure_artifact_exports_once_then_reuses_the_cache(cache):
    steps: list[str] = []
    spec = get_spec("test-resnet-tiny")
    path = ensure_artifact(spec, "fp32", RANDOM0 | {"arch": dict(spec.arch)}, cache, step=steps.append)
    assert path == cache / "test-resnet-tiny-fp32-random-s0" and (path / MODEL_FILE).is_file()
    assert any("exporting to ONNX" in s for s in steps)
    mtime = (path / "manifest.json").stat().st_mtime_ns
    steps.clear()
    assert ensure_artifact("test-resnet-tiny", "fp32", RANDOM0 | {"arch": dict(spec.arch)}, cache,
                           step=steps.append) == path
    assert steps == [f"using cached {path}"] and (path / "manifest.json").stat().st_mtime_ns == mtime
    # another seed, another precision or a modified file is not a cache hit
    assert not _cached(path, spec, "fp32", {"kind": "random-init", "seed": 1, "arch": dict(spec.arch)})
    assert not _cached(path, spec, "int8", RANDOM0 | {"arch": dict(spec.arch)})
    with pytest.raises(ArtifactError, match="'fp16'.*expected one of"):
        ensure_artifact(spec, "fp16", RANDOM0, cache)


def test_artifact_dirs_are_grouped_with_their_rebuilt_original(artifact_dir):
    fp32, int8 = artifact_dir("test-clip-tiny", "fp32"), artifact_dir("test-clip-tiny", "int8")
    models = resolve_targets([str(fp32), str(int8), str(fp32)])
    assert len(models) == 1 and models[0].spec.name == "test-clip-tiny"
    assert [(a.path, a.precision) for a in models[0].artifacts] == [(fp32, "fp32"), (int8, "int8")]
    # the original rebuilt from the manifest's source record is the model the artifact was exported from
    spec = models[0].spec
    pixels = preprocess_batch([img for _, img in parity_images()[:6]], spec.preprocess)
    torch_runner = build_runner(models[0], Variant("torch-fp32", "torch", "fp32"), "cpu", 1,
                                OriginalCache(models[0]))
    with torch_runner, OrtRunner(fp32 / MODEL_FILE, spec.embedding.dim, threads=1) as ort:
        ref, got = torch_runner.infer(pixels), ort.infer(pixels)
    cos = np.sum(ref * got, axis=1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1))
    assert cos.min() > 0.9999


def test_bad_targets_raise_typed_errors(tmp_path):
    with pytest.raises(UnknownModelError, match="clip-vit-b3"):
        resolve_targets(["clip-vit-b3"])
    with pytest.raises(ArtifactError, match="does not exist"):
        resolve_targets([str(tmp_path / "missing" / "dir")])
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ArtifactError, match="not an artifact directory"):
        resolve_targets([str(tmp_path / "file.txt")])
    with pytest.raises(ArtifactError, match="no manifest.json"):
        resolve_targets([str(tmp_path)])


def test_sample_files_are_real_jpeg_and_png_files_that_decode(tmp_path):
    files = write_sample_files(tmp_path)
    assert len(files) == len(parity_images()) == 26
    suffixes = {f.suffix for f in files}
    assert suffixes == {".jpg", ".png"}
    assert files[0].read_bytes()[:3] == b"\xff\xd8\xff"  # JPEG SOI marker
    for f in files:
        assert load_image(f).mode == "RGB"


def test_run_benchmark_end_to_end_mode_in_process(artifact_dir):
    models = resolve_targets([str(artifact_dir("test-vit-tiny", "fp32")), str(artifact_dir("test-vit-tiny", "int8"))])
    config = BenchConfig(batch_sizes=(1, 3), modes=("e2e",), threads=1,
                         measure=MeasureSettings(warmup=1, window_seconds=0.05, max_seconds=0.15))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rep = run_benchmark(models, config)
    rows = rep["results"]
    assert [(r["variant"], r["batch_size"]) for r in rows] == [
        ("torch-fp32", 1), ("torch-bf16", 1), ("onnxruntime-fp32", 1), ("onnxruntime-int8", 1),
        ("torch-fp32", 3), ("torch-bf16", 3), ("onnxruntime-fp32", 3), ("onnxruntime-int8", 3)]
    for r in rows:
        assert r["mode"] == "end-to-end" and r["threads"] == 1 and r["samples"]["images"] % r["batch_size"] == 0
        assert r["samples"]["calls"] == r["latency_ms"]["samples"] >= 1
        base = next(b for b in rows if b["original"] and b["batch_size"] == r["batch_size"])
        assert r["speedup_vs_original"] == pytest.approx(r["throughput_ips"] / base["throughput_ips"], rel=1e-3)
    assert json.loads(json.dumps(rep)) == rep  # JSON-serialisable as is


def test_fp16_original_is_a_half_precision_copy_close_to_fp32():
    model = tiny_model()
    original = OriginalCache(model)
    x = np.random.default_rng(0).random((2, 3, *model.spec.input_hw), dtype=np.float32)
    with build_runner(model, Variant("torch-fp32", "torch", "fp32"), "cpu", 1, original) as fp32, \
            build_runner(model, Variant("torch-fp16", "torch", "fp16"), "cpu", 1, original) as fp16:
        a, b = fp32.infer(x), fp16.infer(x)
    assert b.dtype == np.float32 and not np.array_equal(a, b)     # really ran in half precision
    assert np.abs(a - b).max() < 1e-2 * max(1.0, np.abs(a).max())
    assert next(original.get().parameters()).dtype.is_floating_point and \
        str(next(original.get().parameters()).dtype) == "torch.float32"  # the shared original is untouched


def test_an_export_failing_parity_is_left_out_with_a_note(monkeypatch, artifact_dir):
    from imgembed.bench import targets
    from imgembed.errors import ParityError

    def fake_export(spec, precision, source, cache_dir=None, **kw):
        if precision == "int8":
            raise ParityError("test-resnet-tiny int8 export failed the parity gate; no artifact written\ndetails")
        return artifact_dir("test-resnet-tiny", precision)

    monkeypatch.setattr(targets, "ensure_artifact", fake_export)
    notes: list[str] = []
    model = targets.model_from_registry("test-resnet-tiny", precisions=("fp32", "int8"), random_init=True,
                                        weights=None, notes=notes)
    assert [(a.path, a.precision) for a in model.artifacts] == [(artifact_dir("test-resnet-tiny"), "fp32")]
    assert notes == ["test-resnet-tiny int8: export failed its parity gate, not benchmarked: "
                     "test-resnet-tiny int8 export failed the parity gate; no artifact written"]
    with pytest.raises(ParityError):  # without a notes list the error is the caller's
        targets.model_from_registry("test-resnet-tiny", precisions=("fp32", "int8"), random_init=True,
                                    weights=None)
