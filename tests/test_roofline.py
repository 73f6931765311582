"""The roofline: this host's peaks per engine and precision, each record's % of peak, the report and the CLI switch.

The measured peaks use small shapes (a 1024^3 GEMM; the conv only in the bench CLI test) so the module stays fast;
speed is asserted only as ratios with wide margins, and only where the CPU guarantees them.
"""
from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from imgembed.bench import report, roofline
from imgembed.bench.roofline import add_peaks, measure_peaks, peak_key
from imgembed.cli import app
from imgembed.runtime.host import int8_kernels, missing_bf16_instructions

SMALL_GEMM = (1024, 1024, 1024)


@pytest.fixture(scope="module")
def peaks() -> list[dict]:
    return measure_peaks(2, kernels=("gemm",), gemm=SMALL_GEMM)


def _peak(rows: list[dict], backend: str, precision: str) -> dict:
    return next(r for r in rows if (r["backend"], r["precision"], r["kernel"]) == (backend, precision, "gemm"))


def test_every_usable_pair_gets_a_positive_peak_or_a_reason(peaks):
    assert [(r["backend"], r["precision"]) for r in peaks] == list(roofline.PAIRS)
    for r in peaks:
        assert r["threads"] == 2 and r["shape"] == "M1024 K1024 N1024" and r["gop"] == pytest.approx(2.147, abs=1e-3)
        if r.get("skipped"):
            assert r["gops_per_s"] is None and r["skipped"]
        else:
            assert r["gops_per_s"] > 0 and r["seconds"] > 0
            assert r["gops_per_s"] == pytest.approx(r["gop"] / r["seconds"], rel=0.01)
    assert _peak(peaks, "onnxruntime", "fp32")["gops_per_s"] and _peak(peaks, "torch", "fp32")["gops_per_s"]


def test_openvino_rows_say_they_ran_in_their_precision(peaks):
    """The INT8 peak is an int8 kernel (not a dequantized float one); BF16 runs only where the CPU has it."""
    pytest.importorskip("openvino")
    assert _peak(peaks, "openvino", "fp32")["runtime_precision"] == "f32"
    assert _peak(peaks, "openvino", "int8")["runtime_precision"] in ("u8", "i8")
    bf16 = _peak(peaks, "openvino", "bf16")
    if missing_bf16_instructions():
        assert bf16["gops_per_s"] is None and "BF16" in bf16["skipped"]
    else:
        assert bf16["runtime_precision"] == "bf16" and bf16["gops_per_s"] > 0


def test_onnxruntime_int8_beats_fp32_where_the_cpu_has_vnni(peaks):
    if int8_kernels("onnxruntime") != "vnni":
        pytest.skip("no VNNI/AMX-INT8 for ONNX Runtime here: its int8 GEMM need not beat FP32")
    assert _peak(peaks, "onnxruntime", "int8")["gops_per_s"] > 1.3 * _peak(peaks, "onnxruntime", "fp32")["gops_per_s"]


def test_openvino_int8_beats_fp32_where_onednn_has_vnni(peaks):
    pytest.importorskip("openvino")
    if int8_kernels("openvino") != "vnni":
        pytest.skip("no VNNI/AMX-INT8 for oneDNN here (or capped by ONEDNN_MAX_CPU_ISA)")
    assert _peak(peaks, "openvino", "int8")["gops_per_s"] > 1.3 * _peak(peaks, "openvino", "fp32")["gops_per_s"]


def test_onednn_rows_carry_the_isa_cap_and_onnxruntime_rows_say_uncapped(monkeypatch):
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    rows = measure_peaks(1, backends=("onnxruntime", "torch"), precisions=("fp32",), kernels=("gemm",),
                         gemm=(256, 256, 256))
    caps = {r["backend"]: r["isa_cap"] for r in rows}
    assert caps["onnxruntime"] == "uncapped (MLAS)" and caps["torch"] in ("AVX2", "uncapped (MKL)")


FAKE_PEAKS = [
    {"backend": "onnxruntime", "precision": "fp32", "kernel": "gemm", "gops_per_s": 100.0},
    {"backend": "onnxruntime", "precision": "fp32", "kernel": "conv", "gops_per_s": 80.0},
    {"backend": "onnxruntime", "precision": "int8", "kernel": "gemm", "gops_per_s": 400.0},
    {"backend": "openvino", "precision": "fp32", "kernel": "gemm", "gops_per_s": 110.0},
    {"backend": "openvino", "precision": "bf16", "kernel": "conv", "gops_per_s": 300.0},
    {"backend": "openvino", "precision": "bf16", "kernel": "gemm", "gops_per_s": 600.0},
    {"backend": "openvino", "precision": "int8", "kernel": "gemm", "gops_per_s": 1200.0},
    {"backend": "torch", "precision": "fp32", "kernel": "gemm", "gops_per_s": 120.0},
    {"backend": "torch", "precision": "fp32", "kernel": "conv", "gops_per_s": None, "skipped": "why"},
]


def _record(variant: str, backend: str, precision: str, inference: str | None = None, gflops: float | None = 50.0,
            device: str = "cpu") -> dict:
    return {"variant": variant, "backend": backend, "precision": precision, "device": device,
            "inference_precision": inference or precision, "achieved_gflops": gflops}


@pytest.mark.parametrize("record, key, peak", [
    (_record("onnxruntime-fp32", "onnxruntime", "fp32"), ("onnxruntime", "fp32"), 100.0),  # the higher kernel
    (_record("onnxruntime-int8", "onnxruntime", "int8"), ("onnxruntime", "int8"), 400.0),
    (_record("openvino-int8+bf16", "openvino", "int8", "bf16"), ("openvino", "int8"), 1200.0),
    (_record("openvino-fp32+bf16", "openvino", "fp32", "bf16"), ("openvino", "bf16"), 600.0),
    (_record("openvino-bf16", "openvino", "bf16"), ("openvino", "bf16"), 600.0),
    (_record("openvino-fp32", "openvino", "fp32"), ("openvino", "fp32"), 110.0),
    (_record("torch-fp32", "torch", "fp32"), ("torch", "fp32"), 120.0),
    (_record("torch-compile-fp32", "torch-compile", "fp32"), ("torch", "fp32"), 120.0),
    (_record("torch-bf16", "torch", "bf16"), ("torch", "bf16"), None),        # no torch BF16 peak measured
    (_record("torch-fp32", "torch", "fp32", device="cuda"), ("torch", "fp32"), None),  # CPU peaks only
])
def test_each_variant_gets_the_peak_of_its_engine_and_precision(record, key, peak):
    assert peak_key(record) == key
    add_peaks([record], FAKE_PEAKS)
    assert record["peak_gops"] == peak
    assert record["percent_of_peak"] == (None if peak is None else pytest.approx(100 * 50.0 / peak, abs=0.05))


def test_no_peaks_or_no_gflops_leave_the_percentage_blank():
    rec = add_peaks([_record("onnxruntime-fp32", "onnxruntime", "fp32", gflops=None)], FAKE_PEAKS)[0]
    assert rec["peak_gops"] == 100.0 and rec["percent_of_peak"] is None
    rec = add_peaks([_record("onnxruntime-fp32", "onnxruntime", "fp32")], None)[0]
    assert rec["peak_gops"] is None and rec["percent_of_peak"] is None


def _report(roofline_rows: list[dict] | None, with_peaks: bool) -> dict:
    rec = {"model": "resnet50", "mode": "model-only", "variant": "onnxruntime-int8", "backend": "onnxruntime",
           "precision": "int8", "original": False, "batch_size": 8, "threads": 2, "device": "cpu",
           "baseline": "torch-fp32", "latency_ms": {"p50": 40.0, "p90": 40.0, "p99": 40.0, "mean": 40.0},
           "throughput_ips": 200.0,
           "speedup_vs_original": None, "achieved_gflops": 1640.0, "stable": True,
           "samples": {"calls": 10, "windows": 3}}
    if with_peaks:
        add_peaks([rec], roofline_rows)
    host = {"cpu": {"model": "x", "arch": "x86_64", "usable_cores": 2, "logical_cores": 2, "simd": {"avx2": True}},
            "gpu": None, "libraries": {"onnxruntime": "1"}, "load_average": None}
    settings = {"device": "cpu", "threads": 2, "warmup_calls": 2, "window_seconds": 1.0, "stability_windows": 3,
                "stability_tolerance": 0.1, "max_seconds": 10.0, "baseline": "torch-fp32", "torch_attention": "sdpa"}
    out = {"created": "2025-01-01", "seconds": 1.0, "host": host, "settings": settings, "results": [rec], "notes": []}
    return {**out, "roofline": roofline_rows} if roofline_rows is not None else out


def test_markdown_shows_percent_of_peak_and_the_roofline_table():
    rows = [{**r, "shape": "M1 K1 N1", "threads": 2, "isa_cap": None} for r in FAKE_PEAKS]
    md = report.markdown(_report(rows, with_peaks=True))
    assert "| GFLOP/s | % of peak |" in md and "| 1,640.0 | 410 % |" in md  # 1640 / 400
    assert "## Roofline: this host's peaks" in md
    assert "| onnxruntime | int8 | 400.0 | – | 400.0 | 2 | – |" in md
    assert "| torch | fp32 | 120.0 | – | 120.0 | 2 | – |" in md


def test_an_old_report_without_roofline_fields_still_renders():
    md = report.markdown(_report(None, with_peaks=False))
    assert "| 1,640.0 | – |" in md and "Roofline" not in md


def test_bench_cli_measures_peaks_by_default_and_no_roofline_skips_them(tmp_path, monkeypatch):
    """The CLI wiring, with no models (nothing to export) and a fake measurement."""
    calls = []
    monkeypatch.setattr("imgembed.cli.bench._prepare", lambda *a, **k: ([], []))
    monkeypatch.setattr("imgembed.bench.suite.measure_peaks",
                        lambda threads, backends=None: calls.append(threads) or FAKE_PEAKS)
    for flag, expected in (([], FAKE_PEAKS), (["--no-roofline"], None)):
        out = tmp_path / (flag[0][2:] if flag else "default")
        res = CliRunner().invoke(app, ["bench", "test-resnet-tiny", "--threads", "1", "--out", str(out), *flag])
        assert res.exit_code == 0, res.output
        data = json.loads((out / "bench.json").read_text())
        assert data["roofline"] == expected and data["settings"]["roofline"] is (not flag)
    assert calls == [1]


def test_the_onnxruntime_int8_graphs_run_as_integer_kernels(tmp_path):
    """ONNX Runtime fuses the QDQ GEMM and conv into integer ops: no float MatMul or Conv is left."""
    ort = pytest.importorskip("onnxruntime")
    import onnx

    graphs = roofline._Graphs(tmp_path, {"gemm": (64, 128, 128), "conv": (1, 16, 8, 8, 16)})
    for kernel, float_op in (("gemm", "MatMul"), ("conv", "Conv")):
        src, _ = graphs.get(kernel, "int8")
        opts = ort.SessionOptions()
        opts.optimized_model_filepath = str(tmp_path / f"{kernel}-optimized.onnx")
        ort.InferenceSession(str(src), opts, providers=["CPUExecutionProvider"])
        ops = {n.op_type for n in onnx.load(opts.optimized_model_filepath).graph.node}
        assert float_op not in ops and ops & {"QLinearMatMul", "MatMulIntegerToFloat", "QLinearConv", "ConvInteger",
                                              "DynamicQuantizeMatMul", "QGemm"}, ops
