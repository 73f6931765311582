"""The ``imgembed`` command line (typer + rich).

Exit codes: 0 success; 1 a typed imgembed error (message on stderr, no traceback); 2 usage error or a
failed parity gate; 3 ``embed`` finished but some inputs could not be read (the good ones are written).
"""
from __future__ import annotations

import contextlib
import json
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Iterator, List, Optional

import numpy as np
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from .errors import ImgembedError, ParityError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Export image-embedding models to ONNX, quantize them, check parity, embed images.")
# Wide consoles when piped, so tables are not truncated to 80 columns in logs and CI.
out_console = Console(width=None if sys.stdout.isatty() else 160)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 160)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


@contextlib.contextmanager
def _errors() -> Iterator[None]:
    """Turn typed errors into a one-line message and an exit code instead of a traceback."""
    try:
        yield
    except ParityError as e:
        err_console.print(f"[bold red]parity gate failed[/]: {e}", highlight=False)
        raise typer.Exit(2)
    except ImgembedError as e:
        err_console.print(f"[bold red]error[/] ({type(e).__name__}): {e}", highlight=False)
        raise typer.Exit(1)


@contextlib.contextmanager
def _steps(title: str) -> Iterator:
    """A spinner that shows the current step of a long operation."""
    with Progress(SpinnerColumn(), TextColumn("[bold]{task.description}"), TimeElapsedColumn(),
                  console=err_console, transient=True) as progress:
        task = progress.add_task(title, total=None)

        def step(text: str) -> None:
            progress.update(task, description=text)
            err_console.print(f"  [dim]·[/] {text}", highlight=False)

        yield step


@app.command("models")
def models_cmd(all_: bool = typer.Option(False, "--all", help="Include tiny test models."),
               as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table.")) -> None:
    """List the named models of the registry (models.yaml)."""
    from .registry import list_models

    with _errors():
        specs = list_models(include_test=all_)
    if as_json:
        print(json.dumps([s.to_dict() for s in specs], indent=2))
        return
    table = Table(title="imgembed models")
    for col in ("name", "family", "source", "dim", "input", "output", "normalized", "GFLOPs"):
        table.add_column(col)
    for s in specs:
        src = f"{s.source.hub}" if s.source else "(random init only)"
        output = s.embedding.output + ("" if s.embedding.pooling == "none" else f" [{s.embedding.pooling}]")
        table.add_row(s.name, s.family, src, str(s.embedding.dim), "x".join(map(str, s.input_hw)), output,
                      "yes" if s.embedding.normalize else "no", "" if s.gflops is None else f"{s.gflops:g}")
    out_console.print(table)


@app.command("export")
def export_cmd(
    name: str = typer.Argument(..., help="Registry model name (see `imgembed models`)."),
    int8: bool = typer.Option(False, "--int8", help="INT8 quantization (dynamic for transformers, "
                              "measured static presets for CNNs)."),
    fp16: bool = typer.Option(False, "--fp16", help="FP16 weights and compute (for GPUs; LayerNorm/softmax "
                              "kept in FP32; gated at cosine >= 0.999 vs the FP32 original)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Artifact directory "
                                       "(default: artifacts/NAME-PRECISION)."),
    weights: Optional[Path] = typer.Option(None, "--weights", help="Local save_pretrained directory "
                                           "instead of the Hugging Face hub."),
    random_init: bool = typer.Option(False, "--random-init", help="Real architecture, random weights "
                                     "(seeded; works offline)."),
    calibration: Optional[Path] = typer.Option(None, "--calibration", help="Directory of images for static "
                                               "INT8 calibration (default: built-in sample set)."),
    int8_preset: Optional[str] = typer.Option(None, "--int8-preset", help="Force one quantization preset "
                                              "(dynamic, dynamic-per-channel, static-qoperator, static-qdq)."),
    no_optimize: bool = typer.Option(False, "--no-optimize", help="Skip ONNX Runtime transformer fusion."),
    keep_failed: bool = typer.Option(False, "--keep-failed", help="Write the artifact even if parity fails "
                                     "(manifest status 'failed')."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="CPU threads for checks."),
    no_speed_check: bool = typer.Option(False, "--no-speed-check", help="Skip timing INT8 against FP32."),
) -> None:
    """Export NAME to ONNX (optionally INT8), check parity against PyTorch, write an artifact."""
    from .export.pipeline import ExportOptions, export_model
    from .parity import format_report

    if int8 and fp16:
        err_console.print("[bold red]error[/]: choose one of --int8 and --fp16")
        raise typer.Exit(2)
    precision = "int8" if int8 else "fp16" if fp16 else "fp32"
    out = out or Path("artifacts") / f"{name}-{precision}"
    opts = ExportOptions(precision=precision, weights=weights, random_init=random_init, calibration=calibration,
                         int8_preset=int8_preset, optimize=not no_optimize, keep_failed=keep_failed,
                         threads=threads, speed_check=not no_speed_check)
    with _errors(), _steps(f"exporting {name}") as step, warnings.catch_warnings(record=True):
        result = export_model(name, out, opts, step=step)
    m = result.manifest
    out_console.print(format_report(m["parity"]), highlight=False)
    for note in result.warnings:
        err_console.print(f"[bold yellow]WARNING[/]: {note}", highlight=False)
    size_mb = m["export"]["model_bytes"] / 1e6
    status = "[green]passed[/]" if m["status"] == "passed" else "[red]FAILED (kept by --keep-failed)[/]"
    out_console.print(f"artifact {out} ({size_mb:.1f} MB, {precision}, {m['export']['seconds']:.1f} s): {status}",
                      highlight=False)
    if m["status"] != "passed":
        raise typer.Exit(2)


@app.command("parity")
def parity_cmd(
    artifact: Path = typer.Argument(..., help="Artifact directory written by `imgembed export`."),
    weights: Optional[Path] = typer.Option(None, "--weights", help="Original weights directory, if the "
                                           "artifact was exported from one that has moved."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Re-run the parity check of ARTIFACT against its PyTorch original."""
    from .export.pipeline import recheck_artifact

    with _errors(), _steps("checking parity") as step:
        report = recheck_artifact(artifact, weights=weights, threads=threads, step=step)
    from .parity import format_report

    print(json.dumps(report, indent=2)) if as_json else out_console.print(format_report(report), highlight=False)
    if not report["passed"]:
        raise typer.Exit(2)


def _expand(inputs: List[str]) -> List[str]:
    """Files as given; directories expand to the image files inside them (sorted, recursive)."""
    files: list[str] = []
    for s in inputs:
        p = Path(s)
        if p.is_dir():
            files += [str(f) for f in sorted(p.rglob("*")) if f.suffix.lower() in IMAGE_SUFFIXES]
        else:
            files.append(s)
    return files


def _save_npy(path: Path, vectors: np.ndarray, paths: List[str]) -> Path:
    """Write vectors.npy and a sidecar NAME.paths.txt (row order), each atomically."""
    import os

    path.parent.mkdir(parents=True, exist_ok=True)
    sidecar = path.with_suffix(".paths.txt")
    for target, write in ((path, lambda f: np.save(f, vectors)),
                          (sidecar, lambda f: f.write("".join(p + "\n" for p in paths).encode()))):
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, target)
    return sidecar


@app.command("embed")
def embed_cmd(
    model: str = typer.Argument(..., help="Artifact directory, or a registry name (PyTorch original)."),
    inputs: List[str] = typer.Argument(..., help="Image files or directories of images."),
    out: Path = typer.Option(Path("embeddings.npy"), "--out", "-o", help="Output .npy (float32 N x D); "
                             "row order in OUT.paths.txt."),
    batch_size: int = typer.Option(16, "--batch-size", "-b", min=1),
    threads: Optional[int] = typer.Option(None, "--threads", min=1),
    weights: Optional[Path] = typer.Option(None, "--weights", help="With a registry name: local weights."),
    random_init: bool = typer.Option(False, "--random-init", help="With a registry name: random weights."),
) -> None:
    """Embed images into a .npy file. Unreadable inputs are reported and skipped (exit code 3)."""
    import imgembed

    files = _expand(inputs)
    if not files:
        err_console.print(f"[bold red]error[/]: no image files found in {inputs}")
        raise typer.Exit(2)
    kwargs = {"threads": threads, "batch_size": batch_size}
    if weights or random_init:
        kwargs.update(weights=weights, random_init=random_init)
    with _errors():
        emb = imgembed.load(model, **kwargs)
        vectors, indices, errors = [], [], []
        with Progress(TextColumn("[bold]embedding"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=err_console, transient=True) as progress:
            task = progress.add_task("embed", total=len(files))
            for start in range(0, len(files), batch_size):
                chunk = files[start:start + batch_size]
                res = emb.embed(chunk, on_error="report")
                vectors.append(res.vectors)
                indices += [start + i for i in res.indices]
                errors += [(start + i, msg) for i, msg in res.errors]
                progress.advance(task, len(chunk))
    matrix = np.concatenate(vectors) if vectors else np.zeros((0, emb.dim), np.float32)
    sidecar = _save_npy(out, matrix, [files[i] for i in indices])
    for _, msg in errors:
        err_console.print(f"[yellow]skipped[/]: {msg}", highlight=False)
    out_console.print(f"wrote {matrix.shape[0]} x {matrix.shape[1]} embeddings ({emb.name}, {emb.precision}) to "
                      f"{out} (paths: {sidecar}); {len(errors)} failed", highlight=False)
    if errors:
        raise typer.Exit(3)


# Sub-commands that live in their own modules; each module exposes ``register(app: typer.Typer)``.
SUBCOMMAND_MODULES: tuple[str, ...] = ("imgembed.bench.cli", "imgembed.serve.cli")


def _register_subcommands() -> None:
    import importlib

    for module in SUBCOMMAND_MODULES:
        importlib.import_module(module).register(app)


_register_subcommands()


def main(argv: Optional[List[str]] = None) -> None:
    """Console-script entry point."""
    app(args=argv, prog_name="imgembed")


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
