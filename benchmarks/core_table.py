"""Summarise a full `imgembed bench` run for the core export report: per model, export time, artifact size,
parity (FP32 and INT8) from the artifacts' manifests, and batch-8 throughput of PyTorch eager FP32, ONNX
Runtime FP32 and INT8 from the same run.

    imgembed bench clip-vit-b32 vit-b16 dinov2-small resnet50 --random-init --int8 \
        --batch-sizes 1,8,32 --mode model --max-seconds 30 --out reports/full
    python benchmarks/core_table.py reports/full/bench.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from imgembed.artifact import read_manifest


def _cell(records: list[dict], model: str, variant: str, batch: int) -> dict | None:
    for r in records:
        if (r["model"], r["variant"], r["batch_size"], r["mode"]) == (model, variant, batch, "model-only"):
            return r
    return None


def _artifact_summary(records: list[dict], model: str, precision: str) -> str:
    paths = {r["artifact"] for r in records if r["model"] == model and r["precision"] == precision and r["artifact"]}
    if not paths:
        return "| – | – | – |"
    m = read_manifest(Path(paths.pop())).model_dump(mode="json", by_alias=True)
    met = m["parity"]["metrics"]
    size = m["export"]["model_bytes"] / 1e6
    parity = (f"min cos {met['min_cosine']:.6f}, max abs {met['max_abs']:.2g}" if precision == "fp32" else
              f"min cos {met['min_cosine']:.4f}, mean {met['mean_cosine']:.4f}, kNN {met['knn_agreement']:.2f}")
    return f"| {m['export']['seconds']:.0f} s | {size:.0f} MB | {parity} |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bench_json", type=Path)
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args()
    report = json.loads(args.bench_json.read_text())
    records = report["results"]
    models = sorted({r["model"] for r in records}, key=lambda m: [r["model"] for r in records].index(m))
    print("| model | precision | export | size | parity | img/s (batch %d) | vs PyTorch eager FP32 |" % args.batch)
    print("|---|---|---|---|---|---|---|")
    for model in models:
        torch_rec = _cell(records, model, "torch-fp32", args.batch)
        if torch_rec:
            print(f"| {model} | PyTorch eager FP32 | – | – | reference | {torch_rec['throughput_ips']:.1f} | 1.00x |")
        for precision in ("fp32", "int8"):
            rec = _cell(records, model, f"onnxruntime-{precision}", args.batch)
            ips = f"{rec['throughput_ips']:.1f}" if rec else "–"
            ratio = f"{rec['speedup_vs_original']:.2f}x" if rec and rec.get("speedup_vs_original") else "–"
            summary = _artifact_summary(records, model, precision)
            print(f"| {model} | ORT {precision.upper()} {summary} {ips} | {ratio} |")


if __name__ == "__main__":
    main()
