"""ONNX Runtime engines that run everywhere compute the same vectors on an AVX2-only CPU.

ONNX Runtime picks its kernels (MLAS) from CPUID and has no switch to cap them, so an AVX2-only CPU (no
AVX-512, no VNNI, no BF16) is emulated: ``qemu-x86_64 -cpu Haswell`` (Debian package qemu-user; the tests skip
where it is not installed). Every ONNX Runtime engine of an FP32 and an INT8 export that is not marked
``needs_vnni`` must give this CPU's vectors there. OpenVINO and PyTorch are capped with ``ONEDNN_MAX_CPU_ISA``
instead (tests/test_int8_portability.py, ``make test-cpu-classes``).
"""
from __future__ import annotations

import platform
import shutil
import subprocess
import sys

import numpy as np
import pytest

import imgembed
from imgembed.gate.samples import parity_images
from imgembed.preprocess import resize_crop

from .helpers import cosine, manifest_json

if platform.machine().lower() not in ("x86_64", "amd64"):
    pytest.skip("an emulated x86 CPU is an x86 matter", allow_module_level=True)
pytestmark = pytest.mark.skipif(shutil.which("qemu-x86_64") is None,
                                reason="qemu-user (qemu-x86_64) is not installed: no emulated AVX2-only CPU")

HASWELL = ["qemu-x86_64", "-cpu", "Haswell"]
RUN_ENGINES = """
import sys, numpy as np, onnxruntime as ort
feeds = np.load(sys.argv[1])
out = {}
for key in feeds.files:
    model = key.split("|", 1)[1]
    s = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    out[key] = s.run(None, {s.get_inputs()[0].name: feeds[key]})[0]
np.savez(sys.argv[2], **out)
"""


def _portable_feeds(artifacts) -> dict[str, np.ndarray]:
    """``"engine id|model path"`` -> the engine's input for six parity images, for every ONNX Runtime engine of
    ``artifacts`` that is not marked ``needs_vnni``."""
    feeds = {}
    images = [img for _, img in parity_images()[:6]]
    for art in artifacts:
        m = manifest_json(art)
        with imgembed.load(art, backend="onnxruntime", workers=0) as emb:
            x = emb.model_input(np.stack([resize_crop(img, emb.preprocess) for img in images]))
        for e in m["engines"]:
            if e["backend"] == "onnxruntime" and not e.get("needs_vnni"):
                feeds[f"{e['id']}|{art / e['files']['model']}"] = x
    return feeds


def _run(prefix: list[str], feeds_file, out_file) -> dict[str, np.ndarray]:
    proc = subprocess.run([*prefix, sys.executable, "-c", RUN_ENGINES, str(feeds_file), str(out_file)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with np.load(out_file) as out:
        return {k: out[k] for k in out.files}


@pytest.mark.timeout(1200)
def test_portable_onnxruntime_engines_give_the_same_vectors_on_an_emulated_avx2_only_cpu(artifact_dir, tmp_path):
    artifacts = [artifact_dir(name, precision) for name in ("test-vit-tiny", "test-resnet-tiny")
                 for precision in ("fp32", "int8")]
    feeds = _portable_feeds(artifacts)
    assert {k.split("|")[0] for k in feeds} >= {"onnxruntime-fp32"}
    assert any(k.startswith("onnxruntime-int8") for k in feeds), list(feeds)
    np.savez(tmp_path / "feeds.npz", **feeds)
    native = _run([], tmp_path / "feeds.npz", tmp_path / "native.npz")
    avx2 = _run(HASWELL, tmp_path / "feeds.npz", tmp_path / "avx2.npz")
    assert set(avx2) == set(native) == set(feeds)
    for key in feeds:
        assert np.all(np.isfinite(avx2[key])), key
        assert cosine(avx2[key], native[key]).min() >= 0.99999, (key, cosine(avx2[key], native[key]).min())
