"""benchmarks/peers.py --quick on one tiny model: every contestant is timed and parity-checked."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("openvino")
pytest.importorskip("nncf")
pytest.importorskip("optimum.onnxruntime")
pytest.importorskip("optimum.exporters.onnx")

REPO = Path(__file__).resolve().parents[1]
FP32 = ("pytorch-fp32", "imgembed-fp32", "openvino-fp32", "optimum-fp32")


@pytest.mark.timeout(180)
def test_peers_quick_times_every_contestant_with_parity(tmp_path):
    out, md = tmp_path / "peers.json", tmp_path / "peers.md"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "peers.py"), "--quick", "--models",
                           "test-vit-tiny", "--rounds", "2", "--window", "0.05", "--threads", "1", "--batch", "4",
                           "--out", str(out), "--markdown", str(md)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=170)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["threads"] == 1 and report["batch"] == 4 and report["rounds"] == 2
    assert set(report["cpu"]["flags"]) >= {"avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16"}
    for lib in ("torch", "onnxruntime", "openvino", "nncf", "optimum", "transformers"):
        assert report["versions"][lib], lib
    (model,) = report["models"]
    plan = report["plan"]
    expected = {"pytorch-fp32", "openvino-fp32", "openvino-int8", "optimum-fp32", "optimum-int8",
                *(f"imgembed-{p}" for p in plan["imgembed_precisions"])}
    if plan["openvino_bf16"]:
        expected.add("openvino-bf16")
    results = model["contestants"]
    assert set(results) == expected
    for key, r in results.items():
        assert r["status"] == "ok", f"{key}: {r.get('reason')}"
        assert math.isfinite(r["img_per_s"]) and r["img_per_s"] > 0, key
        assert len(r["round_img_per_s"]) == 2, key
        if key in FP32:
            assert r["parity"]["min_cosine"] > 0.99, (key, r["parity"])
        else:
            assert r["parity"]["min_cosine"] > 0.9, (key, r["parity"])
    assert results["pytorch-fp32"]["ratio_vs_pytorch_fp32"] == pytest.approx(1.0)
    assert set(model["tracked_ratios"]) == {"imgembed-int8 / openvino-int8", "imgembed-int8 / optimum-int8",
                                            "imgembed-bf16 / imgembed-fp32"}
    text = md.read_text()
    assert ("| model | contestant | img/s | ratio vs PyTorch FP32 | ratio vs imgembed INT8 | min cos | mean cos |"
            in text)
    assert all(f"| test-vit-tiny | {key}" in text for key in expected)
    assert all(v["paired"] is None or v["paired"] > 0 for v in model["tracked_ratios"].values())
