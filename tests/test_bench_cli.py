"""``imgembed bench`` through a real subprocess, its option parsing, and the pytest-benchmark suites' wiring."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

from imgembed.cli import app
from imgembed.cli.bench import parse_batch_sizes, parse_engines

from .helpers import REPO, cli_env, gpu_available, manifest_json, run_cli


@pytest.fixture(scope="module")
def bench_cache(tmp_path_factory) -> Path:
    """One artifact cache for this module: the CLI run exports into it, the suite smoke test reuses it."""
    return tmp_path_factory.mktemp("bench-cache")


@pytest.mark.timeout(300)
def test_bench_cli_writes_json_markdown_and_plot_with_the_original_and_ratios(tmp_path, bench_cache):
    out = tmp_path / "report"
    proc = run_cli("bench", "test-resnet-tiny", "--random-init", "--int8", "--batch-sizes", "1,2", "--max-seconds",
                   "0.3", "--threads", "1", "--out", str(out), "--cache-dir", str(bench_cache),
                   cwd=tmp_path, timeout=300, env=cli_env(COLUMNS="160"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((out / "bench.json").read_text())
    rows = {(r["variant"], r["batch_size"]): r for r in data["results"]}
    cached = {p.name: manifest_json(p) for p in bench_cache.iterdir() if not p.name.startswith(".")}
    engines = [e for m in cached.values() for e in m["engines"]]     # every engine that passed its gate
    assert {"onnxruntime-fp32", "openvino-fp32"} <= {e["id"] for e in engines}
    variants = {v for v, _ in rows}
    assert {"torch-fp32", "torch-bf16", "onnxruntime-fp32", "onnxruntime-int8", "openvino-fp32"} <= variants
    assert len(variants) == 2 + len(engines) and set(rows) == {(v, b) for v in variants for b in (1, 2)}
    for (_, bs), r in rows.items():
        base = rows[("torch-fp32", bs)]
        assert base["original"] is True and base["speedup_vs_original"] == 1.0
        assert r["speedup_vs_original"] == pytest.approx(r["throughput_ips"] / base["throughput_ips"], rel=1e-3)
        assert r["threads"] == 1 and r["mode"] == "model-only" and r["samples"]["calls"] >= 1
        assert r["latency_ms"]["p50"] <= r["latency_ms"]["p90"] <= r["latency_ms"]["p99"]
    assert data["settings"]["max_seconds"] == 0.3 and data["settings"]["batch_sizes"] == [1, 2]
    assert data["host"]["cpu"]["simd"] and data["host"]["libraries"]["onnxruntime"]
    peaks = {(p["backend"], p["precision"]) for p in data["roofline"] if p["gops_per_s"]}  # measured by default
    assert {("torch", "fp32"), ("onnxruntime", "fp32")} <= peaks and all(p["threads"] == 1 for p in data["roofline"])
    assert rows[("torch-fp32", 1)]["peak_gops"] > 0  # tiny models have no GFLOP count: % of peak stays blank
    assert sorted(p.name for p in bench_cache.iterdir() if not p.name.startswith(".")) == [
        "test-resnet-tiny-fp32-random-s0", "test-resnet-tiny-int8-random-s0"]
    md = (out / "bench.md").read_text()
    assert md.count("| test-resnet-tiny | model-only |") == len(rows) + len(variants) - 1  # + the ratio table
    assert "torch-fp32 (original)" in md and "% of peak" in md and "## Roofline: this host's peaks" in md
    with Image.open(out / "bench.png") as im:
        assert im.format == "PNG"
    assert "bench.json" in proc.stdout and "test-resnet-tiny model-only b=2" in proc.stderr


@pytest.mark.timeout(300)
def test_pytest_benchmark_suites_run_on_the_shared_runners(bench_cache):
    """`pytest benchmarks/` collects and runs (benchmarking disabled: one call each) on a tiny model."""
    env = cli_env(IMGEMBED_BENCH_MODELS="test-resnet-tiny", IMGEMBED_BENCH_BATCH_SIZES="2",
               IMGEMBED_BENCH_CACHE=str(bench_cache), IMGEMBED_BENCH_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "pytest", "benchmarks", "-q", "--benchmark-disable",
                           "-p", "no:cacheprovider"], capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "6 passed" in proc.stdout  # 2 suites x 3 variants x 1 batch size


def test_batch_sizes_are_parsed_and_validated():
    assert parse_batch_sizes("1,8,32") == (1, 8, 32)
    assert parse_batch_sizes("8, 8,1") == (8, 1)
    for bad in ("1,x", "0,4", ""):
        with pytest.raises(typer.BadParameter, match="batch sizes|integers"):
            parse_batch_sizes(bad)


@pytest.mark.skipif(gpu_available(), reason="checks the no-GPU error")
def test_cuda_without_a_gpu_is_an_error_not_a_cpu_report(tmp_path):
    res = CliRunner().invoke(app, ["bench", "test-resnet-tiny", "--random-init", "--device", "cuda",
                                   "--out", str(tmp_path / "r")])
    assert res.exit_code == 1 and "no usable NVIDIA GPU" in res.output
    assert not (tmp_path / "r").exists()


def test_engines_are_checked_against_the_backend_table():
    assert parse_engines("openvino, onnxruntime,openvino") == ("openvino", "onnxruntime")
    assert parse_engines(None) is None
    with pytest.raises(typer.BadParameter, match=r"unknown backend\(s\) \['tvm'\]"):
        parse_engines("onnxruntime,tvm")


def test_bad_options_are_usage_errors_naming_the_value():
    runner = CliRunner()
    res = runner.invoke(app, ["bench", "test-resnet-tiny", "--mode", "fast"])
    assert res.exit_code == 2 and "'fast'" in res.output
    res = runner.invoke(app, ["bench", "test-resnet-tiny", "--batch-sizes", "1,b"])
    assert res.exit_code == 2 and "'1,b'" in res.output
    res = runner.invoke(app, ["bench", "no-such-model", "--max-seconds", "0.1"])
    assert res.exit_code == 1 and "unknown model 'no-such-model'" in res.output
    res = runner.invoke(app, ["bench", "--help"], terminal_width=200, env={"COLUMNS": "200"})
    assert res.exit_code == 0 and "--compare-original" in res.output and "--batch-sizes" in res.output
    assert "(default: all cores)" in res.output
