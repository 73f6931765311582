"""Run a benchmark: every model x mode x batch size, all variants of a model measured interleaved.

Modes:
  model  ("model-only")  preprocessed float32 tensors straight into ``Runner.infer``;
  e2e    ("end-to-end")  encoded JPEG/PNG files on disk through ``Embedder.embed``: decode, preprocess and
                         inference, the path a user's images take.
  pipeline ("end-to-end pipelined")  the same files through the folder-job pipeline: decode threads
                         overlapped with inference (``workers``), ``decode`` "exact" or "fast".
For the end-to-end modes the sample photos can be upscaled to ``e2e_megapixels`` (camera-size JPEGs).

Every record is one configuration (model, mode, backend, precision, batch size, threads, device); records
of one (model, mode, batch size, threads, device) are measured together and get their speed-up against
the PyTorch original FP32 (``torch-fp32``) measured in the same rounds. On the CPU the report also carries this
host's peaks per engine and precision (``roofline``, :mod:`.roofline`, measured first unless ``roofline=False``)
and each record its ``peak_gops`` and ``percent_of_peak``.
"""
from __future__ import annotations

import datetime as _dt
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from imgembed.bench.backends import OriginalCache, Variant, build_runner, plan_variants
from imgembed.bench.measure import BatchFn, Measurement, MeasureSettings, Window, measure_interleaved
from imgembed.bench.roofline import add_peaks, measure_peaks, peak_backend
from imgembed.bench.stats import achieved_gflops, speedup
from imgembed.bench.targets import BenchModel, source_tag
from imgembed.errors import ImgembedError
from imgembed.gate.samples import parity_images
from imgembed.preprocess import preprocess_batch
from imgembed.preprocess.fast import check_mode, crops_of
from imgembed.runtime.base import Runner
from imgembed.runtime.embedder import Embedder
from imgembed.runtime.host import default_threads, host_info, missing_bf16_instructions
from imgembed.runtime.inputs import model_input

SCHEMA = "imgembed-bench/1"
MODES = {"model": "model-only", "e2e": "end-to-end", "pipeline": "end-to-end pipelined"}
BASELINE_LABEL = "torch-fp32"


@dataclass(frozen=True)
class BenchConfig:
    batch_sizes: tuple[int, ...] = (1, 8, 32)
    modes: tuple[str, ...] = ("model",)
    threads: int = field(default_factory=default_threads)
    device: str = "cpu"
    measure: MeasureSettings = MeasureSettings()
    compare_original: bool = True
    torch_attn: str = "sdpa"
    decode: str = "exact"                 # pipeline mode: "exact" | "fast"
    workers: int | None = None            # pipeline mode: decode threads (None: one per core)
    e2e_megapixels: float | None = None   # upscale the end-to-end sample photos to about this size
    engines: tuple[str, ...] | None = None  # backends to run (None: every usable one); the baseline stays
    roofline: bool = True                 # measure this host's peaks per engine and precision first (CPU only)

    def __post_init__(self) -> None:
        if not self.batch_sizes or any(int(b) < 1 for b in self.batch_sizes):
            raise ValueError(f"batch sizes must be integers >= 1, got {list(self.batch_sizes)}")
        bad = [m for m in self.modes if m not in MODES]
        if bad or not self.modes:
            raise ValueError(f"unknown mode(s) {bad or list(self.modes)}; expected some of {list(MODES)}")
        if self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        check_mode(self.decode)

    def to_dict(self) -> dict:
        return {"batch_sizes": list(self.batch_sizes), "modes": [MODES[m] for m in self.modes],
                "threads": self.threads, "device": self.device, "compare_original": self.compare_original,
                "engines": None if self.engines is None else list(self.engines),
                "torch_attention": self.torch_attn, "baseline": BASELINE_LABEL, "decode": self.decode,
                "workers": self.workers, "e2e_megapixels": self.e2e_megapixels, "roofline": self.roofline,
                **self.measure.to_dict()}


class Progress:
    """Hooks the CLI uses to show progress; the default does nothing."""

    def group(self, description: str, configs: int) -> None: ...

    def window(self, label: str, window: Window) -> None: ...

    def group_done(self, records: list[dict]) -> None: ...

    def note(self, text: str) -> None: ...


def write_sample_files(directory: str | Path, megapixels: float | None = None) -> list[Path]:
    """The parity photos as encoded files: JPEG for RGB and greyscale, PNG for images with alpha or a palette;
    with ``megapixels``, upscaled (bicubic) to about that many pixels first."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    files = []
    for name, image in parity_images():
        if megapixels:
            s = (megapixels * 1e6 / (image.width * image.height)) ** 0.5
            image = image.resize((max(1, round(image.width * s)), max(1, round(image.height * s))), 3)
        path = directory / (f"{name}.jpg" if image.mode in ("RGB", "L") else f"{name}.png")
        image.save(path, quality=90) if path.suffix == ".jpg" else image.save(path)
        files.append(path)
    return files


def tile(items: Sequence, n: int) -> list:
    """The first ``n`` items of ``items`` repeated cyclically."""
    return [items[i % len(items)] for i in range(n)]


def batch_function(runner: Runner, model: BenchModel, variant: Variant, mode: str, batch_size: int,
                   pixels: np.ndarray, files: Sequence[Path], *, crops: np.ndarray | None = None,
                   decode: str = "exact", workers: int | None = None) -> BatchFn:
    """A zero-argument function running one batch of ``batch_size`` images; returns the image count.

    Model mode feeds the runner :func:`~imgembed.runtime.inputs.model_input` of ``crops`` (uint8 NHWC), or
    ``pixels`` when no crops are given."""
    if mode == "model":
        source = pixels if crops is None else model_input(runner, crops, model.spec.preprocess)
        batch = np.ascontiguousarray(source[tile(range(len(source)), batch_size)])
        return lambda: runner.infer(batch).shape[0]
    spec = model.spec
    emb = Embedder(runner, spec.preprocess, name=spec.name, precision=variant.precision,
                   normalized=spec.embedding.normalize, batch_size=batch_size)
    paths = [str(p) for p in tile(files, batch_size)]
    if mode == "pipeline":
        from imgembed.runtime.pipeline import default_workers

        w = default_workers() if workers is None else workers
        return lambda: emb.embed(paths, batch_size=batch_size, workers=w, decode=decode).shape[0]
    return lambda: emb.embed(paths, batch_size=batch_size).shape[0]


def inference_precision(variant: Variant) -> str:
    """What the float ops of ``variant`` compute in: the engine's inference precision (bf16 only on a CPU
    with BF16 instructions: elsewhere the runtime opens such an engine in fp32), else the variant's precision."""
    if variant.engine is None:
        return variant.precision
    wanted = variant.engine.inference_precision
    return "fp32" if wanted == "bf16" and missing_bf16_instructions() else wanted


def make_record(model: BenchModel, variant: Variant, mode: str, batch_size: int, config: BenchConfig,
                m: Measurement) -> dict:
    """One JSON record (speed-ups are added by :func:`add_speedups`, peaks by :func:`.roofline.add_peaks`)."""
    art = variant.artifact
    return {"model": model.spec.name, "family": model.spec.family, "source": source_tag(model.source),
            "mode": MODES[mode], "variant": variant.label, "backend": variant.backend,
            "precision": variant.precision, "inference_precision": inference_precision(variant),
            "original": variant.is_original,
            "artifact": None if art is None else str(art.path), "parity_status": None if art is None else art.status,
            "device": config.device, "threads": config.threads, "batch_size": batch_size, **m.to_dict(),
            "gflops_per_image": model.spec.gflops,
            "achieved_gflops": achieved_gflops(model.spec.gflops, m.throughput_ips),
            "baseline": BASELINE_LABEL, "speedup_vs_original": None, "p50_speedup_vs_original": None}


def add_speedups(records: list[dict]) -> list[dict]:
    """Fill ``speedup_vs_original`` (throughput ratio) and ``p50_speedup_vs_original`` (p50 latency ratio)
    of each record against the baseline record of the same model, mode, batch size, threads and device."""
    def key(r: dict) -> tuple:
        return r["model"], r["source"], r["mode"], r["batch_size"], r["threads"], r["device"]

    baselines = {key(r): r for r in records if r["variant"] == BASELINE_LABEL and r["original"]}
    for r in records:
        base = baselines.get(key(r))
        r["speedup_vs_original"] = r["p50_speedup_vs_original"] = None
        if base is not None:
            r["speedup_vs_original"] = round(speedup(r["throughput_ips"], base["throughput_ips"]), 4)
            if r["latency_ms"]["p50"] > 0:
                r["p50_speedup_vs_original"] = round(base["latency_ms"]["p50"] / r["latency_ms"]["p50"], 4)
    return records


def _build_runners(model: BenchModel, config: BenchConfig, progress: Progress,
                   notes: list[str]) -> dict[Variant, Runner]:
    """Active runners for every planned variant of ``model``; one that cannot be built is noted and skipped."""
    original = OriginalCache(model, config.torch_attn)
    runners: dict[Variant, Runner] = {}
    for variant in plan_variants(model, config.device, compare_original=config.compare_original, notes=notes,
                                 engines=config.engines):
        progress.note(f"{model.spec.name}: preparing {variant.label}")
        try:
            runners[variant] = build_runner(model, variant, config.device, config.threads, original).activate()
        except ImgembedError as e:
            notes.append(f"{model.spec.name}: {variant.label} skipped: {e}")
    return runners


def run_model(model: BenchModel, config: BenchConfig, files: Sequence[Path], progress: Progress,
              notes: list[str]) -> list[dict]:
    """Every mode x batch size of one model; returns its records."""
    runners = _build_runners(model, config, progress, notes)
    images = [img for _, img in parity_images()]
    pixels, crops = preprocess_batch(images, model.spec.preprocess), crops_of(images, model.spec.preprocess)
    records: list[dict] = []
    try:
        for mode in config.modes:
            for bs in config.batch_sizes:
                progress.group(f"{model.spec.name} {MODES[mode]} batch {bs}", len(runners))
                fns = {v.label: batch_function(r, model, v, mode, bs, pixels, files, crops=crops,
                                               decode=config.decode, workers=config.workers)
                       for v, r in runners.items()}
                results = measure_interleaved(fns, config.measure, on_window=progress.window)
                group = add_speedups([make_record(model, v, mode, bs, config, results[v.label]) for v in runners])
                progress.group_done(group)
                records += group
    finally:
        for r in runners.values():
            r.deactivate()
    return records


def host_peaks(config: BenchConfig, progress: Progress, notes: list[str]) -> list[dict] | None:
    """This host's peaks (:func:`.roofline.measure_peaks`) for the engines ``config`` runs, at its threads; None
    when ``config.roofline`` is off or the device is not the CPU (noted)."""
    if not config.roofline:
        return None
    if config.device != "cpu":
        notes.append(f"roofline: peaks are measured on the CPU only, not on {config.device!r}")
        return None
    progress.note("measuring this host's peaks (roofline)")
    backends = None
    if config.engines:
        backends = {peak_backend(b) for b in config.engines} | ({"torch"} if config.compare_original else set())
    rows = measure_peaks(config.threads, backends=backends)
    notes += [f"roofline: {r['backend']} {r['precision']} {r['kernel']} not measured: {r['skipped']}"
              for r in rows if r.get("skipped") and r["kernel"] == "gemm"]
    return rows


def run_benchmark(models: Sequence[BenchModel], config: BenchConfig, progress: Progress | None = None,
                  notes: list[str] | None = None) -> dict:
    """Benchmark every model; returns the report (``schema``, ``host``, ``settings``, ``roofline``, ``results``,
    ``notes``)."""
    progress = progress or Progress()
    notes = list(notes or [])
    started, host = _dt.datetime.now(_dt.timezone.utc), host_info()  # load average before our own load
    peaks = host_peaks(config, progress, notes)
    records: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="imgembed-bench-") as tmp:
        e2e = any(m in config.modes for m in ("e2e", "pipeline"))
        files = write_sample_files(tmp, config.e2e_megapixels) if e2e else []
        for model in models:
            records += run_model(model, config, files, progress, notes)
    add_peaks(records, peaks)
    return {"schema": SCHEMA, "created": started.isoformat(timespec="seconds"),
            "seconds": round((_dt.datetime.now(_dt.timezone.utc) - started).total_seconds(), 1),
            "host": host, "settings": config.to_dict(), "roofline": peaks,
            "models": [{"name": m.spec.name, "source": m.source, "gflops_per_image": m.spec.gflops,
                        "artifacts": [{"path": str(a.path), "precision": a.precision, "parity_status": a.status}
                                      for a in m.artifacts]} for m in models],
            "results": records, "notes": notes}
