"""The ``imgembed`` command line (typer + rich).

Exit codes: 0 success; 1 a typed imgembed error (message on stderr, no traceback); 2 usage error or a
failed parity gate; 3 ``embed`` finished but some inputs could not be read (the good ones are written).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, List, Optional

import numpy as np
import typer
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from imgembed.cli.common import err_console, errors, out_console, steps
from imgembed.models.user_module import TRUST_FLAG

if TYPE_CHECKING:
    from imgembed.artifact import Manifest, TextTower

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Export image-embedding models to ONNX Runtime / OpenVINO engines, check parity, "
                       "embed images.")


@app.command("models")
def models_cmd(all_: bool = typer.Option(False, "--all", help="Include tiny test models."),
               as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table.")) -> None:
    """List the named models of the registry (models.yaml)."""
    from imgembed.models.registry import list_models

    with errors():
        specs = list_models(include_test=all_)
    if as_json:
        print(json.dumps([s.to_dict() for s in specs], indent=2))
        return
    table = Table(title="imgembed models")
    for col in ("name", "family", "source", "dim", "input", "output", "normalized", "GFLOPs", "text"):
        table.add_column(col)
    for s in specs:
        src = f"{s.source.hub}" if s.source else "(random init only)"
        output = s.embedding.output + ("" if s.embedding.pooling == "none" else f" [{s.embedding.pooling}]")
        table.add_row(s.name, s.family, src, str(s.embedding.dim), "x".join(map(str, s.input_hw)), output,
                      "yes" if s.embedding.normalize else "no", "" if s.gflops is None else f"{s.gflops:g}",
                      "" if s.text is None else f"--text ({s.text.max_length} tokens)")
    out_console.print(table)


@app.command("backends")
def backends_cmd(as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table.")) -> None:
    """List the runtime's backends: what each runs, on which device and precisions, and whether it is usable
    here (with the reason when not)."""
    from imgembed.runtime.backends import backend_table
    from imgembed.runtime.host import cpu_summary

    rows = backend_table()
    if as_json:
        print(json.dumps({"cpu": cpu_summary(), "backends": rows}, indent=2))
        return
    cpu = cpu_summary()
    table = Table(title=f"imgembed backends (CPU {cpu['model']}: {' '.join(cpu['flags'])})")
    for col in ("backend", "device", "runs", "precisions", "usable here"):
        table.add_column(col)
    for r in rows:
        usable = "[green]yes[/]" if r["available"] else f"[red]no[/]: {escape(r['reason'])}"
        table.add_row(r["backend"], r["device"], r["runs"], ", ".join(r["precisions"]), usable)
    out_console.print(table)


@app.command("export")
def export_cmd(
    name: Optional[str] = typer.Argument(None, help="Registry model name (see `imgembed models`); omit it with "
                                         "--module."),
    int8: bool = typer.Option(False, "--int8", help="INT8: static (batch-invariant) ONNX Runtime presets and "
                              "OpenVINO + NNCF raced; the fastest that passes the gate becomes the default."),
    bf16: bool = typer.Option(False, "--bf16", help="BF16 compute on CPUs with AVX512_BF16 or AMX (OpenVINO); "
                              "gated at min cosine >= 0.9999."),
    fp16: bool = typer.Option(False, "--fp16", help="FP16 weights and compute (for GPUs; LayerNorm/softmax "
                              "kept in FP32; gated at cosine >= 0.999 vs the FP32 original)."),
    backend: Optional[str] = typer.Option(None, "--backend", help="Build only this backend's engines "
                                          "(onnxruntime, openvino; tensorrt: TensorRT plans only, on this GPU) instead "
                                          "of racing every installed backend."),
    engine: Optional[str] = typer.Option(None, "--engine", hidden=True, help="Deprecated spelling of --backend."),
    keep_candidates: bool = typer.Option(False, "--keep-candidates", help="Keep every engine that passes the "
                                         "gate, so `load(backend='auto')` can choose per host."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Artifact directory "
                                       "(default: artifacts/NAME-PRECISION)."),
    weights: Optional[Path] = typer.Option(None, "--weights", help="Local save_pretrained directory "
                                           "instead of the Hugging Face hub."),
    random_init: bool = typer.Option(False, "--random-init", help="Real architecture, random weights "
                                     "(seeded; works offline)."),
    calibration: Optional[Path] = typer.Option(None, "--calibration", help="Directory of images for static "
                                               "INT8 calibration (default: built-in sample set)."),
    int8_preset: Optional[str] = typer.Option(None, "--int8-preset", help="Force one ONNX Runtime preset "
                                              "(static-qdq-matmul, static-qoperator, static-qdq, "
                                              "static-qdq-matmul-7bit, static-qoperator-7bit, static-qdq-trt; "
                                              "dynamic and dynamic-per-channel are not batch-invariant)."),
    no_optimize: bool = typer.Option(False, "--no-optimize", help="Skip ONNX Runtime transformer fusion."),
    keep_failed: bool = typer.Option(False, "--keep-failed", help="Write the artifact even if parity fails "
                                     "(manifest status 'failed')."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="CPU threads for checks."),
    no_speed_check: bool = typer.Option(False, "--no-speed-check", help="Skip timing the engines (the first "
                                        "passing one wins)."),
    uint8_input: bool = typer.Option(False, "--uint8-input", help="The graph takes uint8 NHWC pixels (resized "
                                     "and center-cropped, 0-255) and normalises them itself; gated on the uint8 "
                                     "crops of the parity images."),
    trt: bool = typer.Option(False, "--trt", help="Also race a TensorRT plan for this GPU (from the unfused "
                             "ONNX; INT8: symmetric Q/DQ), gated and timed on the GPU like every engine and kept "
                             "in the artifact when it passes. Needs TensorRT and an NVIDIA GPU."),
    trt_batch: str = typer.Option("1,32,256", "--trt-batch", help="TensorRT batch profile min,opt,max."),
    text: bool = typer.Option(False, "--text", help="CLIP / SigLIP: add the text tower (text graph + the "
                              "checkpoint's tokenizer.json) to the artifact, raced and gated like the image tower."),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="Tokenizer directory or tokenizer.json "
                                             "for --text (default: the checkpoint's; needed with --random-init)."),
    module: Optional[str] = typer.Option(None, "--module", help="Export your own torch.nn.Module instead of a "
                                         "registry model: pkg.module:factory, a callable taking no arguments that "
                                         "returns a module mapping (N, 3, H, W) pixels to (N, D) vectors (the "
                                         "current directory is importable)."),
    module_name: Optional[str] = typer.Option(None, "--name", help="With --module: the artifact's model name."),
    module_weights: Optional[Path] = typer.Option(None, "--module-weights", help="With --module: weights loaded "
                                                  "into the module (.safetensors, or a torch.save(state_dict) file "
                                                  "read with weights_only=True)."),
    preprocess: Optional[str] = typer.Option(None, "--preprocess", help="With --module: clip, imagenet "
                                             "(default) or a preprocessor_config.json file (Hugging Face format)."),
    input_size: Optional[int] = typer.Option(None, "--input-size", min=1, help="With --module: the input "
                                             "(crop) size in pixels for clip / imagenet (default 224)."),
    normalize: bool = typer.Option(True, "--normalize/--no-normalize", help="With --module: L2-normalise the "
                                   "vectors."),
    transformer: Optional[bool] = typer.Option(None, "--transformer/--cnn", help="With --module: INT8 presets "
                                               "for a transformer or a CNN (default: guessed from attention "
                                               "layers)."),
) -> None:
    """Export NAME (or your own module with --module), race the installed engines, gate each on parity against
    PyTorch, write an artifact whose default engine is the fastest that passed on this machine."""
    from imgembed.export.pipeline import ExportOptions, export_model
    from imgembed.gate.parity import ParityReport, format_report

    if int8 + fp16 + bf16 > 1:
        err_console.print("[bold red]error[/]: choose one of --int8, --bf16 and --fp16")
        raise typer.Exit(2)
    module_args = {"--name": module_name, "--module-weights": module_weights, "--preprocess": preprocess,
                   "--input-size": input_size, "--no-normalize": None if normalize else False,
                   "--transformer/--cnn": transformer}
    name = _export_target(name, module, module_args, weights, random_init)
    backend = _deprecated_engine_option(engine, backend)
    precision = "int8" if int8 else "fp16" if fp16 else "bf16" if bf16 else "fp32"
    trt_opts = _trt_prepare(trt, precision, trt_batch, uint8_input)
    out = out or (Path("artifacts") / f"{name}-{precision}-trt" if trt else None)
    out = out or Path("artifacts") / f"{name}-{precision}{'-uint8' if uint8_input else ''}"
    opts = ExportOptions(precision=precision, weights=weights, random_init=random_init, calibration=calibration,
                         int8_preset=int8_preset, backend=backend, keep_candidates=keep_candidates,
                         optimize=not no_optimize, keep_failed=keep_failed,
                         threads=threads, speed_check=not no_speed_check,
                         input_format="uint8" if uint8_input else "float32", text=text, tokenizer=tokenizer,
                         trt=trt_opts)
    with errors(), steps(f"exporting {name}") as step, warnings.catch_warnings(record=True):
        if module is None:
            result = export_model(name, out, opts, step=step)
        else:
            from imgembed.export.module_export import CHECKPOINT_OPTIONS, export_module

            options = {f.name: getattr(opts, f.name) for f in dataclasses.fields(opts)
                       if f.name not in CHECKPOINT_OPTIONS}
            result = export_module(module, out, name=name, preprocess=preprocess or "imagenet",
                                   input_size=input_size, weights=module_weights, normalize=normalize,
                                   transformer=transformer, step=step, **options)
    m = result.manifest
    print_candidates(m, m.precision)
    print_stages(m)
    source = m.preprocess_source.model_dump() if m.preprocess_source is not None else {}
    if source.get("differs_from_registry"):
        from imgembed.models.checkpoint import describe

        out_console.print(describe(source), highlight=False)
    if m.parity is not None:
        out_console.print(format_report(ParityReport.from_dict(m.parity.model_dump())), highlight=False)
    if m.text is not None:
        print_candidates(m.text, m.precision, tower="text tower")
        tok = m.text.tokenizer_check or {}
        out_console.print(f"text tokenizer: ids identical to transformers {tok.get('reference')} on "
                          f"{tok.get('captions')} captions", highlight=False)
        if m.text.parity is not None:
            text_report = format_report(ParityReport.from_dict(m.text.parity.model_dump()))
            out_console.print(text_report.replace(" images ", " captions ", 1), highlight=False)
    for note in result.warnings:
        err_console.print(f"[bold yellow]WARNING[/]: {note}", highlight=False)
    size_mb = (m.export.model_bytes or 0) / 1e6
    status = "[green]passed[/]" if m.status == "passed" else "[red]FAILED (kept by --keep-failed)[/]"
    out_console.print(f"artifact {out} ({size_mb:.1f} MB, {precision}, default engine {m.default_engine}, "
                      f"{m.export.seconds or 0:.1f} s): {status}", highlight=False)
    if m.status != "passed":
        raise typer.Exit(2)


def _deprecated_engine_option(engine: str | None, backend: str | None) -> str | None:
    """``--engine`` is the old spelling of ``--backend``: accepted with a one-line warning."""
    if engine is None:
        return backend
    err_console.print("[bold yellow]WARNING[/]: --engine is deprecated; use --backend", highlight=False)
    if backend is not None and backend != engine:
        err_console.print(f"[bold red]error[/]: --engine {engine} and --backend {backend} disagree", highlight=False)
        raise typer.Exit(2)
    return engine


def _export_target(name: Optional[str], module: Optional[str], module_args: dict, weights: Optional[Path],
                   random_init: bool) -> str:
    """The model name of an export: the registry NAME, or --name with --module; usage errors exit 2."""
    def usage(message: str) -> typer.Exit:
        err_console.print(f"[bold red]error[/]: {message}", highlight=False)
        return typer.Exit(2)

    if module is None:
        given = [flag for flag, value in module_args.items() if value is not None]
        if given:
            raise usage(f"{', '.join(given)}: for --module exports only (--module pkg.module:factory)")
        if name is None:
            raise usage("give a registry model NAME (see `imgembed models`) or --module pkg.module:factory --name NAME")
        return name
    if name is not None:
        raise usage(f"give either a registry model NAME ({name}) or --module, not both (name a module export "
                    "with --name)")
    if module_args["--name"] is None:
        raise usage("--module needs --name NAME (the artifact's model name)")
    if weights is not None or random_init:
        raise usage("--weights and --random-init are for registry models; give a module's weights file with "
                    "--module-weights FILE")
    return module_args["--name"]


def print_candidates(tower_record: "Manifest | TextTower", precision: str, tower: str = "engines") -> None:
    """The engine race of an export: each candidate, passed or why not, its metrics and speed here."""
    sel = tower_record.selection
    if sel is None or not sel.candidates:
        return
    cpu = f"; CPU {sel.cpu.model}: {' '.join(sel.cpu.flags)}" if sel.cpu is not None else ""
    table = Table(title=f"{tower} ({precision}, batch {sel.batch_size}, threads {sel.threads or 'all'}{cpu})")
    for col in ("engine", "gate", "min cos", "mean cos", "batch var", "img/s", "kept"):
        table.add_column(col)
    kept = {e.id for e in tower_record.engines}
    for r in sel.candidates:
        met = r.metrics or {}
        gate = "[green]pass[/]" if r.passed else f"[red]{escape(r.why_not or 'fail')}[/]"
        mark = "default" if r.id == tower_record.default_engine else ("yes" if r.id in kept else "")
        table.add_row(r.id, gate, _fmt(met.get("min_cosine"), ".6f"), _fmt(met.get("mean_cosine"), ".6f"),
                      _fmt(met.get("batch_variation"), ".2g"), _fmt(r.img_per_s, ".1f"), mark)
    out_console.print(table)


def print_stages(manifest: "Manifest") -> None:
    """Where the export's time went: each stage (loading, ONNX export, building and gating each candidate, the
    timings), its seconds and its share of the total."""
    stages = manifest.export.stages
    if not stages:
        return
    total = sum(s.seconds for s in stages) or 1.0
    table = Table(title=f"export time per stage ({total:.1f} s)")
    for col in ("stage", "seconds", "share"):
        table.add_column(col)
    for s in stages:
        table.add_row(escape(s.name), f"{s.seconds:.1f}", f"{s.seconds / total:.0%}")
    out_console.print(table)


def _fmt(value, spec: str) -> str:
    return "" if value is None else format(value, spec)


def _trt_prepare(trt: bool, precision: str, batch: str, uint8_input: bool):
    """``--trt``: check the profile, the precision and that TensorRT and a GPU are here before exporting
    anything; returns the TrtOptions of the export (None without ``--trt``)."""
    if not trt:
        return None
    from imgembed.export.tensorrt import prepare_trt_export

    try:
        with errors():
            return prepare_trt_export(precision, batch, "uint8" if uint8_input else "float32")
    except ValueError as e:
        err_console.print(f"[bold red]error[/]: {e}", highlight=False)
        raise typer.Exit(2) from None


@app.command("parity")
def parity_cmd(
    artifact: Path = typer.Argument(..., help="Artifact directory written by `imgembed export`."),
    weights: Optional[Path] = typer.Option(None, "--weights", help="Original weights directory (a module "
                                           "artifact's: weights file), if the artifact was exported from one "
                                           "that has moved."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1),
    backend: str = typer.Option("auto", "--backend", help="Engine of the artifact to check: auto (the one "
                                "`load` would run here) or a backend name."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    images: Optional[Path] = typer.Option(None, "--images", help="Directory of your own images to check on "
                                          "instead of the built-in parity set (unreadable files are skipped "
                                          "and reported)."),
    module: Optional[str] = typer.Option(None, "--module", help="A module artifact: the factory "
                                         "(pkg.module:factory) that rebuilds its original. imgembed never imports "
                                         "the factory a manifest names unless --trust-manifest-factory is given."),
    trust_manifest_factory: bool = typer.Option(False, TRUST_FLAG, help="A module artifact: import and run the "
                                                "factory its manifest names (printed first). Code execution: only "
                                                "for artifacts whose author you trust."),
) -> None:
    """Re-run the parity check of ARTIFACT's engine against its PyTorch original."""
    from imgembed.export.pipeline import recheck_artifact
    from imgembed.preprocess.imagedir import load_image_dir

    with errors(), steps("checking parity") as step:
        pairs, skipped = load_image_dir(images) if images is not None else (None, [])
        report = recheck_artifact(artifact, weights=weights, threads=threads, step=step, backend=backend,
                                  images=pairs, module=module, trust_manifest_factory=trust_manifest_factory)
        text_report = _recheck_text(artifact, weights, threads, backend, step)
    from imgembed.gate.parity import format_report

    for why in skipped:
        err_console.print(f"[bold yellow]skipped[/]: {why}", highlight=False)
    if as_json:
        extra = {} if images is None else {"image_dir": {"path": str(images), "skipped": skipped}}
        text = {} if text_report is None else {"text": text_report.to_dict()}
        print(json.dumps({**report.to_dict(), **extra, **text}, indent=2))
    else:
        out_console.print(format_report(report), highlight=False)
        if text_report is not None:
            out_console.print("text tower: " + format_report(text_report).replace(" images ", " captions ", 1),
                              highlight=False)
    if not report.passed or (text_report is not None and not text_report.passed):
        raise typer.Exit(2)


def _recheck_text(artifact: Path, weights: Optional[Path], threads: Optional[int], backend: str, step):
    """The text tower's re-check when the artifact has one (None otherwise)."""
    from imgembed.artifact import read_manifest

    manifest = read_manifest(artifact)
    if manifest.text is None:
        return None
    from imgembed.export.text_tower import recheck_text

    return recheck_text(artifact, manifest, weights=weights, threads=threads, backend=backend, step=step)


def _save_npy(path: Path, vectors: np.ndarray, paths: List[str]) -> Path:
    """Write vectors.npy and a sidecar NAME.paths.txt (row order), each atomically."""
    from imgembed.artifact import atomic_path, write_bytes_atomic

    sidecar = path.with_suffix(".paths.txt")
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, vectors)
    write_bytes_atomic(sidecar, "".join(p + "\n" for p in paths).encode())
    return sidecar


@contextlib.contextmanager
def _embed_progress(total: int) -> Iterator:
    """A progress bar with images/s; yields ``update(done, total, failed)``."""
    columns = (TextColumn("[bold]embedding"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[ips]:.1f} img/s, {task.fields[failed]} failed"), TimeElapsedColumn(),
               TimeRemainingColumn())
    with Progress(*columns, console=err_console, transient=True) as progress:
        task = progress.add_task("embed", total=total, ips=0.0, failed=0)
        t0, first = time.perf_counter(), None

        def update(done: int, total_: int, failed: int) -> None:
            nonlocal first
            first = done if first is None else first  # resumed rows are not this run's speed
            ips = (done - first) / max(time.perf_counter() - t0, 1e-9)
            progress.update(task, completed=done, total=total_, ips=ips, failed=failed)

        yield update


def _engine(model: str, emb, *, batch_size: int, workers: Optional[int], decode: str, threads: Optional[int],
            ray: bool, ray_address: Optional[str], backend: str = "auto"):
    """The local pipeline, or Ray Data actors (artifact directories only)."""
    from imgembed.jobs.folder import local_batches

    if not (ray or ray_address):
        return local_batches(emb, batch_size=batch_size, workers=workers)
    if emb.artifact_path is None:
        raise typer.BadParameter("--ray runs exported artifacts; give an artifact directory, not a registry name")
    from imgembed.jobs.ray import ray_batches

    return ray_batches(emb.artifact_path, batch_size=batch_size, decode=decode, threads_per_actor=threads or 1,
                       address=ray_address, backend=backend)


def _run_npy(out: Path, files: List[str], engine, emb) -> tuple[int, list[tuple[str, str]]]:
    """Embed into OUT.npy + OUT.paths.txt (not resumable); returns (rows written, failures)."""
    from imgembed.runtime.results import Embeddings

    chunks, done, failed = [], 0, 0
    with _embed_progress(len(files)) as update:
        for chunk in engine(files):
            chunks.append(chunk)
            done, failed = done + chunk.inputs, failed + len(chunk.errors)
            update(done, len(files), failed)
    result = Embeddings.concat(chunks, emb.dim, files)  # listing order
    _save_npy(out, result.vectors, result.paths)
    return len(result.indices), result.failures


@app.command("embed")
def embed_cmd(
    model: str = typer.Argument(..., help="Artifact directory, or a registry name (PyTorch original)."),
    inputs: List[str] = typer.Argument(..., help="Image files, directories (recursive) or glob patterns "
                                       "(quote them: 'photos/**/*.jpg')."),
    out: Path = typer.Option(Path("embeddings.npy"), "--out", "-o", help="OUT.npy (float32 N x D, row order in "
                             "OUT.paths.txt) or OUT.parquet (path, vector, error per image; resumable)."),
    batch_size: int = typer.Option(16, "--batch-size", "-b", min=1),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="Inference threads (per actor with --ray)."),
    workers: Optional[int] = typer.Option(None, "--workers", min=0, help="Decode threads overlapped with "
                                          "inference (default: one per core; 0 = decode in the main thread)."),
    decode: str = typer.Option("exact", "--decode", help="exact (identical to the HF processor) or fast "
                               "(reduced-size JPEG decoding, crop-only resize; see docs/performance.md)."),
    part_rows: int = typer.Option(1024, "--part-rows", min=1, help="Parquet: checkpoint every N rows."),
    ray: bool = typer.Option(False, "--ray", help="Run on Ray Data (local instance unless --ray-address)."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="Ray cluster address (implies --ray)."),
    weights: Optional[Path] = typer.Option(None, "--weights", help="With a registry name: local weights."),
    random_init: bool = typer.Option(False, "--random-init", help="With a registry name: random weights."),
    backend: str = typer.Option("auto", "--backend", help="Engine to run: auto (the artifact's best engine "
                                "usable here) or a backend name (see `imgembed backends`)."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
    verify: str = typer.Option("stat", "--verify", help="Parquet: when a row is reused on a rerun: 'stat' (the "
                               "file's size and mtime are unchanged) or 'content' (and a blake2b hash of its bytes)."),
    retry_failed: bool = typer.Option(True, "--retry-failed/--no-retry-failed", help="Parquet: embed the failed "
                                      "rows of an existing output again (default) or keep them."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Parquet: replace an existing output (and stopped "
                                   "job) instead of reusing its rows; needed when it was made with another model."),
    follow_symlinks: bool = typer.Option(False, "--follow-symlinks", help="Walk symbolic links to folders found "
                                         "inside the inputs (each folder once); default: skip them, saying so."),
    max_parts: Optional[int] = typer.Option(None, "--max-parts", hidden=True, help="Test hook: stop after N parts."),
) -> None:
    """Embed images into .npy or .parquet. Unreadable inputs are reported (exit code 3), never fatal."""
    import imgembed
    from imgembed.jobs import printable
    from imgembed.jobs.folder import VERIFY_MODES, FolderJob, job_metadata, walk_inputs
    from imgembed.runtime.pipeline import default_workers

    listing = walk_inputs(inputs, follow_symlinks=follow_symlinks)
    for note in listing.skipped[:20]:
        err_console.print(f"[yellow]skipped[/]: {escape(printable(note))}", highlight=False)
    if listing.skipped:
        err_console.print(f"skipped {len(listing.skipped)} entr{'y' if len(listing.skipped) == 1 else 'ies'} while "
                          "listing the inputs" + (" (first 20 shown)" if len(listing.skipped) > 20 else ""),
                          highlight=False)
    files = listing.paths
    if not files:
        err_console.print(f"[bold red]error[/]: no image files found in {inputs}")
        raise typer.Exit(2)
    if decode not in ("exact", "fast"):
        raise typer.BadParameter(f"--decode {decode!r}; expected 'exact' or 'fast'")
    if out.suffix not in (".npy", ".parquet"):
        raise typer.BadParameter(f"--out {str(out)!r}: expected a .npy or .parquet file name")
    if verify not in VERIFY_MODES:
        raise typer.BadParameter(f"--verify {verify!r}; expected one of {', '.join(VERIFY_MODES)}")
    kwargs = {"threads": threads, "batch_size": batch_size, "decode": decode, "backend": backend,
              "device": device}
    if weights or random_init:
        kwargs.update(weights=weights, random_init=random_init)
    workers = default_workers() if workers is None else workers
    with errors():
        emb = imgembed.load(model, **kwargs)
        engine = _engine(model, emb, batch_size=batch_size, workers=workers, decode=decode, threads=threads,
                         ray=ray, ray_address=ray_address, backend=backend)
        if out.suffix == ".npy":
            rows, failures = _run_npy(out, files, engine, emb)
        else:
            job = FolderJob(out, files, job_metadata(emb), part_rows=part_rows, verify=verify,
                            retry_failed=retry_failed, overwrite=overwrite)
            rows, failures = _run_parquet(job, engine, max_parts)
    for _path, msg in failures:
        err_console.print(f"[yellow]skipped[/]: {escape(printable(msg))}", highlight=False)
    out_console.print(f"wrote {rows} x {emb.dim} embeddings ({emb.name}, {emb.precision}, decode {decode}) to {out}"
                      + (f" (paths: {out.with_suffix('.paths.txt')})" if out.suffix == ".npy" else "")
                      + f"; {len(failures)} failed", highlight=False)
    if failures:
        raise typer.Exit(3)


def _run_parquet(job, engine, max_parts: Optional[int]) -> tuple[int, list[tuple[str, str]]]:
    """The resumable folder job; returns (rows in the output, failures recorded in it)."""
    from imgembed.jobs.parquet import read_embeddings

    with _embed_progress(len(job.paths)) as update:
        result = job.run(engine, max_parts=max_parts, progress=update)
    if result.resumed:
        out_console.print(f"resumed: {result.resumed} of {len(job.paths)} images were already done",
                          highlight=False)
    out_console.print(result.summary(), highlight=False)
    if not result.complete:
        out_console.print(f"stopped after {max_parts} part(s), {result.rows} rows checkpointed in {job.work}; "
                          "rerun the same command to finish", highlight=False)
        raise typer.Exit(0)
    failures = read_embeddings(job.out).failures
    return result.rows - len(failures), failures


# Sub-commands that live in their own modules; each exposes ``register(app: typer.Typer)``.
def _register_subcommands() -> None:
    from imgembed.cli import bench, search, serve, sign, text

    for module in (bench, serve, text, search, sign):
        module.register(app)


_register_subcommands()


def main(argv: Optional[List[str]] = None) -> None:
    """Console-script entry point."""
    app(args=argv, prog_name="imgembed")


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
