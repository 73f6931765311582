"""imgembed.bench report writers, record assembly (speed-ups, GFLOP/s) and host information."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from imgembed.bench import report
from imgembed.bench.backends import Variant
from imgembed.bench.measure import Measurement
from imgembed.bench.stats import summarize_latencies
from imgembed.bench.suite import SCHEMA, BenchConfig, add_speedups, make_record
from imgembed.bench.targets import ArtifactRef, BenchModel
from imgembed.models.registry import get_spec
from imgembed.runtime import host

RECORD_KEYS = {"model", "family", "source", "mode", "variant", "backend", "precision", "inference_precision",
               "original", "artifact", "parity_status", "device", "threads", "batch_size", "latency_ms",
               "throughput_ips", "window_throughputs", "stable", "stop_reason", "samples", "gflops_per_image",
               "achieved_gflops", "baseline", "speedup_vs_original", "p50_speedup_vs_original"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def measurement(ms_per_call: float, batch: int, stable: bool = True) -> Measurement:
    lat = [ms_per_call / 1e3] * 10
    return Measurement(summarize_latencies(lat), batch * 1e3 / ms_per_call, (1.0, 1.0, 1.0), stable,
                       "stable" if stable else "time-cap", 10, 10 * batch, sum(lat), 2)


@pytest.fixture(scope="module")
def bench_report() -> dict:
    """A report for resnet50 (8.2 GFLOPs/image): original 100 ms/batch, FP32 80 ms, INT8 40 ms (unstable)."""
    model = BenchModel(get_spec("resnet50"), {"kind": "random-init", "seed": 0},
                       [ArtifactRef(Path("a/fp32"), "fp32", "passed"), ArtifactRef(Path("a/int8"), "int8", "passed")])
    variants = [(Variant("torch-fp32", "torch", "fp32"), 100.0),
                (Variant("onnxruntime-fp32", "onnxruntime", "fp32", model.artifacts[0]), 80.0),
                (Variant("onnxruntime-int8", "onnxruntime", "int8", model.artifacts[1]), 40.0)]
    config = BenchConfig(batch_sizes=(1, 8), threads=2)
    records = []
    for bs in (1, 8):
        records += add_speedups([make_record(model, v, "model", bs, config, measurement(ms, bs, v.precision != "int8"))
                                 for v, ms in variants])
    return {"schema": SCHEMA, "created": "2025-01-01T00:00:00+00:00", "seconds": 1.0, "host": host.host_info(),
            "settings": config.to_dict(), "models": [], "results": records, "notes": ["a note"]}


def test_records_carry_speedups_against_the_original_and_gflops(bench_report):
    by = {(r["variant"], r["batch_size"]): r for r in bench_report["results"]}
    assert set(by[("torch-fp32", 8)]) == RECORD_KEYS
    assert by[("torch-fp32", 8)]["speedup_vs_original"] == pytest.approx(1.0)
    assert by[("onnxruntime-fp32", 8)]["speedup_vs_original"] == pytest.approx(100 / 80)
    assert by[("onnxruntime-int8", 1)]["speedup_vs_original"] == pytest.approx(2.5)
    assert by[("onnxruntime-int8", 1)]["p50_speedup_vs_original"] == pytest.approx(2.5)
    assert by[("onnxruntime-int8", 8)]["throughput_ips"] == pytest.approx(200.0)   # 8 images / 40 ms
    assert by[("onnxruntime-int8", 8)]["achieved_gflops"] == pytest.approx(8.2 * 200.0)
    assert by[("onnxruntime-int8", 8)]["artifact"] == str(Path("a/int8"))


def test_records_without_a_baseline_get_no_ratio(bench_report):
    orphans = add_speedups([dict(r) for r in bench_report["results"] if not r["original"]])
    assert orphans and all(r["speedup_vs_original"] is None for r in orphans)


def test_write_all_writes_json_markdown_and_a_valid_png(bench_report, tmp_path):
    paths = report.write_all(bench_report, tmp_path / "out")
    data = json.loads(paths["json"].read_text())
    assert data["schema"] == SCHEMA and len(data["results"]) == 6
    assert {"host", "settings", "results", "notes", "created"} <= set(data)
    assert data == report.load_report(paths["json"])
    png = paths["plot"].read_bytes()
    assert png[:8] == PNG_MAGIC
    with Image.open(paths["plot"]) as im:
        im.verify()
        assert im.format == "PNG" and im.size[0] > 300 and im.size[1] > 200


def test_markdown_has_one_row_per_record_and_the_speedup_summary(bench_report):
    md = report.markdown(bench_report)
    header = "| " + " | ".join(report.TABLE_COLUMNS) + " |"
    assert header in md
    rows = [line for line in md.splitlines() if line.startswith("| resnet50 | model-only |")]
    assert len(rows) == 6 + 2  # six configurations + one speed-up summary row per artifact
    int8_b8 = next(r for r in rows if "onnxruntime-int8 | 8 | 2 |" in r)
    cells = [c.strip() for c in int8_b8.strip("|").split("|")]
    assert cells[5:11] == ["40.00", "40.00", "40.00", "40.00", "200.0", "2.50x"]
    assert cells[11] == "1,640.0" and cells[12] == "–"  # no roofline measured: no % of peak
    assert cells[13] == "**no**" and cells[14] == "10 calls / 3 win"
    assert "| resnet50 | model-only | onnxruntime-int8 | 2.50x | 2.50x |" in md
    assert "1 configuration(s) hit the time cap" not in md and "2 configuration(s) hit the time cap" in md
    assert "- a note" in md


def test_host_info_has_cpu_simd_cores_and_library_versions():
    info = host.host_info()
    assert {"cpu", "gpu", "libraries", "onnxruntime_providers", "os", "load_average"} <= set(info)
    cpu = info["cpu"]
    assert cpu["logical_cores"] >= cpu["usable_cores"] >= 1
    assert set(cpu["simd"]) == set(host.SIMD_FLAGS) and all(isinstance(v, bool) for v in cpu["simd"].values())
    import onnxruntime
    import torch

    assert info["libraries"]["onnxruntime"] == onnxruntime.__version__
    assert info["libraries"]["torch"] == torch.__version__
    assert "CPUExecutionProvider" in info["onnxruntime_providers"]


CPUINFO = """processor\t: 0
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse4_2 avx avx2 fma avx512f avx512_vnni amx_tile amx_int8 amx_bf16
physical id\t: 0
core id\t\t: 0

processor\t: 1
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse4_2 avx avx2 fma avx512f avx512_vnni amx_tile amx_int8 amx_bf16
physical id\t: 0
core id\t\t: 0

processor\t: 2
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse4_2 avx avx2 fma avx512f avx512_vnni amx_tile amx_int8 amx_bf16
physical id\t: 0
core id\t\t: 1
"""


def test_cpuinfo_parsing_finds_model_simd_and_physical_cores():
    parsed = host.parse_cpuinfo(CPUINFO)
    assert parsed["model"] == "Intel(R) Xeon(R) Platinum 8480+"
    assert parsed["physical_cores"] == 2          # three logical CPUs, two (physical id, core id) pairs
    simd = host.simd_features(parsed["flags"])
    assert simd["avx2"] and simd["avx512_vnni"] and simd["amx_int8"] and simd["amx_tile"]
    assert not simd["avx_vnni"] and not simd["neon"]
    arm = host.simd_features(set("fp asimd asimddp i8mm".split()))
    assert arm["neon"] and arm["arm_dotprod"] and arm["arm_i8mm"] and not arm["avx2"]


SAPPHIRE_RAPIDS = set("fpu sse4_2 avx avx2 fma avx512f avx512_vnni avx_vnni avx512_bf16 amx_tile amx_int8 "
                      "amx_bf16".split())


@pytest.mark.parametrize(("isa", "features", "bf16", "onednn_int8"), [
    ("AVX2", {"sse4_2", "avx", "avx2", "fma"}, False, "saturating"),
    ("AVX512_CORE", {"sse4_2", "avx", "avx2", "fma", "avx512f"}, False, "saturating"),
    ("AVX512_CORE_VNNI", {"sse4_2", "avx", "avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni"}, False, "vnni"),
    ("avx512_core_bf16", SAPPHIRE_RAPIDS - {"fpu", "amx_tile", "amx_int8", "amx_bf16"}, True, "vnni"),
    ("AVX10_1_512_AMX", SAPPHIRE_RAPIDS - {"fpu"}, True, "vnni"),
    ("ALL", SAPPHIRE_RAPIDS - {"fpu"}, True, "vnni"),
    ("NOT_AN_ISA", SAPPHIRE_RAPIDS - {"fpu"}, True, "vnni"),   # oneDNN ignores a value it does not know
])
def test_onednn_max_cpu_isa_caps_the_features_of_onednn_engines_not_onnxruntime(isa, features, bf16, onednn_int8,
                                                                               monkeypatch):
    """PyTorch and OpenVINO (oneDNN) use no instruction above ONEDNN_MAX_CPU_ISA; ONNX Runtime ignores it."""
    monkeypatch.delenv(host.CPU_FLAGS_ENV, raising=False)
    monkeypatch.setattr(host, "_detected_flags", lambda: {"model": "Xeon 8480+", "flags": set(SAPPHIRE_RAPIDS),
                                                          "physical_cores": 2, "flags_source": "/proc/cpuinfo"})
    monkeypatch.setattr(host.platform, "machine", lambda: "x86_64")
    monkeypatch.setenv(host.ONEDNN_ISA_ENV, isa)
    info = host.cpu_info()
    assert {k for k, v in info["simd"].items() if v} == features
    assert (host.missing_bf16_instructions() is None) == bf16
    assert host.int8_kernels() == host.int8_kernels("openvino") == onednn_int8
    assert host.int8_kernels("onnxruntime") == "vnni" and host.int8_saturation("onnxruntime") is None
    assert host.cpu_info(capped=False)["simd"]["amx_bf16"]
    if not bf16:
        assert info["flags_source"] == f"/proc/cpuinfo capped by ONEDNN_MAX_CPU_ISA={isa}"
        assert f"Xeon 8480+, /proc/cpuinfo capped by ONEDNN_MAX_CPU_ISA={isa}) lacks native BF16" in \
            host.missing_bf16_instructions()
    monkeypatch.setenv(host.CPU_FLAGS_ENV, "avx2,fma")   # a simulated CPU is taken as it is, never capped
    monkeypatch.setenv(host.ONEDNN_ISA_ENV, "AVX512_CORE_AMX")
    assert host.int8_kernels() == host.int8_kernels("onnxruntime") == "saturating"
