"""One conformance suite over every available runner: same contract, same vectors.

Runners: the PyTorch original (CPU in FP32 and BF16; CUDA in FP32/FP16/BF16 when present), ONNX Runtime CPU
(FP32 and INT8 artifacts; FP32 through IOBinding too), OpenVINO (FP32, BF16 on CPUs with BF16 instructions,
INT8 through NNCF), ONNX Runtime CUDA (FP32 and FP16 artifacts) when onnxruntime-gpu and a GPU are present,
TensorRT engines (FP32/FP16/INT8) when tensorrt and a GPU are present. Unavailable ones skip with the reason.
Every backend of the runtime's table must appear here (test_every_backend_is_in_the_suite).
"""
from __future__ import annotations

import numpy as np
import pytest

from imgembed.artifact import MODEL_FILE
from imgembed.errors import BackendUnavailableError, ImgembedError
from imgembed.gate.samples import parity_images
from imgembed.models.families import load_original
from imgembed.models.registry import get_spec
from imgembed.preprocess import preprocess_batch
from imgembed.runtime.backends import BACKENDS
from imgembed.runtime.runners.onnxruntime import OrtRunner, available_providers, resolve_providers
from imgembed.runtime.runners.pytorch import TorchRunner

from .helpers import gpu_available

MODEL = "test-clip-tiny"
RUNNERS = ["torch-cpu", "torch-cpu-bf16", "torch-cuda", "torch-cuda-fp16", "torch-cuda-bf16", "ort-cpu-fp32",
           "ort-cpu-int8", "ort-cpu-fp32-iobinding", "ort-cuda-fp32", "ort-cuda-fp16", "ov-cpu-fp32", "ov-cpu-bf16",
           "ov-cpu-int8", "trt-cuda-fp32", "trt-cuda-fp16", "trt-cuda-int8", "torch-compile-cuda-fp32"]
# Which RUNNERS prefix exercises which backend of imgembed.runtime.backends.
SUITE_BACKENDS = {"torch": "torch-cpu", "onnxruntime": "ort-cpu-fp32", "openvino": "ov-cpu-fp32",
                  "tensorrt": "trt-cuda-fp32", "torch-compile": "torch-compile-cuda-fp32"}


def _make(kind: str, artifact_dir):
    spec = get_spec(MODEL)
    if kind.startswith("torch-compile"):
        if not gpu_available():
            pytest.skip("no CUDA device")
        from imgembed.runtime.backends import open_original

        head = load_original(spec, random_init=True)
        return open_original(head, spec.input_hw, spec.embedding.dim, MODEL, backend="torch-compile",
                             device="cuda", threads=2), "fp32"
    if kind.startswith("ov"):
        return _make_openvino(kind.split("-")[2], artifact_dir)
    if kind.startswith("torch"):
        device, dtype = (kind.split("-") + ["fp32"])[1:3]
        if device == "cuda" and not gpu_available():
            pytest.skip("no CUDA device")
        head = load_original(spec, random_init=True)
        return TorchRunner(head, spec.input_hw, spec.embedding.dim, device=device, threads=2, dtype=dtype), dtype
    if kind.startswith("trt"):
        return _make_trt(kind.split("-")[2], artifact_dir), kind.split("-")[2]
    _, device, precision, *binding = kind.split("-")
    if device == "cuda" and "CUDAExecutionProvider" not in available_providers():
        pytest.skip("onnxruntime CUDA provider not available")
    path = artifact_dir(MODEL, precision) / MODEL_FILE
    return OrtRunner(path, spec.embedding.dim, device=device, threads=2, io_binding=bool(binding)), precision


def _make_openvino(precision: str, artifact_dir):
    """The OpenVINO engine of an artifact exported with backend="openvino", opened through the backend table."""
    from imgembed.artifact import read_manifest
    from imgembed.runtime.backends import get_backend, open_engine, select_engine
    from imgembed.runtime.host import missing_bf16_instructions

    reason = get_backend("openvino").unavailable("cpu")
    if reason:
        pytest.skip(reason)
    if precision == "bf16" and missing_bf16_instructions():
        pytest.skip(missing_bf16_instructions())
    path = artifact_dir(MODEL, precision, backend="openvino")
    manifest = read_manifest(path)
    engine, _ = select_engine(manifest, "openvino")
    return open_engine(path, manifest, engine, threads=2), precision


def _make_trt(precision: str, artifact_dir):
    """A TensorRT engine built (not parity-gated: the suite checks it) from an unfused artifact."""
    from imgembed.runtime.runners.tensorrt import TrtRunner, current_env, tensorrt_unavailable

    reason = tensorrt_unavailable("cuda")
    if reason:
        pytest.skip(f"TensorRT unavailable: {reason}")
    from imgembed.export.pipeline import ExportOptions, export_model
    from imgembed.export.tensorrt import build_engine, trt_export_overrides
    from imgembed.runtime.runners.tensorrt_plans import BatchProfile

    root = artifact_dir(MODEL, "fp32").parent / f"trt-{precision}"
    if not (root / "engine.plan").is_file():
        opts = ExportOptions(precision=precision, random_init=True, speed_check=False,
                             **trt_export_overrides(precision, None))
        art = export_model(MODEL, root / "artifact", opts).path
        blob, _ = build_engine(art / MODEL_FILE, precision, BatchProfile(1, 4, 8), current_env(),
                               cache_dir=root / "cache")
        (root / "engine.plan").write_bytes(blob)
    return TrtRunner(root / "engine.plan", get_spec(MODEL).embedding.dim)


@pytest.fixture(scope="module")
def pixels():
    return preprocess_batch([img for _, img in parity_images()[:10]], get_spec(MODEL).preprocess)


@pytest.fixture(scope="module")
def reference(pixels):
    spec = get_spec(MODEL)
    with TorchRunner(load_original(spec, random_init=True), spec.input_hw, spec.embedding.dim) as r:
        return r.infer(pixels)


@pytest.fixture(params=RUNNERS)
def runner(request, artifact_dir):
    r, precision = _make(request.param, artifact_dir)
    with r:
        yield r, precision


def test_output_contract(runner, pixels):
    r, _ = runner
    out = r.infer(pixels[:3])
    assert out.shape == (3, get_spec(MODEL).embedding.dim) and out.dtype == np.float32
    assert np.all(np.isfinite(out))
    assert r.describe()["output_dim"] == 24 and r.backend in BACKENDS


def test_matches_the_original(runner, pixels, reference):
    r, precision = runner
    out = r.infer(pixels)
    cos = np.sum(out * reference, axis=1) / np.linalg.norm(out, axis=1) / np.linalg.norm(reference, axis=1)
    assert cos.min() >= (0.99999 if precision == "fp32" else 0.99)


@pytest.mark.parametrize("batch", [1, 3, 7])
def test_batch_size_does_not_change_vectors(runner, pixels, batch):
    r, precision = runner
    full = r.infer(pixels)
    parts = np.concatenate([r.infer(pixels[i:i + batch]) for i in range(0, len(pixels), batch)])
    # every engine here is batch-invariant up to float rounding (static INT8 included); eager PyTorch in
    # reduced precision picks other kernels per batch size
    loose = r.backend == "torch" and precision != "fp32"
    np.testing.assert_allclose(parts, full, atol=2e-2 if loose else 1e-5)


def test_every_backend_is_in_the_suite():
    assert set(SUITE_BACKENDS) == set(BACKENDS)
    assert all(kind in RUNNERS for kind in SUITE_BACKENDS.values())


def test_rejects_wrong_dtype_rank_and_size(runner, pixels):
    r, _ = runner
    with pytest.raises(TypeError, match="dtype float64 but 'pixel_values' expects float32"):
        r.infer(pixels.astype(np.float64))
    with pytest.raises(ValueError, match=r"input shape \(3, 64, 64\) does not match"):
        r.infer(pixels[0])
    with pytest.raises(ValueError, match=r"does not match 'pixel_values'"):
        r.infer(np.zeros((1, 3, 32, 32), np.float32))
    with pytest.raises(ValueError, match="non-empty batch"):
        r.infer(pixels[:0])
    with pytest.raises(TypeError, match="must be a numpy array"):
        r.infer(pixels.tolist())


def test_inactive_runner_refuses_to_infer(artifact_dir, pixels):
    for kind in ("torch-cpu", "ort-cpu-fp32"):
        r, _ = _make(kind, artifact_dir)
        with pytest.raises(ImgembedError, match="runner is not active"):
            r.infer(pixels)
        with r:
            assert r.is_active
        assert not r.is_active


def test_missing_cuda_is_a_typed_error():
    if "CUDAExecutionProvider" in available_providers():
        pytest.skip("CUDA provider present")
    with pytest.raises(BackendUnavailableError, match="CUDA provider not available.*onnxruntime-gpu"):
        resolve_providers("cuda")
    with pytest.raises(BackendUnavailableError, match="unknown device 'tpu'"):
        resolve_providers("tpu")
    if not gpu_available():
        spec = get_spec(MODEL)
        with pytest.raises(BackendUnavailableError, match="torch.cuda.is_available"):
            TorchRunner(load_original(spec, random_init=True), spec.input_hw, 24, device="cuda")


def test_import_imgembed_does_not_import_backends():
    import subprocess
    import sys

    code = ("import sys, imgembed; imgembed.get_spec('clip-vit-b32'); "
            "print(sorted(m for m in ('torch', 'onnxruntime', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
