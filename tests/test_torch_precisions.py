"""TorchRunner precisions and compilation: BF16/FP16 against FP32 on every tiny family (CPU), torch.compile
through dynamo (CPU), typed errors for what needs CUDA, and the CUDA paths (FP16/BF16, CUDA graphs) on a GPU.

Inductor compiles C++ for about a minute per batch size on this 2-core machine, so its test is opt-in:
``IMGEMBED_TEST_INDUCTOR=1``. The default run compiles with the ``aot_eager`` backend, which traces the model
through dynamo and AOTAutograd exactly as inductor receives it, without generating code.
"""
from __future__ import annotations

import os

import numpy as np
import pytest

from imgembed.errors import BackendUnavailableError
from imgembed.gate.samples import parity_images
from imgembed.models.families import load_original
from imgembed.models.registry import get_spec
from imgembed.preprocess import preprocess_batch
from imgembed.runtime.runners.pytorch import TorchRunner

from .conftest import TINY
from .helpers import cosine, gpu_available


def _setup(name: str, n: int = 12):
    spec = get_spec(name)
    pixels = preprocess_batch([img for _, img in parity_images()[:n]], spec.preprocess)
    return spec, load_original(spec, random_init=True), pixels


@pytest.mark.parametrize("name", TINY)
def test_bf16_and_fp16_stay_close_to_fp32_and_leave_the_original_alone(name):
    import torch

    spec, head, pixels = _setup(name)
    with TorchRunner(head, spec.input_hw, spec.embedding.dim, threads=2) as fp32:
        ref = fp32.infer(pixels)
    for dtype, min_cos in (("bf16", 0.999), ("fp16", 0.9999)):
        with TorchRunner(head, spec.input_hw, spec.embedding.dim, threads=2, dtype=dtype) as r:
            out = r.infer(pixels)
            assert r.describe()["dtype"] == dtype
        assert out.dtype == np.float32 and out.shape == ref.shape
        assert not np.array_equal(out, ref)                # really ran in reduced precision
        assert cosine(out, ref).min() >= min_cos, (dtype, cosine(out, ref).min())
    assert {p.dtype for p in head.parameters()} == {torch.float32}   # the caller's module was not cast


def test_bf16_is_coarser_than_fp16():
    """BF16 keeps 8 mantissa bits, FP16 11: on the same inputs BF16 must land measurably farther from FP32."""
    spec, head, pixels = _setup("test-vit-tiny")
    outs = {}
    for dtype in ("fp32", "bf16", "fp16"):
        with TorchRunner(head, spec.input_hw, spec.embedding.dim, threads=2, dtype=dtype) as r:
            outs[dtype] = r.infer(pixels)
    err = {d: np.abs(outs[d] - outs["fp32"]).max() for d in ("bf16", "fp16")}
    assert err["bf16"] > 2 * err["fp16"] > 0


def test_bad_options_are_typed_errors():
    spec, head, _ = _setup("test-clip-tiny", 1)
    with pytest.raises(ValueError, match=r"dtype 'int8'; expected one of \['fp32', 'fp16', 'bf16'\]"):
        TorchRunner(head, spec.input_hw, 24, dtype="int8")
    with pytest.raises(BackendUnavailableError, match="cuda_graphs=True needs device='cuda', got device='cpu'"):
        TorchRunner(head, spec.input_hw, 24, cuda_graphs=True)
    if not gpu_available():
        with pytest.raises(BackendUnavailableError, match="torch.cuda.is_available"):
            TorchRunner(head, spec.input_hw, 24, device="cuda", dtype="bf16")


def test_compiled_runner_matches_eager_at_several_batch_sizes():
    spec, head, pixels = _setup("test-clip-tiny", 8)
    with TorchRunner(head, spec.input_hw, 24, threads=2) as eager:
        ref = eager.infer(pixels)
    with TorchRunner(head, spec.input_hw, 24, threads=2, compile=True, compile_backend="aot_eager") as compiled:
        assert compiled.describe()["compile"] is True
        assert type(compiled._run_module).__name__ == "OptimizedModule"          # really went through dynamo
        out = np.concatenate([compiled.infer(pixels[:3]), compiled.infer(pixels[3:])])   # two specialisations
        np.testing.assert_allclose(compiled.infer(pixels), ref, atol=1e-5)
    np.testing.assert_allclose(out, ref, atol=1e-5)


@pytest.mark.skipif(os.environ.get("IMGEMBED_TEST_INDUCTOR") != "1",
                    reason="inductor compiles C++ for ~1 min per batch size on 2 cores; set IMGEMBED_TEST_INDUCTOR=1")
def test_inductor_compiled_runner_matches_eager():
    spec, head, pixels = _setup("test-resnet-tiny", 4)
    with TorchRunner(head, spec.input_hw, spec.embedding.dim, threads=2) as eager:
        ref = eager.infer(pixels)
    try:
        with TorchRunner(head, spec.input_hw, spec.embedding.dim, threads=2, compile=True) as compiled:
            out = compiled.infer(pixels)
    except Exception as e:  # e.g. no C++ compiler: inductor itself is unusable here, not our runner
        if "inductor" in type(e).__module__ or "CppCompileError" in type(e).__name__:
            pytest.skip(f"inductor failed on this machine: {type(e).__name__}: {str(e)[:200]}")
        raise
    np.testing.assert_allclose(out, ref, atol=1e-4)


# -- CUDA (skipped without a GPU) ------------------------------------------------------------------------------
pytestmark_gpu = pytest.mark.skipif(not gpu_available(), reason="no CUDA device")


@pytest.mark.gpu
@pytestmark_gpu
@pytest.mark.parametrize("dtype,min_cos", [("fp32", 0.99999), ("fp16", 0.999), ("bf16", 0.99)])
def test_cuda_precisions_match_the_cpu_original(dtype, min_cos):  # pragma: no cover - GPU machines only
    spec, head, pixels = _setup("test-dinov2-tiny")
    with TorchRunner(head, spec.input_hw, spec.embedding.dim) as cpu:
        ref = cpu.infer(pixels)
    import copy

    with TorchRunner(copy.deepcopy(head), spec.input_hw, spec.embedding.dim, device="cuda", dtype=dtype) as gpu:
        assert cosine(gpu.infer(pixels), ref).min() >= min_cos


@pytest.mark.gpu
@pytestmark_gpu
@pytest.mark.parametrize("compile", [False, True])
def test_cuda_graphs_replay_matches_eager_for_each_batch_size(compile):  # pragma: no cover - GPU machines only
    import copy

    spec, head, pixels = _setup("test-clip-tiny", 8)
    with TorchRunner(copy.deepcopy(head), spec.input_hw, 24, device="cuda") as eager:
        ref = eager.infer(pixels)
    with TorchRunner(copy.deepcopy(head), spec.input_hw, 24, device="cuda", cuda_graphs=True, compile=compile) as g:
        for _ in range(2):   # the second round replays the captured graphs
            parts = np.concatenate([g.infer(pixels[:3]), g.infer(pixels[3:])])
            np.testing.assert_allclose(parts, ref, atol=1e-4)
        assert sorted(g._graphs) == [3, 5]
