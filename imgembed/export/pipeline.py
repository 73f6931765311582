"""The export flow: resolve -> build original -> export ONNX -> optimize -> quantize -> parity -> write.

:func:`export_model` is what ``imgembed export`` calls. Each step lives in its own module and is testable
alone; this module only sequences them and writes the artifact atomically (no artifact on failure unless
``keep_failed``, which marks the manifest ``"status": "failed"``).
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
from typing import Callable, Sequence

import numpy as np

from .. import __version__
from ..artifact import (FORMAT_VERSION, MANIFEST, MODEL_FILE, export_lock, file_checksums, staged_directory,
                        write_json_atomic)
from ..errors import ExportError, ImageDecodeError, ParityError
from ..fastdecode import crops_of, crops_to_pixels
from ..families import (DEFAULT_SEED, FAMILY, fold_layer_scale, freeze_position_embeddings, load_original,
                        source_record)
from ..parity import format_report, parity_report
from ..preprocess import load_image, preprocess_batch
from ..registry import ModelSpec, get_spec
from ..runtime.ort_runner import OrtRunner
from ..runtime.timing import median_batch_seconds
from ..runtime.torch_runner import TorchRunner
from ..samples import calibration_images, parity_images
from .onnx_export import (DEFAULT_OPSET, INPUT_NAME, OUTPUT_NAME, convert_fp16, export_onnx, op_counts,
                          optimize_transformer)
from .quantize import (CNN_CANDIDATES, PRESETS, TRANSFORMER_DEFAULT, Int8SlowerWarning, QuantConfig, quantize,
                       quantized_op_counts)
from .uint8_input import add_uint8_input, input_record

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
SPEED_BATCH = 8
INPUT_FORMATS = ("float32", "uint8")


@dataclass
class ExportOptions:
    precision: str = "fp32"                 # "fp32" | "fp16" (for GPUs; parity-checked on CPU) | "int8"
    weights: str | Path | None = None       # save_pretrained directory
    random_init: bool = False
    seed: int = DEFAULT_SEED
    calibration: str | Path | None = None   # directory of images for static INT8
    int8_preset: str | None = None          # None = pick by family (CNNs: measured)
    optimize: bool = True                   # ORT transformer fusion for ViT-like families
    opset: int = DEFAULT_OPSET
    keep_failed: bool = False
    threads: int | None = None
    speed_check: bool = True                # time FP32 vs INT8 on this machine
    input_format: str = "float32"           # "float32" NCHW normalised | "uint8" NHWC resize+crop (see uint8_input)


@dataclass
class ExportResult:
    path: Path | None
    manifest: dict
    warnings: list[str] = field(default_factory=list)


Step = Callable[[str], None]


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import torch
    import transformers

    return {"imgembed": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__, "numpy": np.__version__,
            "python": platform.python_version()}


def calibration_batches(spec: ModelSpec, directory: str | Path | None, batch: int = 8,
                        limit: int = 256) -> tuple[list[np.ndarray], dict]:
    """Preprocessed calibration batches from ``directory`` (unreadable files skipped and reported) or the
    built-in sample set."""
    skipped: list[str] = []
    if directory is None:
        images, origin = list(calibration_images()), "built-in (scikit-image sample photos, crops, flips)"
    else:
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
        origin = str(d.resolve())
    pixels = preprocess_batch(images, spec.preprocess)
    batches = [pixels[i:i + batch] for i in range(0, len(pixels), batch)]
    return batches, {"source": origin, "images": len(images), "skipped": skipped}


def _speed(model: Path, pixels: np.ndarray, threads: int | None, dim: int) -> float:
    with OrtRunner(model, dim, threads=threads) as r:
        return median_batch_seconds(r, pixels[:SPEED_BATCH], max_seconds=2.0)


def _int8_candidates(spec: ModelSpec, opts: ExportOptions) -> list[QuantConfig]:
    if opts.int8_preset:
        if opts.int8_preset not in PRESETS:
            raise ExportError(f"unknown INT8 preset {opts.int8_preset!r}; expected one of {sorted(PRESETS)}")
        return [PRESETS[opts.int8_preset]]
    if FAMILY[spec.family].is_transformer:
        return [PRESETS[TRANSFORMER_DEFAULT]]
    return [PRESETS[n] for n in CNN_CANDIDATES]


def _quantize_best(spec: ModelSpec, fp32: Path, work: Path, ref: np.ndarray, pixels: np.ndarray,
                   names: Sequence[str], opts: ExportOptions, step: Step) -> tuple[Path, dict, dict]:
    """Quantize with each candidate preset; keep the fastest that passes parity. Returns
    (model path, quantization record, parity report)."""
    candidates = _int8_candidates(spec, opts)
    calib, calib_info = (None, None)
    if any(c.mode == "static" for c in candidates):
        step("preprocessing calibration images")
        calib, calib_info = calibration_batches(spec, opts.calibration)
    fp32_s = _speed(fp32, pixels, opts.threads, spec.embedding.dim) if opts.speed_check else None
    tried = []
    for cfg in candidates:
        step(f"quantizing to INT8 ({cfg.name})")
        path = quantize(fp32, work / f"int8-{cfg.name}.onnx", cfg, calib, INPUT_NAME)
        with OrtRunner(path, spec.embedding.dim, threads=opts.threads) as r:
            report = parity_report(ref, r, pixels, spec.thresholds("int8"), "int8", names)
            secs = median_batch_seconds(r, pixels[:SPEED_BATCH], max_seconds=2.0) if opts.speed_check else None
        tried.append({"preset": cfg, "path": path, "report": report, "seconds": secs})
    passing = [t for t in tried if t["report"]["passed"]] or tried
    best = min(passing, key=lambda t: t["seconds"] if t["seconds"] is not None else 0.0)
    speedup = (fp32_s / best["seconds"]) if fp32_s and best["seconds"] else None
    record = {
        "preset": best["preset"].to_dict(),
        "calibration": calib_info,
        "quantized_ops": quantized_op_counts(best["path"]),
        "speed_check": None if speedup is None else {
            "batch_size": SPEED_BATCH, "threads": opts.threads, "fp32_ms": fp32_s * 1e3,
            "int8_ms": best["seconds"] * 1e3, "speedup_vs_fp32": speedup},
        "candidates": [{"preset": t["preset"].name, "passed": t["report"]["passed"],
                        "ms": None if t["seconds"] is None else t["seconds"] * 1e3,
                        "metrics": t["report"]["metrics"]} for t in tried],
    }
    return best["path"], record, best["report"]


@dataclass(frozen=True)
class ParitySet:
    """The parity images, prepared once: names, uint8 crops, float pixels, and the original's embeddings."""

    names: tuple[str, ...]
    crops: np.ndarray       # (N, H, W, 3) uint8: input of uint8 artifacts
    pixels: np.ndarray      # (N, 3, H, W) float32: the same crops normalised (identical to preprocess_batch)
    reference: np.ndarray   # (N, dim) float32: the PyTorch original's embeddings of ``pixels``

    def inputs(self, input_format: str) -> np.ndarray:
        return self.crops if input_format == "uint8" else self.pixels


def _reference(head, spec: ModelSpec, threads: int | None) -> ParitySet:
    """Prepare the parity images once and embed them with the original."""
    names, images = zip(*parity_images())
    crops = crops_of(images, spec.preprocess)
    pixels = crops_to_pixels(crops, spec.preprocess)
    with TorchRunner(head, spec.input_hw, spec.embedding.dim, threads=threads) as runner:
        reference = np.concatenate([runner.infer(pixels[i:i + 8]) for i in range(0, len(pixels), 8)])
    return ParitySet(names, crops, pixels, reference)


def recheck_artifact(artifact: str | Path, weights: str | Path | None = None, threads: int | None = None,
                     step: Step = lambda s: None) -> dict:
    """Re-run the parity gate of an existing artifact against its original, rebuilt from the manifest's
    source record (hub repo@revision, local directory, or seeded random init)."""
    from ..artifact import read_manifest, verify

    artifact = Path(artifact)
    manifest = verify(artifact, read_manifest(artifact))
    spec = ModelSpec.from_dict(manifest["name"], manifest["model"])
    src = manifest["source"]
    step(f"rebuilding the original ({src['kind']})")
    if src["kind"] == "random-init":
        head = load_original(spec, random_init=True, seed=int(src["seed"]))
    elif src["kind"] == "local" or weights is not None:
        head = load_original(spec, weights=weights or src["path"])
    else:
        head = load_original(spec)
    step("computing PyTorch reference embeddings")
    ps = _reference(head, spec, threads)
    step("running the artifact at batch sizes 1, 3, 8")
    precision = manifest["precision"]
    inputs = ps.inputs("uint8" if manifest.get("input", {}).get("dtype") == "uint8" else "float32")
    with OrtRunner(artifact / MODEL_FILE, spec.embedding.dim, threads=threads) as runner:
        return parity_report(ps.reference, runner, inputs, spec.thresholds(precision), precision, ps.names)


def _write_artifact(out: Path, model: Path, manifest: dict) -> None:
    with staged_directory(out) as stage:
        shutil.copyfile(model, stage / MODEL_FILE)
        manifest["files"] = file_checksums(stage)
        write_json_atomic(stage / MANIFEST, manifest)


def _finish_graph(spec: ModelSpec, opts: ExportOptions, model: Path, work: Path, ps: ParitySet,
                  optimizations: list[str], step: Step) -> tuple[Path, dict | None, dict]:
    """Precision (INT8 / FP16), then the uint8 input if asked, then the parity gate on the final graph.
    Returns (model path, quantization record, parity report); uint8 graphs are fed the uint8 parity crops."""
    quant, report = None, None
    if opts.precision == "int8":
        model, quant, report = _quantize_best(spec, model, work, ps.reference, ps.pixels, ps.names, opts, step)
    elif opts.precision == "fp16":
        step("converting to FP16 (normalisations and softmax kept in FP32)")
        model = convert_fp16(model, work / "fp16.onnx")
        optimizations.append("fp16")
    if opts.input_format == "uint8":
        step("adding the uint8 NHWC input (normalisation inside the graph)")
        model = add_uint8_input(model, work / "uint8.onnx", spec.preprocess)
        report = None  # the INT8 candidates were judged on float input: gate the final graph again
        optimizations.append("uint8-input")
    if report is None:
        step("checking parity" + (" (uint8 crops of the parity images)" if opts.input_format == "uint8" else ""))
        with OrtRunner(model, spec.embedding.dim, threads=opts.threads) as r:
            report = parity_report(ps.reference, r, ps.inputs(opts.input_format), spec.thresholds(opts.precision),
                                   opts.precision, ps.names)
    return model, quant, report


def export_model(name: str | ModelSpec, out: str | Path, opts: ExportOptions | None = None,
                 step: Step = lambda s: None) -> ExportResult:
    """Export ``name`` to the artifact directory ``out`` and gate it on parity. See module docstring.

    The whole export holds ``out``'s export lock: concurrent exports to one directory run one after the
    other, and work directories of killed exports are cleaned by the next one (artifact.clean_stale).
    """
    with export_lock(out):
        return _export_locked(name, out, opts, step)


def _export_locked(name: str | ModelSpec, out: str | Path, opts: ExportOptions | None, step: Step) -> ExportResult:
    opts = opts or ExportOptions()
    spec = name if isinstance(name, ModelSpec) else get_spec(name)
    if opts.precision not in ("fp32", "fp16", "int8"):
        raise ExportError(f"precision {opts.precision!r} is not supported; expected 'fp32', 'fp16' or 'int8'")
    if opts.input_format not in INPUT_FORMATS:
        raise ExportError(f"input_format {opts.input_format!r} is not supported; expected one of {list(INPUT_FORMATS)}")
    out = Path(out)
    t0 = time.perf_counter()
    step(f"loading {spec.name} ({'random init' if opts.random_init else opts.weights or 'hub'})")
    head = load_original(spec, weights=opts.weights, random_init=opts.random_init, seed=opts.seed)
    step("computing PyTorch reference embeddings")
    parity_set = _reference(head, spec, opts.threads)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.work-") as tmp:
        work = Path(tmp)
        step("exporting to ONNX")
        if spec.family == "dinov2":
            freeze_position_embeddings(head, spec.input_hw)  # a constant instead of a Resize per call
            if opts.optimize:
                fold_layer_scale(head)  # lets ORT fuse attention; the parity gate checks the result
        model = export_onnx(head, spec, work / "exported.onnx", opts.opset)
        del head
        optimizations, fused = [], {}
        if opts.optimize and FAMILY[spec.family].ort_model_type:
            step("fusing transformer ops (ONNX Runtime optimizer)")
            fused = optimize_transformer(model, work / "fused.onnx", spec)
            model = work / "fused.onnx"
            optimizations.append("ort-transformer-fusion")
        model, quant, report = _finish_graph(spec, opts, model, work, parity_set, optimizations, step)
        manifest, notes = _manifest(spec, opts, model, report, quant, optimizations, fused,
                                    time.perf_counter() - t0)
        if not report["passed"] and not opts.keep_failed:
            raise ParityError(f"{spec.name} {opts.precision} export failed the parity gate ("
                              f"{'; '.join(report['failures'])}); no artifact written (pass --keep-failed to "
                              f"keep it, marked failed)\n{format_report(report)}", report)
        step(f"writing artifact to {out}")
        _write_artifact(out, model, manifest)
    return ExportResult(out, manifest, notes)


def _manifest(spec: ModelSpec, opts: ExportOptions, model: Path, report: dict, quant: dict | None,
              optimizations: list[str], fused: dict, seconds: float) -> tuple[dict, list[str]]:
    notes: list[str] = []
    speed = (quant or {}).get("speed_check")
    if speed and speed["speedup_vs_fp32"] < 1.0:
        msg = (f"INT8 {spec.name} measured SLOWER than FP32 on this machine "
               f"({speed['int8_ms']:.1f} ms vs {speed['fp32_ms']:.1f} ms per batch of {SPEED_BATCH}, "
               f"{speed['speedup_vs_fp32']:.2f}x). The artifact is written because --int8 was requested; "
               "prefer the FP32 artifact for speed on this CPU.")
        warnings.warn(msg, Int8SlowerWarning, stacklevel=3)
        notes.append(msg)
    manifest = {
        "format_version": FORMAT_VERSION,
        "status": "passed" if report["passed"] else "failed",
        "name": spec.name,
        "model": spec.to_dict(),
        "source": source_record(spec, opts.weights, opts.random_init, opts.seed),
        "precision": opts.precision,
        "opset": opts.opset,
        "input": input_record(spec.preprocess, opts.input_format),
        "output": {"name": OUTPUT_NAME, "dim": spec.embedding.dim, "normalized": spec.embedding.normalize,
                   "dtype": "float32"},
        "preprocess": spec.preprocess.to_dict(),
        "export": {"optimizations": optimizations, "fused_ops": fused, "quantization": quant,
                   "op_counts": op_counts(model), "seconds": round(seconds, 2),
                   "model_bytes": model.stat().st_size},
        "parity": report,
        "warnings": notes,
        "versions": _versions(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    return manifest, notes
