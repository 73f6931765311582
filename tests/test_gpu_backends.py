"""GPU information, ONNX Runtime CUDA options and IOBinding, and the GPU backends of ``imgembed bench``.

Runs without a GPU: nvidia-smi output is parsed from fixed text, the CUDA provider options are validated
in pure Python, IOBinding runs on the CPU provider, the benchmark plan for ``--device cuda`` is computed
(runners are not built). The CUDA-only test at the end skips without a GPU.
"""
from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest

from imgembed.artifact import MODEL_FILE
from imgembed.bench.backends import BACKENDS, OriginalCache, Variant, build_runner, plan_variants
from imgembed.bench.targets import ArtifactRef, BenchModel
from imgembed.errors import BackendUnavailableError, EngineMismatchError
from imgembed.models.registry import get_spec
from imgembed.runtime import gpu
from imgembed.runtime.runners.onnxruntime import (
    OrtRunner,
    _with_cuda_options,
    available_providers,
    cuda_provider_options,
)
from imgembed.runtime.runners.tensorrt import tensorrt_unavailable

from .conftest import gpu_available

SMI = """0, NVIDIA H100 80GB HBM3, 550.54.15, 81559, 1024, 1980, 1980, 2619, 2619, 9.0, 700.00, P0
1, NVIDIA A100-SXM4-40GB, 550.54.15, 40960, [N/A], 210, 1410, 1215, 1215, 8.0, [Not Supported], P8
"""


def test_nvidia_smi_csv_is_parsed_into_typed_values():
    rows = gpu.parse_nvidia_smi_csv(SMI)
    assert rows[0] == {"index": 0, "name": "NVIDIA H100 80GB HBM3", "driver_version": "550.54.15",
                       "memory.total": 81559.0, "memory.used": 1024.0, "clocks.sm": 1980.0, "clocks.max.sm": 1980.0,
                       "clocks.mem": 2619.0, "clocks.max.mem": 2619.0, "compute_cap": "9.0", "power.limit": 700.0,
                       "pstate": "P0"}
    assert rows[1]["index"] == 1 and rows[1]["memory.used"] is None and rows[1]["power.limit"] is None
    assert rows[1]["clocks.sm"] == 210.0 and rows[1]["pstate"] == "P8"
    assert gpu.parse_nvidia_smi_csv("\n\n") == []
    with pytest.raises(ValueError, match=r"row '0, NVIDIA H100, 550' has 3 cells; expected 12 \(index, name"):
        gpu.parse_nvidia_smi_csv("0, NVIDIA H100, 550\n")


def test_nvidia_smi_query_and_its_absence(monkeypatch):
    calls = []

    def fake_run(cmd, **kw):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, stdout=SMI, stderr="")

    monkeypatch.setattr(gpu.shutil, "which", lambda name: "/usr/bin/nvidia-smi")
    monkeypatch.setattr(gpu.subprocess, "run", fake_run)
    rows = gpu.nvidia_smi()
    assert [r["name"] for r in rows] == ["NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-40GB"]
    assert calls[0][1] == "--query-gpu=" + ",".join(gpu.NVIDIA_SMI_FIELDS)
    assert calls[0][2] == "--format=csv,noheader,nounits"
    monkeypatch.setattr(gpu.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(cmd, 0, "garbage"))
    assert gpu.nvidia_smi() is None                     # unparseable output: no data rather than wrong data
    monkeypatch.setattr(gpu.shutil, "which", lambda name: None)
    assert gpu.nvidia_smi() is None


def test_describe_gpu_line_for_reports():
    report = {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0", "memory_gib": 79.1, "cuda": "12.4",
              "count": 2, "driver": "550.54.15", "clocks_mhz": {"sm": 1980.0, "sm_max": 1980.0, "mem": 2619.0,
                                                               "mem_max": 2619.0}}
    assert gpu.describe_gpu(report) == ("NVIDIA H100 80GB HBM3 x2 (sm 9.0, 79.1 GiB, driver 550.54.15, CUDA 12.4, "
                                        "SM 1980/1980 MHz, memory 2619/2619 MHz)")
    old = {"name": "T4", "memory_gib": 14.6, "cuda": "12.1", "count": 1}     # reports written before this change
    assert gpu.describe_gpu(old) == "T4 (14.6 GiB, CUDA 12.1)"
    assert gpu.describe_gpu(None) == "none"


def test_gpu_report_matches_what_torch_sees():
    from imgembed.runtime.host import gpu_info

    report = gpu_info()
    if not gpu_available():
        assert report is None and gpu.torch_devices() == []
        with pytest.raises(BackendUnavailableError, match="no CUDA device 0 .*TensorRT engines need an NVIDIA GPU"):
            gpu.current_gpu()
        return
    import torch  # pragma: no cover - GPU machines only

    assert report["name"] == torch.cuda.get_device_name(0) and report["count"] == torch.cuda.device_count()
    assert gpu.current_gpu().compute_capability == "{}.{}".format(*torch.cuda.get_device_capability(0))


def test_cuda_provider_options_are_validated_and_attached():
    assert cuda_provider_options() == {}
    assert cuda_provider_options("HEURISTIC", device_id=1) == {"device_id": "1", "cudnn_conv_algo_search": "HEURISTIC"}
    with pytest.raises(ValueError, match=r"cudnn_conv_algo_search='FAST'; expected one of \['EXHAUSTIVE', 'HEURISTIC'"):
        cuda_provider_options("FAST")
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert _with_cuda_options(providers, {"cudnn_conv_algo_search": "DEFAULT"}) == [
        ("CUDAExecutionProvider", {"cudnn_conv_algo_search": "DEFAULT"}), "CPUExecutionProvider"]
    assert _with_cuda_options(providers, {}) == providers


def test_io_binding_gives_the_same_vectors_as_run(artifact_dir):
    path = artifact_dir("test-resnet-tiny", "fp32") / MODEL_FILE
    x = np.random.default_rng(1).standard_normal((5, 3, *get_spec("test-resnet-tiny").input_hw)).astype(np.float32)
    dim = get_spec("test-resnet-tiny").embedding.dim
    with OrtRunner(path, dim, threads=1) as plain, OrtRunner(path, dim, threads=1, io_binding=True) as bound:
        a, b = plain.infer(x), bound.infer(x)
    assert bound.io_binding and a.shape == (5, dim) and b.dtype == np.float32
    np.testing.assert_array_equal(a, b)


# -- the benchmark plan on CUDA -------------------------------------------------------------------------------
def _model(*precisions: str) -> BenchModel:
    return BenchModel(get_spec("test-resnet-tiny"), {"kind": "random-init", "seed": 0},
                      [ArtifactRef(Path(f"/x/{p}"), p, "passed") for p in precisions])


def test_cuda_plan_covers_every_gpu_backend_and_precision(monkeypatch):
    monkeypatch.setattr("imgembed.runtime.backends.cuda_unavailable", lambda: None)  # plan as on a GPU host
    notes: list[str] = []
    labels = [v.label for v in plan_variants(_model("fp32", "fp16", "int8"), "cuda", notes=notes)]
    assert labels[:6] == ["torch-fp32", "torch-fp16", "torch-bf16", "torch-compile-fp32", "torch-compile-fp16",
                          "torch-compile-bf16"]
    ort = [label for label in labels if label.startswith("onnxruntime")]
    trt = [label for label in labels if label.startswith("tensorrt")]
    if "CUDAExecutionProvider" in available_providers():
        assert ort == ["onnxruntime-fp32", "onnxruntime-fp16"]
    else:
        assert ort == [] and any("onnxruntime skipped on cuda" in n and "onnxruntime-gpu" in n for n in notes)
    reason = tensorrt_unavailable("cuda")
    if reason:
        assert trt == [] and f"tensorrt skipped on cuda: {reason}" in notes
    else:
        assert trt == ["tensorrt-fp32", "tensorrt-fp16", "tensorrt-int8"]
    assert {"torch-compile", "tensorrt"} <= set(BACKENDS)


def test_cpu_plan_has_no_gpu_only_variants():
    notes: list[str] = []
    labels = [v.label for v in plan_variants(_model("fp32", "fp16", "int8"), "cpu", notes=notes)]
    assert labels == ["torch-fp32", "torch-bf16", "onnxruntime-fp32", "onnxruntime-fp16", "onnxruntime-int8"]
    assert not any("tensorrt" in n or "torch-compile" in n for n in notes)


def test_tensorrt_bench_runner_requires_an_engine_for_this_gpu(artifact_dir, monkeypatch):
    from imgembed.runtime.gpu import GpuIdentity
    from imgembed.runtime.runners import tensorrt as trt_runner
    from imgembed.runtime.runners.tensorrt_plans import EngineEnv

    monkeypatch.setattr(trt_runner, "current_env", lambda: EngineEnv(GpuIdentity("NVIDIA L4", "8.9"), "10.5.0"))
    art = artifact_dir("test-resnet-tiny", "fp32")
    model = BenchModel(get_spec("test-resnet-tiny"), {"kind": "random-init", "seed": 0},
                       [ArtifactRef(art, "fp32", "passed")])
    with pytest.raises(EngineMismatchError, match="has no TensorRT engine at precision fp32; build one with "
                                                  "`imgembed export NAME --trt`"):
        build_runner(model, Variant("tensorrt-fp32", "tensorrt", "fp32", model.artifacts[0]), "cuda", 1,
                     OriginalCache(model))


@pytest.mark.gpu
@pytest.mark.skipif(not gpu_available(), reason="no CUDA device")
def test_ort_cuda_fp16_artifact_runs_with_cuda_options(artifact_dir):  # pragma: no cover - GPU machines only
    if "CUDAExecutionProvider" not in available_providers():
        pytest.skip("onnxruntime CUDA provider not available")
    path = artifact_dir("test-clip-tiny", "fp16") / MODEL_FILE
    x = np.random.default_rng(0).standard_normal((8, 3, *get_spec("test-clip-tiny").input_hw)).astype(np.float32)
    with OrtRunner(path, 24, device="cuda", cuda_options={"cudnn_conv_algo_search": "HEURISTIC"}) as a, \
            OrtRunner(path, 24, device="cuda", io_binding=True) as b, OrtRunner(path, 24) as cpu:
        ref = cpu.infer(x)
        for out in (a.infer(x), b.infer(x)):
            cos = np.sum(out * ref, 1) / np.linalg.norm(out, axis=1) / np.linalg.norm(ref, axis=1)
            assert cos.min() > 0.999
