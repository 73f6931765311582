"""Where the default engines stand under this host's roofline: model-only img/s at one batch size of each
artifact's default engine (FP32, INT8, and BF16 where the CPU has it) and of the PyTorch original FP32, with the
achieved GOP/s, the engine's peak (:func:`imgembed.bench.roofline.measure_peaks`) and % of peak.

    python benchmarks/roofline.py                                   # the four families, this CPU uncapped
    python benchmarks/roofline.py clip-vit-b32 resnet50 --cpu-class avx2 --cache-dir ~/.cache/imgembed/bench

Random weights (``--random-init`` exports, cached in ``--cache-dir`` between runs: a full-size export takes
minutes on 2 cores). ``--cpu-class`` re-runs the script with ``ONEDNN_MAX_CPU_ISA`` set as tests/cpu_classes.py
does: oneDNN (OpenVINO, PyTorch's convolutions) honours the cap, ONNX Runtime does not, so its rows are marked
"uncapped". Writes ``benchmarks/results/roofline.json`` (``roofline-CLASS.json`` with ``--cpu-class``) and its
``.md`` (override with ``--out``) and prints the table with the CPU flags.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from imgembed.artifact import read_manifest
from imgembed.bench.backends import OriginalCache, build_runner, plan_variants
from imgembed.bench.measure import MeasureSettings, measure_interleaved
from imgembed.bench.roofline import add_peaks, measure_peaks, peaks_by_pair
from imgembed.bench.suite import BenchConfig, add_speedups, batch_function, make_record
from imgembed.bench.targets import resolve_targets
from imgembed.errors import ImgembedError
from imgembed.gate.samples import parity_images
from imgembed.preprocess import preprocess_batch
from imgembed.preprocess.fast import crops_of
from imgembed.runtime.backends import select_engine
from imgembed.runtime.host import (
    ONEDNN_ISA_ENV,
    cpu_info,
    cpu_summary,
    default_threads,
    library_versions,
    missing_bf16_instructions,
)

FAMILIES = ("resnet50", "vit-b16", "clip-vit-b32", "dinov2-small")
RESULTS = Path(__file__).resolve().parent / "results"
# --cpu-class -> (ONEDNN_MAX_CPU_ISA, the flag this CPU needs for it), as tests/cpu_classes.py caps oneDNN.
CPU_CLASSES = {"avx2": ("AVX2", "avx2"), "avx512": ("AVX512_CORE", "avx512f"),
               "avx512-vnni": ("AVX512_CORE_VNNI", "avx512_vnni")}


def default_variants(model, notes: list[str]) -> list:
    """The PyTorch original FP32 and, of each artifact, the engine ``imgembed.load`` runs on this CPU (class):
    :func:`~imgembed.runtime.backends.select_engine`, the default engine unless this host cannot run it."""
    chosen = {}
    for art in model.artifacts:
        engine, passed_over = select_engine(read_manifest(art.path))
        chosen[art.path] = engine.id
        notes += [f"{model.spec.name} {art.precision}: passed over {n}" for n in passed_over]
    return [v for v in plan_variants(model, "cpu", compare_original=True, notes=notes)
            if v.is_baseline or (v.artifact is not None and v.engine.id == chosen.get(v.artifact.path))]


def measure_model(model, threads: int, batch: int, settings: MeasureSettings, notes: list[str]) -> list[dict]:
    """One record per default variant of ``model``: model-only at ``batch``, measured interleaved; a variant
    that cannot be opened here is noted and left out."""
    config = BenchConfig(batch_sizes=(batch,), threads=threads, measure=settings, roofline=False)
    original = OriginalCache(model)
    runners = {}
    for v in default_variants(model, notes):
        try:
            runners[v] = build_runner(model, v, "cpu", threads, original).activate()
        except ImgembedError as e:
            notes.append(f"{model.spec.name}: {v.label} not measured: {str(e).splitlines()[0]}")
    images = [img for _, img in parity_images()]
    pixels, crops = preprocess_batch(images, model.spec.preprocess), crops_of(images, model.spec.preprocess)
    try:
        fns = {v.label: batch_function(r, model, v, "model", batch, pixels, [], crops=crops)
               for v, r in runners.items()}
        results = measure_interleaved(fns, settings)
    finally:
        for r in runners.values():
            r.deactivate()
    return add_speedups([make_record(model, v, "model", batch, config, results[v.label]) for v in runners])


def _cap_note(backend: str) -> str:
    isa = os.environ.get(ONEDNN_ISA_ENV)
    if not isa:
        return ""
    return "uncapped" if backend == "onnxruntime" else isa  # model rows: ONNX Runtime ignores the cap entirely


def markdown(data: dict) -> str:
    """The results table, the peak table and the CPU line."""
    lines = [f"CPU: {data['cpu']['model']}, flags {', '.join(data['cpu']['flags'])}; class {data['cpu_class']}"
             f"{' (' + ONEDNN_ISA_ENV + '=' + data['isa_cap'] + ')' if data['isa_cap'] else ''}; "
             f"{data['threads']} threads, batch {data['batch']}, model-only, random weights.", "",
             "| model | variant | img/s | GOP/s | peak GOP/s (kernel) | % of peak | vs torch FP32 | ISA cap |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    for r in data["results"]:
        peak = "–" if r["peak_gops"] is None else f"{r['peak_gops']:,.0f} ({r['peak_kernel']})"
        pct = "–" if r["percent_of_peak"] is None else f"{r['percent_of_peak']:.1f} %"
        gops = "–" if r["achieved_gflops"] is None else f"{r['achieved_gflops']:,.0f}"
        lines.append(f"| {r['model']} | {r['variant']} | {r['throughput_ips']:.1f} | {gops} | {peak} | {pct} "
                     f"| {r['speedup_vs_original']:.2f}x | {_cap_note(r['backend']) or '–'} |")
    lines += ["", "| backend | precision | peak GOP/s | kernel | how it ran |", "|---|---|---:|---|---|"]
    best = peaks_by_pair(data["roofline"])
    for r in data["roofline"]:
        if r["kernel"] == "gemm" and r.get("skipped"):
            lines.append(f"| {r['backend']} | {r['precision']} | – | – | {r['skipped']} |")
    for (backend, precision), r in best.items():
        how = f"{r.get('runtime_precision')} {r['primitive']}" if r.get("primitive") else _cap_note(backend)
        lines.append(f"| {backend} | {precision} | {r['gops_per_s']:,.0f} | {r['kernel']} {r['shape']} | {how} |")
    return "\n".join(lines) + "\n"


def reexec_capped(cpu_class: str, argv: list[str]) -> int:
    """Run this script again with oneDNN capped to ``cpu_class``."""
    isa, needs = CPU_CLASSES[cpu_class]
    if not cpu_info(capped=False)["simd"].get(needs):
        print(f"--cpu-class {cpu_class}: this CPU lacks {needs}; cannot be reached here", file=sys.stderr)
        return 2
    env = {**os.environ, ONEDNN_ISA_ENV: isa, "IMGEMBED_ROOFLINE_CLASS": cpu_class}
    env.pop("IMGEMBED_CPU_FLAGS", None)
    return subprocess.run([sys.executable, __file__, *argv], env=env).returncode


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="*", default=list(FAMILIES))
    ap.add_argument("--cpu-class", choices=list(CPU_CLASSES))
    ap.add_argument("--cache-dir", type=Path, default=None, help="artifact cache (default: imgembed bench's)")
    ap.add_argument("--threads", type=int, default=default_threads())
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-seconds", type=float, default=6.0, help="measurement cap per configuration")
    ap.add_argument("--out", type=Path, default=None, help="JSON path (the .md beside it)")
    args = ap.parse_args(argv)
    if args.cpu_class and os.environ.get("IMGEMBED_ROOFLINE_CLASS") != args.cpu_class:
        return reexec_capped(args.cpu_class, argv)
    cpu_class = args.cpu_class or "host"
    out = args.out or RESULTS / ("roofline.json" if cpu_class == "host" else f"roofline-{cpu_class}.json")
    notes: list[str] = []
    precisions = ("fp32", "int8") + (() if missing_bf16_instructions() else ("bf16",))
    models = []
    for name in args.models:  # one at a time, so a finished export is announced
        print(f"preparing {name} ({', '.join(precisions)})", file=sys.stderr, flush=True)
        models += resolve_targets([name], precisions=precisions, random_init=True, cache_dir=args.cache_dir,
                                  threads=args.threads, notes=notes)
    print("measuring peaks", file=sys.stderr, flush=True)
    peaks = measure_peaks(args.threads)
    settings = MeasureSettings(max_seconds=args.max_seconds)
    records = []
    for model in models:
        print(f"measuring {model.spec.name}", file=sys.stderr, flush=True)
        records += measure_model(model, args.threads, args.batch, settings, notes)
    add_peaks(records, peaks)
    data = {"cpu": cpu_summary(), "cpu_uncapped": sorted(k for k, v in cpu_info(capped=False)["simd"].items() if v),
            "cpu_class": cpu_class, "isa_cap": os.environ.get(ONEDNN_ISA_ENV), "threads": args.threads,
            "batch": args.batch, "libraries": library_versions(), "roofline": peaks,
            "results": [{**{k: r[k] for k in ("model", "variant", "backend", "precision", "inference_precision",
                                              "throughput_ips", "achieved_gflops", "peak_gops", "peak_kernel",
                                              "percent_of_peak", "speedup_vs_original", "stable", "artifact")},
                         "isa_cap": _cap_note(r["backend"]) or None} for r in records],
            "notes": notes}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    md = markdown(data)
    out.with_suffix(".md").write_text(md, encoding="utf-8")
    print(md + "".join(f"- {n}\n" for n in notes) + f"wrote {out} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
