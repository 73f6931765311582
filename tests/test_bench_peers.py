"""benchmarks/peers.py --quick on one tiny model: every contestant this CPU can run is timed and parity-checked;
the others (BF16 without AVX512_BF16/AMX-BF16) are not planned and the report says why."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from imgembed.runtime.host import CPU_FLAGS_ENV, ONEDNN_ISA_ENV, cpu_info, missing_bf16_instructions

pytest.importorskip("openvino")
pytest.importorskip("nncf")
pytest.importorskip("optimum.onnxruntime")
pytest.importorskip("optimum.exporters.onnx")

REPO = Path(__file__).resolve().parents[1]
FP32 = ("pytorch-fp32", "imgembed-fp32", "openvino-fp32", "optimum-fp32")


def _peers():
    """benchmarks/peers.py as a module (benchmarks/ is no package)."""
    if "benchmarks_peers" not in sys.modules:
        spec = importlib.util.spec_from_file_location("benchmarks_peers", REPO / "benchmarks" / "peers.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module   # its dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules["benchmarks_peers"]


@pytest.mark.parametrize("flags", ["sse4_2,avx,avx2,fma", "avx2,fma,avx512f,avx512_vnni"])
def test_peers_plans_no_bf16_contestant_on_a_cpu_without_bf16(flags, monkeypatch):
    monkeypatch.setenv(CPU_FLAGS_ENV, flags)
    plan = _peers().make_plan(imgembed_bf16=True)
    assert plan["imgembed_precisions"] == ["fp32", "int8"] and plan["openvino_bf16"] is False
    assert set(plan["skipped"]) == {"imgembed-bf16", "openvino-bf16"}
    for why in plan["skipped"].values():
        assert "lacks native BF16 instructions" in why and "needs AVX512_BF16 or AMX-BF16" in why, why


def test_peers_plans_bf16_contestants_where_the_cpu_has_bf16_unless_capped(monkeypatch):
    peers = _peers()
    for flags in ("avx2,fma,avx512f,avx512_vnni,avx512_bf16", "avx2,fma,avx512f,amx_tile,amx_bf16"):
        monkeypatch.setenv(CPU_FLAGS_ENV, flags)
        plan = peers.make_plan(imgembed_bf16=True)
        assert plan == {"imgembed_precisions": ["fp32", "int8", "bf16"], "openvino_bf16": True, "skipped": {}}
    plan = peers.make_plan(imgembed_bf16=False, no_openvino_bf16=True)
    assert plan["skipped"] == {"imgembed-bf16": "imgembed export offers no --bf16",
                               "openvino-bf16": "--no-openvino-bf16"}
    monkeypatch.delenv(CPU_FLAGS_ENV)
    monkeypatch.setenv(ONEDNN_ISA_ENV, "AVX512_CORE_VNNI")   # oneDNN (OpenVINO, PyTorch) uses no BF16 then
    assert set(peers.make_plan(imgembed_bf16=True)["skipped"]) == {"imgembed-bf16", "openvino-bf16"}


@pytest.mark.timeout(330)
def test_peers_quick_times_every_contestant_with_parity(tmp_path):
    out, md = tmp_path / "peers.json", tmp_path / "peers.md"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "peers.py"), "--quick", "--models",
                           "test-vit-tiny", "--rounds", "2", "--window", "0.05", "--threads", "1", "--batch", "4",
                           "--out", str(out), "--markdown", str(md)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=320)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["threads"] == 1 and report["batch"] == 4 and report["rounds"] == 2
    assert report["cpu"]["flags"] == cpu_info()["simd"]
    for lib in ("torch", "onnxruntime", "openvino", "nncf", "optimum", "transformers"):
        assert report["versions"][lib], lib
    (model,) = report["models"]
    plan = report["plan"]
    expected = {"pytorch-fp32", "openvino-fp32", "openvino-int8", "optimum-fp32", "optimum-int8",
                *(f"imgembed-{p}" for p in plan["imgembed_precisions"])}
    if plan["openvino_bf16"]:
        expected.add("openvino-bf16")
    no_bf16 = missing_bf16_instructions()
    if no_bf16:   # not planned, and the report says why: no failed row for what the CPU cannot do
        assert plan["skipped"]["openvino-bf16"] == no_bf16 and "openvino-bf16" not in expected
        assert "bf16" not in plan["imgembed_precisions"] and plan["skipped"]["imgembed-bf16"] == no_bf16
    assert not set(plan["skipped"]) & expected
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
    assert all(f"- {key}: {why}" in text for key, why in plan["skipped"].items())
    assert all(v["paired"] is None or v["paired"] > 0 for v in model["tracked_ratios"].values())
