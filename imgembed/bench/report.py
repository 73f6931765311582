"""Report writers: JSON (every record + the host block), a markdown table, and a throughput plot (PNG).

The JSON is the source of truth; the markdown and the plot are views of it, so they can be regenerated from
a saved JSON (:func:`write_all`).
"""
from __future__ import annotations

import json
from pathlib import Path

from imgembed.artifact import write_json_atomic

JSON_NAME, MARKDOWN_NAME, PLOT_NAME = "bench.json", "bench.md", "bench.png"
TABLE_COLUMNS = ("model", "mode", "variant", "batch", "threads", "p50 ms", "p90 ms", "p99 ms", "mean ms", "img/s",
                 "vs original", "GFLOP/s", "% of peak", "stable", "samples")


def _num(x: float | None, digits: int = 1) -> str:
    return "–" if x is None else f"{x:,.{digits}f}"


def _ratio(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}x"


def _percent(x: float | None) -> str:
    return "–" if x is None else f"{x:.0f} %" if x >= 10 else f"{x:.1f} %"


def table_row(r: dict) -> list[str]:
    """One markdown table row (see :data:`TABLE_COLUMNS`) of a record."""
    lat = r["latency_ms"]
    variant = r["variant"] + (" (original)" if r["original"] else "")
    samples = f"{r['samples']['calls']} calls / {r['samples']['windows']} win"
    return [r["model"], r["mode"], variant, str(r["batch_size"]), str(r["threads"]), _num(lat["p50"], 2),
            _num(lat["p90"], 2), _num(lat["p99"], 2), _num(lat["mean"], 2), _num(r["throughput_ips"]),
            _ratio(r["speedup_vs_original"]), _num(r["achieved_gflops"]), _percent(r.get("percent_of_peak")),
            "yes" if r["stable"] else "**no**", samples]


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|",
            *("| " + " | ".join(row) + " |" for row in rows)]


def speedup_table(records: list[dict]) -> list[str]:
    """Speed-up vs the original: one row per (model, mode, variant), one column per batch size."""
    batches = sorted({r["batch_size"] for r in records})
    rows: dict[tuple, dict[int, str]] = {}
    for r in records:
        if not r["original"] or r["variant"] != r["baseline"]:
            cells = rows.setdefault((r["model"], r["mode"], r["variant"]), {})
            cells[r["batch_size"]] = _ratio(r["speedup_vs_original"])
    body = [[*key, *(cells.get(b, "–") for b in batches)] for key, cells in rows.items()]
    return _table(["model", "mode", "variant", *(f"batch {b}" for b in batches)], body)


def roofline_table(rows: list[dict]) -> list[str]:
    """This host's peaks: one row per (backend, precision), GOP/s of each kernel and the peak (the highest),
    threads, the oneDNN ISA cap, and how the engine ran it (OpenVINO's runtime precision and primitive) or why not."""
    pairs: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        pairs.setdefault((r["backend"], r["precision"]), {})[r["kernel"]] = r
    kernels = list(dict.fromkeys(r["kernel"] for r in rows))
    body = []
    for (backend, precision), by_kernel in pairs.items():
        measured = [r["gops_per_s"] for r in by_kernel.values() if r.get("gops_per_s")]
        first = next(iter(by_kernel.values()))
        how = first.get("skipped") or ", ".join(f"{k} {r.get('runtime_precision')} {r['primitive']}"
                                                for k, r in by_kernel.items() if r.get("primitive"))
        cells = [_num(by_kernel[k].get("gops_per_s")) if k in by_kernel else "–" for k in kernels]
        body.append([backend, precision, *cells, _num(max(measured)) if measured else "–",
                     str(first.get("threads", "–")), first.get("isa_cap") or "–", how])
    shapes = "; ".join(f"{r['kernel']} {r.get('shape', '?')}" for r in {r["kernel"]: r for r in rows}.values())
    return [*_table(["backend", "precision", *(f"{k} GOP/s" for k in kernels), "peak GOP/s", "threads",
                     "ISA cap", "how it ran"], body), "", f"Shapes: {shapes}. % of peak = a model's GFLOP/s over "
            "the peak of its engine and precision (INT8 engines: the INT8 peak; engines computing in BF16: the BF16 "
            "peak)."]


def _host_lines(host: dict, settings: dict) -> list[str]:
    """Markdown bullets: CPU and SIMD, GPU, load, libraries, measurement settings."""
    from imgembed.runtime.gpu import describe_gpu

    cpu, libs = host["cpu"], host["libraries"]
    simd = ", ".join(k for k, v in cpu["simd"].items() if v) or "none detected"
    gpu = host.get("gpu")
    return [f"- CPU: {cpu['model']} ({cpu['arch']}), {cpu['usable_cores']} usable of {cpu['logical_cores']} "
            f"logical cores; SIMD: {simd}",
            f"- GPU: {describe_gpu(gpu)}",
            f"- Load average (1/5/15 min) when measurement began: {host.get('load_average')}",
            "- Libraries: " + ", ".join(f"{k} {v}" for k, v in libs.items() if v),
            f"- Settings: device {settings['device']}, threads {settings['threads']}, warm-up "
            f"{settings['warmup_calls']} calls, windows of {settings['window_seconds']:g} s, stable when the last "
            f"{settings['stability_windows']} windows are within {settings['stability_tolerance']:.0%} of their "
            f"mean, cap {settings['max_seconds']:g} s per configuration; baseline {settings['baseline']} "
            f"(PyTorch original, {settings['torch_attention']} attention)"]


def markdown(report: dict) -> str:
    """The whole markdown report: host, speed-up summary, full table, notes."""
    records = report["results"]
    lines = ["# imgembed benchmark", "", f"Run {report['created']} ({report['seconds']} s).", "",
             *_host_lines(report["host"], report["settings"]), "", "## Speed-up vs the PyTorch original", "",
             *speedup_table(records), "", "## All configurations", "",
             *_table(list(TABLE_COLUMNS), [table_row(r) for r in records])]
    if report.get("roofline"):
        lines += ["", "## Roofline: this host's peaks", "", *roofline_table(report["roofline"])]
    unstable = sum(not r["stable"] for r in records)
    if unstable:
        lines += ["", f"{unstable} configuration(s) hit the time cap before their throughput was stable "
                      "(stable: **no**); their figures are less reliable — raise --max-seconds."]
    if report.get("notes"):
        lines += ["", "## Notes", "", *(f"- {n}" for n in report["notes"])]
    return "\n".join(lines) + "\n"


def _plot_panel(ax, records: list[dict], title: str) -> None:
    """One panel: a throughput line per variant over batch sizes; the original dashed black."""
    batches = sorted({r["batch_size"] for r in records})
    for variant in dict.fromkeys(r["variant"] for r in records):
        rows = sorted((r for r in records if r["variant"] == variant), key=lambda r: r["batch_size"])
        original = rows[0]["original"]
        ax.plot([r["batch_size"] for r in rows], [r["throughput_ips"] for r in rows], marker="o",
                label=variant + (" (original)" if original else ""), linestyle="--" if original else "-",
                color="black" if original else None)
    ax.set_xscale("log", base=2)
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.set(title=title, xlabel="batch size", ylabel="images / s")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)


def plot(report: dict, path: Path) -> Path:
    """Throughput vs batch size, one panel per (model, mode), one line per variant; the original dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = report["results"]
    panels = list(dict.fromkeys((r["model"], r["mode"]) for r in records)) or [("no results", "")]
    cols = min(len(panels), 3)
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 4.2 * rows), squeeze=False)
    for ax, (model, mode) in zip(axes.flat, panels, strict=False):  # the grid may have spare axes
        _plot_panel(ax, [r for r in records if (r["model"], r["mode"]) == (model, mode)], f"{model} ({mode})")
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    s = report["settings"]
    fig.suptitle(f"imgembed bench: throughput vs batch size ({s['device']}, {s['threads']} threads)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_all(report: dict, out_dir: str | Path) -> dict[str, Path]:
    """Write bench.json, bench.md and bench.png into ``out_dir``; returns their paths by kind."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / JSON_NAME, "markdown": out / MARKDOWN_NAME, "plot": out / PLOT_NAME}
    write_json_atomic(paths["json"], report)
    paths["markdown"].write_text(markdown(report), encoding="utf-8")
    plot(report, paths["plot"])
    return paths


def load_report(path: str | Path) -> dict:
    """Read a bench.json written by :func:`write_all`."""
    return json.loads(Path(path).read_text(encoding="utf-8"))
