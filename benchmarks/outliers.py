"""INT8 on trained-like weights: the engine race on outlier-bearing fixtures and on plain random weights.

    python benchmarks/outliers.py                                   # clip-vit-b32 vit-b16 dinov2-small resnet50
    python benchmarks/outliers.py vit-b16 --plain                   # also the same model without the fixture
    python benchmarks/outliers.py --json benchmarks/results/outliers.json

For each model: the full-size architecture with random weights (seed 0) is given the trained-like fixture of
its kind (FP32-equivalent, see :mod:`imgembed.testing.outliers`): LayerNorm outlier channels for transformers
(4 channels x40, offsets), per-channel range imbalance for CNNs (4 channels x40 in every Conv-BN-ReLU-Conv
chain); it is saved with ``save_pretrained`` and exported with ``imgembed export --int8 --weights DIR``, which
races every INT8 candidate. Printed per candidate: gate result and metrics (plain recipes first: the "before";
the outlier-aware fallbacks: the "after"), speed here; and the winner's speed-up over the FP32 graph on ONNX
Runtime, timed side by side in the same export (batch 8). CPU flags are printed with the numbers.
"""
from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import imgembed
from imgembed.export.pipeline import ExportOptions, export_model
from imgembed.models.families import family_of, load_original
from imgembed.runtime.host import cpu_summary
from imgembed.testing.outliers import add_conv_channel_imbalance, add_outlier_channels

DEFAULT_MODELS = ("clip-vit-b32", "vit-b16", "dinov2-small", "resnet50")


def checkpoint(name: str, cache: Path, fixture: bool) -> Path:
    """The random-init original of ``name`` (with the fixture when asked), saved once in ``cache``."""
    spec = imgembed.get_spec(name)
    path = cache / f"{name}-{'outliers' if fixture else 'plain'}"
    if (path / "config.json").exists():
        return path
    head = load_original(spec, random_init=True)
    if fixture:
        if family_of(spec).transformer(spec):
            add_outlier_channels(head.model, n_channels=4, scale=40.0)
        else:
            add_conv_channel_imbalance(head.model, n_channels=4, scale=40.0)
    head.model.save_pretrained(str(path))
    return path


def run(name: str, cache: Path, fixture: bool, threads: int) -> dict:
    ckpt = checkpoint(name, cache, fixture)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = export_model(name, cache / f"{ckpt.name}-int8", ExportOptions(
            precision="int8", weights=ckpt, threads=threads, keep_failed=True),
            step=lambda s: print(f"    {s}", flush=True))
    m = res.manifest.model_dump(mode="json", by_alias=True)
    speed = (m["export"]["quantization"] or {}).get("speed_check") or {}
    keys = ("id", "passed", "why_not", "metrics", "img_per_s")
    rows = [{k: r[k] for k in keys} for r in m["selection"]["candidates"]]
    return {"model": name, "weights": "outlier fixture" if fixture else "plain random init", "status": m["status"],
            "default_engine": m["default_engine"], "metrics": m["parity"]["metrics"],
            "speedup_vs_fp32": speed.get("speedup_vs_fp32"), "fp32_ms": speed.get("fp32_ms"),
            "int8_ms": speed.get("int8_ms"), "recipe": {k: v for k, v in (m["export"]["quantization"] or {}).items()
                                                         if k in ("preset", "smoothquant", "equalization",
                                                                  "smooth_quant", "method")},
            "candidates": rows, "seconds": round(time.perf_counter() - t0, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="*", default=list(DEFAULT_MODELS))
    ap.add_argument("--plain", action="store_true", help="Also export each model without the fixture.")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache", type=Path, default=Path("benchmarks/results/cache"))
    ap.add_argument("--json", type=Path, default=Path("benchmarks/results/outliers.json"))
    args = ap.parse_args()
    args.cache.mkdir(parents=True, exist_ok=True)
    cpu = cpu_summary()
    print(f"CPU {cpu['model']}: {' '.join(cpu['flags'])}; {args.threads} threads", flush=True)
    results = []
    for name in args.models:
        for fixture in ((True, False) if args.plain else (True,)):
            print(f"{name} ({'outlier fixture' if fixture else 'plain random init'})", flush=True)
            r = run(name, args.cache, fixture, args.threads)
            results.append(r)
            for c in r["candidates"]:
                met = c["metrics"] or {}
                print(f"  {c['id']:<36} {'pass' if c['passed'] else 'FAIL':<5} "
                      f"min {met.get('min_cosine', float('nan')):.4f} mean {met.get('mean_cosine', float('nan')):.4f} "
                      f"knn {met.get('knn_agreement', float('nan')):.3f} {c['img_per_s'] or '':>8} img/s "
                      f"{(c['why_not'] or '')[:70]}", flush=True)
            sp = r["speedup_vs_fp32"]
            print(f"  -> {r['status']}: {r['default_engine']}, {sp and round(sp, 2)}x FP32 (ORT) at batch 8",
                  flush=True)
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({"cpu": cpu, "threads": args.threads, "results": results}, indent=2))


if __name__ == "__main__":
    main()
