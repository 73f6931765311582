"""The export flow: resolve -> build original -> export ONNX -> optimize -> engine race -> write.

:func:`export_model` is what ``imgembed export`` calls for registry models; it builds the :class:`Original`
and hands it to :func:`export_original`, which :func:`~imgembed.export.module_export.export_module` (your own
``torch.nn.Module``) shares. Each step lives in its own module and is testable
alone; this module only sequences them and writes the artifact atomically (no artifact on failure unless
``keep_failed``, which marks the manifest ``"status": "failed"``). The engine race (:mod:`.engines`) builds
every candidate the installed engines offer at the requested precision, gates each on parity, times the
passing ones side by side and keeps the fastest as the artifact's default engine.
"""
from __future__ import annotations

import datetime as _dt
import platform
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from imgembed import __version__
from imgembed.artifact import (
    FORMAT_VERSION,
    Engine,
    ExportRecord,
    Manifest,
    TextTower,
    export_lock,
    file_checksums,
    staged_directory,
    write_manifest,
)
from imgembed.errors import ExportError, ImageDecodeError
from imgembed.export import engines, recipes, tower
from imgembed.export.onnx_export import DEFAULT_OPSET, OUTPUT_NAME, export_onnx, op_counts, optimize_transformer
from imgembed.export.quantize import Int8SlowerWarning
from imgembed.export.stages import StageClock
from imgembed.export.uint8_input import input_record
from imgembed.gate.parity import ParityReport
from imgembed.gate.reference import reference_set
from imgembed.gate.samples import calibration_images
from imgembed.models.checkpoint import check_artifact_preprocess, with_checkpoint_preprocess
from imgembed.models.checkpoint import describe as describe_preprocess
from imgembed.models.families import DEFAULT_SEED, family_of, load_original, original_from_source, source_record
from imgembed.models.registry import ModelSpec, get_spec
from imgembed.preprocess import load_image
from imgembed.preprocess.fast import crops_of, crops_to_pixels
from imgembed.preprocess.imagedir import load_image_dir

if TYPE_CHECKING:
    from imgembed.export.tensorrt import TrtOptions

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
SPEED_BATCH = engines.SPEED_BATCH
INPUT_FORMATS = ("float32", "uint8")
PRECISIONS = ("fp32", "bf16", "fp16", "int8")


@dataclass
class ExportOptions:
    precision: str = "fp32"                 # "fp32" | "bf16" | "fp16" (for GPUs; parity-checked on CPU) | "int8"
    weights: str | Path | None = None       # save_pretrained directory
    random_init: bool = False
    seed: int = DEFAULT_SEED
    calibration: str | Path | None = None   # directory of images for static INT8
    int8_preset: str | None = None          # force one ONNX Runtime preset (None: the batch-invariant defaults)
    backend: str | None = None              # build only this backend's engines ("onnxruntime", ...); None: race all
    keep_candidates: bool = False           # keep every passing engine, not just the winner + a portable one
    optimize: bool = True                   # ORT transformer fusion for ViT-like families
    opset: int = DEFAULT_OPSET
    keep_failed: bool = False
    threads: int | None = None
    speed_check: bool = True                # time the passing engines side by side on this machine
    input_format: str = "float32"           # "float32" NCHW normalised | "uint8" NHWC resize+crop (see uint8_input)
    text: bool = False                      # CLIP / SigLIP: add the text tower (text/ in the artifact)
    tokenizer: str | Path | None = None     # tokenizer directory / tokenizer.json (default: the checkpoint's)
    trt: TrtOptions | None = None           # ``--trt``: race TensorRT plans for this GPU too (profile, cache)


@dataclass
class Original:
    """The PyTorch original of an export and where it came from (the manifest's ``source`` and
    ``preprocess_source``); ``spec`` carries the preprocessing actually used."""

    spec: ModelSpec
    head: Any                   # EmbeddingHead or ModuleHead: (N, 3, H, W) float32 -> (N, dim)
    source: dict
    preprocess_source: dict


@dataclass
class ExportResult:
    path: Path | None
    manifest: Manifest
    warnings: list[str] = field(default_factory=list)


Step = Callable[[str], None]


def _versions() -> dict[str, str | None]:
    import onnx
    import onnxruntime
    import torch
    import transformers

    from imgembed.runtime.host import library_versions

    libs = library_versions()
    return {"imgembed": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__, "numpy": np.__version__,
            "openvino": libs.get("openvino"), "nncf": libs.get("nncf"), "python": platform.python_version()}


def _calibration_images(directory: str | Path | None, limit: int) -> tuple[list, dict]:
    """Decoded calibration images from ``directory`` (unreadable files skipped and reported) or the
    built-in sample set."""
    skipped: list[str] = []
    if directory is None:
        return list(calibration_images()), {"source": "built-in (scikit-image sample photos, crops, flips)",
                                            "skipped": skipped}
    d = Path(directory)
    if not d.is_dir():
        raise ExportError(f"calibration directory {d} does not exist")
    files = sorted(p for p in d.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)[:limit]
    images = []
    for p in files:
        try:
            images.append(load_image(p))
        except ImageDecodeError as e:
            skipped.append(str(e))
    if not images:
        raise ExportError(f"calibration directory {d} holds no readable images "
                          f"(looked for {sorted(IMAGE_SUFFIXES)}; {len(skipped)} unreadable)")
    return images, {"source": str(d.resolve()), "skipped": skipped}


def calibration_set(spec: ModelSpec, directory: str | Path | None,
                    limit: int = 256) -> tuple[np.ndarray, np.ndarray, dict]:
    """Calibration inputs for every engine: float pixels, the same images as uint8 crops, and a record."""
    images, info = _calibration_images(directory, limit)
    crops = crops_of(images, spec.preprocess)
    return crops_to_pixels(crops, spec.preprocess), crops, {**info, "images": len(images)}


def calibration_batches(spec: ModelSpec, directory: str | Path | None, batch: int = 8,
                        limit: int = 256) -> tuple[list[np.ndarray], dict]:
    """Preprocessed calibration batches (float pixels) and their record; see :func:`calibration_set`."""
    pixels, _, info = calibration_set(spec, directory, limit)
    return [pixels[i:i + batch] for i in range(0, len(pixels), batch)], info


def recheck_artifact(artifact: str | Path, weights: str | Path | None = None, threads: int | None = None,
                     step: Step = lambda s: None, backend: str = "auto", images=None,
                     module: str | Callable | None = None, trust_manifest_factory: bool = False) -> ParityReport:
    """Re-run the parity gate of an existing artifact's engine (the one ``backend`` selects here) against
    its original, rebuilt from the manifest's source record (hub repo@revision, local directory, or seeded
    random init). A checkpoint whose preprocessor_config.json no longer gives the artifact's preprocessing
    raises ArtifactError. ``images``: a directory of the user's images or (name, PIL image) pairs instead
    of the built-in parity set (unreadable files in a directory are skipped and reported through ``step``).
    A module artifact is rebuilt from the caller's factory ``module`` (a path or a callable), or from the
    recorded factory only when ``trust_manifest_factory``: nothing a manifest names is imported otherwise."""
    from imgembed.artifact import read_manifest, verify
    from imgembed.runtime.backends import select_engine

    artifact = Path(artifact)
    manifest = verify(artifact, read_manifest(artifact))
    engine, _ = select_engine(manifest, backend, "cpu", where=str(artifact))
    spec = manifest.model_spec()
    source = manifest.source_record()
    step(f"rebuilding the original ({manifest.source.kind})")
    head = original_from_source(spec, source, weights_override=weights, module=module,
                                trust_manifest_factory=trust_manifest_factory)
    check_artifact_preprocess(spec, source, weights, str(artifact))
    if isinstance(images, (str, Path)):
        images, skipped = load_image_dir(images)
        for why in skipped:
            step(f"skipped {why}")
    step("computing PyTorch reference embeddings")
    ps = reference_set(head, spec, threads, images=images)
    step(f"running engine {engine.id} at batch sizes 1, 3, 8")
    return tower.gate_engine(artifact, manifest, engine, ps, spec.thresholds(engine.precision), threads=threads)


def _write_artifact(out: Path, kept: list[engines.Outcome], fields: dict, text=None) -> Manifest:
    """Copy the kept engines' files into the artifact (the first ONNX Runtime engine as ``model.onnx``,
    every other engine under a directory named by its id; the text tower's the same way under ``text/``,
    with its tokenizer.json), record them, and write the typed manifest. Returns it."""
    taken: set[str] = set()
    with staged_directory(out) as stage:
        image_engines = _place_engines(stage, kept, "", taken)
        text_tower = space = None
        if text is not None:
            (stage / "text").mkdir(exist_ok=True)
            (stage / text.section["tokenizer"]["file"]).write_text(text.tokenizer_json, encoding="utf-8")
            text_tower = TextTower.model_validate({**text.section,
                                                  "engines": _place_engines(stage, text.kept, "text/", taken)})
            space = text.space
        export = fields["export"].model_copy(update={"model_bytes": sum((stage / rel).stat().st_size
                                                                        for rel in taken)})
        manifest = Manifest.model_validate({
            **fields, "export": export, "engines": image_engines, "text": text_tower, "space": space,
            "towers": ["image", "text"] if text is not None else ["image"], "files": file_checksums(stage)})
        write_manifest(stage, manifest)
    return manifest


def _place_engines(stage: Path, kept: list[engines.Outcome], prefix: str, taken: set[str]) -> list[Engine]:
    records = []
    for o in kept:
        c = o.candidate
        flat = c.backend == "onnxruntime" and f"{prefix}model.onnx" not in taken
        files = {}
        for key, src in o.files.items():
            rel = f"{prefix}{src.name}" if flat else f"{prefix}{c.id}/{src.name}"
            (stage / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, stage / rel)
            files[key] = rel
            taken.add(rel)
        records.append(_engine_record(o, files))
    return records


def _engine_record(o: engines.Outcome, files: dict[str, str]) -> Engine:
    c = o.candidate
    return Engine(id=c.id, backend=c.backend, precision=c.precision, inference_precision=c.inference_precision,
                  device=c.device, target=o.target, batch_invariant=c.batch_invariant, needs_vnni=c.needs_vnni,
                  files=files,
                  quantization=o.record or None, img_per_s=None if o.img_per_s is None else round(o.img_per_s, 2),
                  parity=None if o.report is None else o.report.metrics)


def export_model(name: str | ModelSpec, out: str | Path, opts: ExportOptions | None = None,
                 step: Step = lambda s: None) -> ExportResult:
    """Export ``name`` to the artifact directory ``out`` and gate it on parity. See module docstring.

    The whole export holds ``out``'s export lock: concurrent exports to one directory run one after the
    other, and work directories of killed exports are cleaned by the next one (artifact.clean_stale).
    """
    with export_lock(out):
        return _export_locked(name, out, opts, step)


def _check_options(opts: ExportOptions) -> None:
    if opts.precision not in PRECISIONS:
        raise ExportError(f"precision {opts.precision!r} is not supported; expected one of {list(PRECISIONS)}")
    if opts.input_format not in INPUT_FORMATS:
        raise ExportError(f"input_format {opts.input_format!r} is not supported; expected one of {list(INPUT_FORMATS)}")
    if opts.text and opts.input_format == "uint8":
        raise ExportError("--text and --uint8-input cannot be combined: the text tower takes token ids")
    if opts.tokenizer is not None and not opts.text:
        raise ExportError("--tokenizer is used by the text tower only; add --text")
    if opts.int8_preset and opts.precision != "int8":
        raise ExportError(f"--int8-preset {opts.int8_preset} needs --int8 (precision is {opts.precision})")
    if opts.trt is not None and opts.input_format != "float32":
        raise ExportError(f"--trt builds engines for float32 NCHW inputs; input format {opts.input_format!r} "
                          "(--uint8-input) is not supported with --trt")


def _graphs(spec: ModelSpec, opts: ExportOptions, head, work: Path, step: Step) -> tuple[Path, Path, dict]:
    """Export the plain ONNX graph and (for transformer families) ORT's fused graph. Returns
    (plain, graph for ONNX Runtime, export record)."""
    step("exporting to ONNX")
    family = family_of(spec)
    surgery = family.prepare_export(head, spec, opts.optimize)  # the parity gate checks the result
    plain = export_onnx(head, spec, work / "exported.onnx", opts.opset)
    optimizations, fused, ort_graph = list(surgery), {}, plain
    if opts.optimize and family.ort_model_type:
        step("fusing transformer ops (ONNX Runtime optimizer)")
        fused = optimize_transformer(plain, work / "fused.onnx", spec)
        ort_graph = work / "fused.onnx"
        optimizations.append("ort-transformer-fusion")
    if opts.input_format == "uint8":
        optimizations.append("uint8-input")
    return plain, ort_graph, {"optimizations": optimizations, "fused_ops": fused}


def plan_candidates(spec: ModelSpec, opts: ExportOptions) -> list[engines.Candidate]:
    """The engine candidates of an export, checked before the original is loaded: the options are valid and
    an engine can build the requested precision here (and, with ``opts.trt``, a GPU engine too)."""
    _check_options(opts)
    if opts.text:
        from imgembed.export.text_tower import text_tower

        text_tower(spec)  # fail before any work when the model has no text tower
    candidates = recipes.plan(opts.precision, transformer=family_of(spec).transformer(spec),
                              int8_preset=opts.int8_preset, backend=opts.backend, gpu=opts.trt is not None)
    engines.check_available(candidates, opts.precision)
    return candidates


def _export_locked(name: str | ModelSpec, out: str | Path, opts: ExportOptions | None, step: Step) -> ExportResult:
    opts = opts or ExportOptions()
    spec = name if isinstance(name, ModelSpec) else get_spec(name)
    candidates = plan_candidates(spec, opts)
    t0 = time.perf_counter()
    step = StageClock.of(step)
    spec, preprocess_source = with_checkpoint_preprocess(spec, opts.weights, opts.random_init)
    step(describe_preprocess(preprocess_source))
    step(f"loading {spec.name} ({'random init' if opts.random_init else opts.weights or 'hub'})")
    head = load_original(spec, weights=opts.weights, random_init=opts.random_init, seed=opts.seed)
    original = Original(spec, head, source_record(spec, opts.weights, opts.random_init, opts.seed), preprocess_source)
    return export_original(original, out, opts, step, candidates=candidates, started=t0)


def export_original(original: Original, out: str | Path, opts: ExportOptions, step: Step = lambda s: None, *,
                    candidates: list[engines.Candidate] | None = None, started: float | None = None) -> ExportResult:
    """Export, race, gate and write an artifact of an already-built original. The caller holds
    ``export_lock(out)``. ``candidates``: from :func:`plan_candidates` (planned here when None); ``started``:
    ``time.perf_counter()`` when the export began (for the manifest's ``seconds``)."""
    spec, head = original.spec, original.head
    family = family_of(spec)
    candidates = plan_candidates(spec, opts) if candidates is None else candidates
    out = Path(out)
    t0 = time.perf_counter() if started is None else started
    step = StageClock.of(step)
    step("computing PyTorch reference embeddings")
    parity_set = reference_set(head, spec, opts.threads)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.work-") as tmp:
        work = Path(tmp)
        plain, ort_graph, graph_record = _graphs(spec, opts, head, work, step)
        calibration: dict = {}

        def calibrate() -> tuple[np.ndarray, np.ndarray, dict]:
            if not calibration:
                step("preprocessing calibration images")
                calibration["set"] = calibration_set(spec, opts.calibration)
                step.back()   # the rest of the time is the build that asked for them
            return calibration["set"]

        inputs = engines.Inputs(spec, work, plain, ort_graph, opts.input_format, parity_set, calibrate,
                                opts.threads, family.transformer(spec), head=head, opset=opts.opset,
                                backend_options={} if opts.trt is None else {"tensorrt": opts.trt})
        raced = tower.race(tower.Tower(spec.name, opts.precision, candidates, inputs,
                                       spec.thresholds(opts.precision)), step, speed_check=opts.speed_check,
                           keep_candidates=opts.keep_candidates, keep_failed=opts.keep_failed)
        kept = raced.kept
        text = None
        if opts.text:
            from imgembed.export.text_tower import export_text

            text = export_text(spec, opts, work, step)
        graph_record["stages"] = step.record()
        fields, notes = _manifest(spec, opts, raced, graph_record, time.perf_counter() - t0,
                                  original.source)
        fields["preprocess_source"] = original.preprocess_source
        if text is not None and text.section["status"] != "passed":
            fields["status"] = "failed"
        step(f"writing artifact to {out}")
        manifest = _write_artifact(out, kept, fields, text)
    return ExportResult(out, manifest, notes)


def _speed_notes(spec: ModelSpec, opts: ExportOptions, winner: engines.Outcome) -> list[str]:
    """Warn when the winner is not faster than the FP32 graph on ONNX Runtime here."""
    speed = winner.record.get("speed_check")
    if not speed or speed["speedup_vs_fp32"] >= 1.0:
        return []
    p = opts.precision
    msg = (f"{p.upper()} {spec.name} measured SLOWER than FP32 on this machine "
           f"({speed[p + '_ms']:.1f} ms vs {speed['fp32_ms']:.1f} ms per batch of {SPEED_BATCH}, "
           f"{speed['speedup_vs_fp32']:.2f}x). The artifact is written because --{p} was requested; "
           "prefer the FP32 artifact for speed on this CPU.")
    warnings.warn(msg, Int8SlowerWarning, stacklevel=5)
    return [msg]


def _manifest(spec: ModelSpec, opts: ExportOptions, raced: tower.Raced,
              graph_record: dict, seconds: float, source: dict) -> tuple[dict, list[str]]:
    """The manifest's fields of the image tower (typed records; the engines and files are added when the
    artifact is written: :func:`_write_artifact`)."""
    winner = raced.winner
    report = winner.report
    notes = _speed_notes(spec, opts, winner)
    model_file = winner.files.get("model")
    manifest = {
        "format_version": FORMAT_VERSION,
        "status": "passed" if report.passed else "failed",
        "name": spec.name,
        "model": spec.to_dict(),
        "source": source,
        "precision": opts.precision,
        "opset": opts.opset,
        "input": input_record(spec.preprocess, opts.input_format),
        "output": {"name": OUTPUT_NAME, "dim": spec.embedding.dim, "normalized": spec.embedding.normalize,
                   "dtype": "float32"},
        "preprocess": spec.preprocess.to_dict(),
        "default_engine": winner.candidate.id,
        "batch_invariant": winner.candidate.batch_invariant,
        "selection": tower.selection(raced, opts.threads, opts.backend),
        "export": ExportRecord(**graph_record, quantization=winner.record or None,
                               op_counts=op_counts(model_file) if model_file and model_file.suffix == ".onnx" else {},
                               seconds=round(seconds, 2)),
        "parity": report.to_dict(),
        "warnings": notes,
        "versions": _versions(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    return manifest, notes
