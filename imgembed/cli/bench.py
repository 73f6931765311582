"""``imgembed bench``: benchmark artifacts against their PyTorch original; write JSON, markdown and a plot.

    imgembed bench clip-vit-b32 --int8 --batch-sizes 1,8,32 --out reports/clip-b32
    imgembed bench clip-vit-b32 --random-init --int8 --out reports/x        # offline, random weights
    imgembed bench artifacts/dinov2-small-int8 artifacts/dinov2-small-fp32 --mode both
    imgembed bench clip-vit-b32 --random-init --int8 --mode pipeline --decode fast --e2e-megapixels 2 -b 16
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import List, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from imgembed.bench.measure import MeasureSettings, Window
from imgembed.models.user_module import TRUST_FLAG

MODE_CHOICES = {"model": ("model",), "e2e": ("e2e",), "both": ("model", "e2e"), "pipeline": ("pipeline",),
                "all": ("model", "e2e", "pipeline")}


def parse_batch_sizes(text: str) -> tuple[int, ...]:
    """``"1,8,32"`` -> ``(1, 8, 32)``; anything else is a BadParameter naming the bad part."""
    try:
        sizes = tuple(int(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not a comma-separated list of integers, e.g. 1,8,32") from None
    if not sizes or min(sizes) < 1:
        raise typer.BadParameter(f"batch sizes must be integers >= 1, got {text!r}")
    return tuple(dict.fromkeys(sizes))


def parse_engines(text: Optional[str]) -> tuple[str, ...] | None:
    """``"onnxruntime,openvino"`` -> the backend names, each checked against the backend table."""
    from imgembed.runtime.backends import BACKENDS

    if not text:
        return None
    names = tuple(dict.fromkeys(p.strip() for p in text.split(",") if p.strip()))
    bad = [n for n in names if n not in BACKENDS]
    if bad or not names:
        raise typer.BadParameter(f"--engines {text!r}: unknown backend(s) {bad}; expected some of {sorted(BACKENDS)}")
    return names


class RichProgress:
    """Shows the current group, windows as they complete, and a one-line summary per group."""

    def __init__(self, progress: Progress, console, total: int):
        self.progress, self.console = progress, console
        self.task = progress.add_task("starting", total=total)
        self.current = ""

    def group(self, description: str, configs: int) -> None:
        self.current = f"{description} ({configs} configs)"
        self.progress.update(self.task, description=self.current)

    def window(self, label: str, window: Window) -> None:
        self.progress.update(self.task, description=f"{self.current} · {label} {window.throughput:.1f} img/s")

    def group_done(self, records: list[dict]) -> None:
        """Advance the bar and print one line: each variant's throughput and speed-up."""
        self.progress.advance(self.task)
        r0 = records[0]
        parts = [f"{r['variant']} {r['throughput_ips']:.1f} img/s"
                 + ("" if r["speedup_vs_original"] is None or r["original"] else f" ({r['speedup_vs_original']:.2f}x)")
                 + ("" if r["stable"] else " [unstable]") for r in records]
        self.console.print(f"  {r0['model']} {r0['mode']} b={r0['batch_size']}: " + " | ".join(parts), highlight=False)

    def note(self, text: str) -> None:
        self.progress.update(self.task, description=text)


def _prepare(targets: List[str], precisions: tuple[str, ...], random_init: bool, weights: Optional[Path],
             cache_dir: Optional[Path], threads: int, steps, module: Optional[str] = None,
             trust_manifest_factory: bool = False) -> tuple[list, list[str]]:
    """Resolve the targets (exporting registry models into the cache) under a spinner; returns the models and
    notes: exports left out after failing parity, and INT8-slower-than-FP32 findings of fresh exports."""
    from imgembed.bench.targets import resolve_targets
    from imgembed.export.quantize import Int8SlowerWarning

    notes: list[str] = []
    with steps("preparing artifacts") as step, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        models = resolve_targets(targets, precisions=precisions, random_init=random_init, weights=weights,
                                 cache_dir=cache_dir, threads=threads, step=step, notes=notes, module=module,
                                 trust_manifest_factory=trust_manifest_factory)
    notes += [str(w.message) for w in caught if issubclass(w.category, Int8SlowerWarning)]
    return models, list(dict.fromkeys(notes))


def bench_cmd(
    targets: List[str] = typer.Argument(..., help="Registry names (exported into the cache) and/or artifact dirs."),
    int8: bool = typer.Option(False, "--int8", help="Registry names: also export and benchmark INT8."),
    bf16: bool = typer.Option(False, "--bf16", help="Registry names: also export and benchmark BF16 (CPUs "
                              "with AVX512_BF16 or AMX)."),
    engines: Optional[str] = typer.Option(None, "--engines", "--backend", help="Comma-separated backends to "
                                          "benchmark (default: every usable one; see `imgembed backends`)."),
    random_init: bool = typer.Option(False, "--random-init", help="Registry names: random weights (offline)."),
    weights: Optional[Path] = typer.Option(None, "--weights", help="Local save_pretrained directory of the original."),
    batch_sizes: str = typer.Option("1,8,32", "--batch-sizes", "-b", help="Comma-separated batch sizes."),
    mode: str = typer.Option("model", "--mode", help="model (preprocessed tensors), e2e (JPEG files: decode + "
                             "preprocess + inference), both, pipeline (e2e with decode threads overlapped with "
                             "inference; see --decode) or all."),
    decode: str = typer.Option("exact", "--decode", help="pipeline mode: exact (HF-identical) or fast "
                               "(reduced-size JPEG decoding)."),
    workers: Optional[int] = typer.Option(None, "--workers", min=0, help="pipeline mode: decode threads "
                                          "(default: one per core)."),
    e2e_megapixels: Optional[float] = typer.Option(None, "--e2e-megapixels", min=0.01, help="Upscale the "
                                                   "end-to-end sample photos to about this many megapixels."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="Threads for torch and ONNX Runtime "
                                          "alike (default: all cores)."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
    max_seconds: float = typer.Option(10.0, "--max-seconds", "--duration", min=0.01,
                                      help="Measurement time cap per configuration."),
    window_seconds: float = typer.Option(1.0, "--window-seconds", min=0.001, help="Length of one window."),
    warmup: int = typer.Option(2, "--warmup", min=0, help="Warm-up calls per configuration."),
    compare_original: bool = typer.Option(True, "--compare-original/--no-compare-original",
                                          help="Run the PyTorch original side by side (needed for ratios)."),
    torch_attn: str = typer.Option("sdpa", "--torch-attn", help="Attention of the PyTorch original: sdpa or eager."),
    roofline: bool = typer.Option(True, "--roofline/--no-roofline", help="Measure this host's peak GOP/s per "
                                  "engine and precision first (GEMM and conv, ~20 s) and report each "
                                  "configuration's % of peak."),
    out: Path = typer.Option(Path("reports/bench"), "--out", "-o", help="Directory for bench.json/.md/.png."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="Artifact cache for registry names "
                                             "(default: $IMGEMBED_BENCH_CACHE or ~/.cache/imgembed/bench)."),
    module: Optional[str] = typer.Option(None, "--module", help="Module artifacts: the factory "
                                         "(pkg.module:factory) that rebuilds their original. imgembed never "
                                         "imports the factory a manifest names unless --trust-manifest-factory."),
    trust_manifest_factory: bool = typer.Option(False, TRUST_FLAG, help="Module artifacts: import and run the "
                                                "factory the manifest names (printed first). Code execution."),
) -> None:
    """Benchmark models against their PyTorch original: latency percentiles, throughput, speed-up."""
    from imgembed.bench.report import write_all
    from imgembed.bench.suite import BenchConfig, run_benchmark
    from imgembed.cli.common import err_console, errors, out_console, steps

    if mode not in MODE_CHOICES:
        raise typer.BadParameter(f"--mode {mode!r}; expected one of {list(MODE_CHOICES)}")
    if decode not in ("exact", "fast"):
        raise typer.BadParameter(f"--decode {decode!r}; expected 'exact' or 'fast'")
    if torch_attn not in ("sdpa", "eager"):
        raise typer.BadParameter(f"--torch-attn {torch_attn!r}; expected 'sdpa' or 'eager'")
    warn = lambda msg: err_console.print(f"[bold yellow]WARNING[/]: {msg}", highlight=False)  # noqa: E731
    sizes, backends = parse_batch_sizes(batch_sizes), parse_engines(engines)
    with errors():
        from imgembed.runtime.backends import require_device

        require_device(device)
        settings = MeasureSettings(warmup=warmup, window_seconds=window_seconds, max_seconds=max_seconds)
        config = BenchConfig(batch_sizes=sizes, modes=MODE_CHOICES[mode], device=device, measure=settings,
                             compare_original=compare_original, torch_attn=torch_attn, decode=decode,
                             workers=workers, e2e_megapixels=e2e_megapixels, engines=backends, roofline=roofline,
                             **({"threads": threads} if threads else {}))
        precisions = ("fp32",) + (("int8",) if int8 else ()) + (("bf16",) if bf16 else ())
        models, notes = _prepare(targets, precisions, random_init, weights, cache_dir, config.threads, steps,
                                 module, trust_manifest_factory)
        for model in models if compare_original else ():
            model.check_original()
        for note in notes:
            warn(note)
        total = len(models) * len(config.modes) * len(sizes)
        with Progress(SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), console=err_console, transient=True) as bar:
            report = run_benchmark(models, config, RichProgress(bar, err_console, total), notes)
    paths = write_all(report, out)
    for note in report["notes"][len(notes):]:
        warn(note)
    out_console.print(f"{len(report['results'])} configurations in {report['seconds']} s; wrote "
                      + ", ".join(str(p) for p in paths.values()), highlight=False)


def register(app: typer.Typer) -> None:
    """Add ``bench`` to the imgembed CLI."""
    app.command("bench")(bench_cmd)
