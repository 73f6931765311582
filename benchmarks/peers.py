"""imgembed side by side with its peers: PyTorch eager, OpenVINO (+NNCF INT8) and Hugging Face Optimum (+ORT INT8).

    python benchmarks/peers.py --models clip-vit-b32 vit-b16 dinov2-small resnet50 --threads 2 --batch 8 \
        --out benchmarks/results/peers.json --markdown benchmarks/results/peers.md
    python benchmarks/peers.py --quick            # the tiny test models, short windows: a smoke test

Needs the ``peers`` extra (Optimum) and ``openvino``: ``pip install 'imgembed[peers,openvino,bench]'`` (in ``dev``).

Per model, one random-init checkpoint (seeded, the registry's ``arch``) is written with ``save_pretrained`` and
every tool loads *that* directory, so all contestants run the same weights. The common input is imgembed's
parity set (``imgembed.gate.samples.parity_images``) preprocessed by ``imgembed.preprocess.preprocess_batch``; the
timed batch is its first ``--batch`` images. Timing is model-only (preprocessed float32 NCHW in, embedding out),
every contestant at the same thread count, in interleaved rounds (round-robin, order reversed every other
round, one time window per contestant per round); the reported img/s is the median over the rounds. Parity is
min/mean cosine (``imgembed.gate.parity.compare``) against the PyTorch FP32 original on all parity images.

Contestants (each one that fails is reported with its reason; the run goes on; one this CPU cannot run, BF16
without AVX512_BF16/AMX-BF16, is not planned and the report's ``plan.skipped`` says why):

* ``pytorch-fp32``    the transformers model from the checkpoint (default SDPA attention) wrapped in
                      ``imgembed.models.families.EmbeddingHead``, eager, ``torch.inference_mode``.
* ``imgembed-fp32/int8/bf16``  ``imgembed export NAME --weights CKPT [--int8|--bf16]`` (CLI, default options),
                      loaded with ``imgembed.load(dir, threads=T)``, timed through ``emb.runner.infer``
                      (BF16 only when ``imgembed export --help`` offers ``--bf16`` and the CPU has BF16).
* ``openvino-fp32/bf16/int8``  ``openvino.convert_model(head, example_input=batch)`` compiled on CPU with
                      ``PERFORMANCE_HINT=LATENCY``, ``INFERENCE_NUM_THREADS=T`` and ``INFERENCE_PRECISION_HINT``
                      f32 / bf16 (bf16 only when the CPU has avx512_bf16 or amx_bf16); INT8 is
                      ``nncf.quantize(ov_model, nncf.Dataset(calibration), model_type=TRANSFORMER for ViT-like
                      families, subset_size=16)`` on imgembed's built-in calibration images, compiled with the
                      precision hint left at OpenVINO's default.
* ``optimum-fp32/int8``  ``optimum.exporters.onnx.main_export(CKPT, task="feature-extraction")`` then
                      ``ORTQuantizer`` + ``AutoQuantizationConfig.avx512_vnni(is_static=False,
                      per_channel=False)``, run by an ``onnxruntime.InferenceSession`` (intra-op threads T).
                      The registry's output selection, pooling and L2 normalisation are applied in numpy inside
                      the timed call. Optimum has no vision-only CLIP export *with* projection: for CLIP it
                      exports ``CLIPVisionModel`` (``pooler_output``) and the checkpoint's ``visual_projection``
                      is applied in numpy (a 768x512 matmul) to get ``image_embeds``; for ResNet (only
                      ``last_hidden_state`` exported) ``pooler_output`` is its spatial mean, as ResNetModel's
                      AdaptiveAvgPool2d computes it; for DINOv2 it is the CLS row, as Dinov2Model takes it.

The checkpoint also gets the ``preprocessor_config.json`` a hub checkpoint has (the registry's processor),
because Optimum's DINOv2 export reads its input size from it.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

import numpy as np

FULL_MODELS = ("clip-vit-b32", "vit-b16", "dinov2-small", "resnet50")
QUICK_MODELS = ("test-clip-tiny", "test-vit-tiny", "test-dinov2-tiny", "test-resnet-tiny")
LIBRARIES = ("imgembed", "torch", "onnxruntime", "onnx", "openvino", "nncf", "optimum", "optimum-onnx",
             "transformers", "numpy")
SEED = 0
NNCF_SUBSET = 16
CALIBRATION_ITEM = 2  # images per nncf.Dataset item: 16 items x 2 = imgembed's 32 built-in calibration images
BASELINE, IMGEMBED_INT8 = "pytorch-fp32", "imgembed-int8"
TRACKED_RATIOS = (("imgembed-int8", "openvino-int8"), ("imgembed-int8", "optimum-int8"),
                  ("imgembed-bf16", "imgembed-fp32"))

ORDER = ("pytorch-fp32", "imgembed-fp32", "imgembed-bf16", "imgembed-int8", "openvino-fp32", "openvino-bf16",
         "openvino-int8", "optimum-fp32", "optimum-int8")
Infer = Callable[[np.ndarray], np.ndarray]  # (N, C, H, W) float32 -> (N, dim) float32


@dataclass
class Contestant:
    """One way of running the model: a name, how to call it, and how it was made."""

    key: str
    infer: Infer
    info: dict[str, Any] = field(default_factory=dict)
    close: Callable[[], None] = lambda: None


@dataclass
class Prepared:
    """What every contestant of one model shares: the checkpoint, the inputs, the reference."""

    spec: Any
    weights: Path
    work: Path
    head: Any            # EmbeddingHead over the checkpoint (SDPA attention), the PyTorch original
    pixels: np.ndarray   # all parity images, preprocessed
    batch: np.ndarray    # the timed batch
    reference: np.ndarray


# ---------------------------------------------------------------------------------------------------------
# machine and environment


def cpu_record() -> dict:
    """CPU model, core counts and the SIMD features that decide INT8/BF16 speed (imgembed.runtime.host)."""
    from imgembed.runtime.host import cpu_info

    info = cpu_info()
    return {**{k: info[k] for k in ("model", "arch", "logical_cores", "usable_cores", "flags_source")},
            "flags": info["simd"]}


def versions() -> dict[str, str | None]:
    """imgembed.runtime.host's library versions plus the peers' own packages."""
    from imgembed.runtime.host import library_versions

    out = library_versions()
    for name in LIBRARIES:
        if name not in out:
            try:
                out[name] = metadata.version(name)
            except metadata.PackageNotFoundError:
                out[name] = None
    return out


def imgembed_cli() -> list[str]:
    return [sys.executable, "-c", "import sys; from imgembed.cli import main; main(sys.argv[1:])"]


def imgembed_has_bf16() -> bool:
    """Whether ``imgembed export`` offers ``--bf16`` (another change may add it)."""
    res = subprocess.run([*imgembed_cli(), "export", "--help"], capture_output=True, text=True,
                         env={**os.environ, "COLUMNS": "200", "NO_COLOR": "1"})
    return "--bf16" in res.stdout


def make_plan(imgembed_bf16: bool, no_openvino_bf16: bool = False) -> dict:
    """The contestants this host can run: imgembed's precisions and whether OpenVINO BF16 runs, plus
    ``skipped``: contestant -> why it is not planned (BF16 needs AVX512_BF16 or AMX-BF16,
    ``imgembed.runtime.host.missing_bf16_instructions``; ``ONEDNN_MAX_CPU_ISA`` caps it)."""
    from imgembed.runtime.host import missing_bf16_instructions

    no_bf16 = missing_bf16_instructions()
    skipped = {}
    if not imgembed_bf16:
        skipped["imgembed-bf16"] = "imgembed export offers no --bf16"
    elif no_bf16:
        skipped["imgembed-bf16"] = no_bf16
    if no_openvino_bf16:
        skipped["openvino-bf16"] = "--no-openvino-bf16"
    elif no_bf16:
        skipped["openvino-bf16"] = no_bf16
    return {"imgembed_precisions": ["fp32", "int8"] + ([] if "imgembed-bf16" in skipped else ["bf16"]),
            "openvino_bf16": "openvino-bf16" not in skipped, "skipped": skipped}


# ---------------------------------------------------------------------------------------------------------
# the shared checkpoint and inputs


def prepare(name: str, work: Path, batch: int) -> Prepared:
    """Write the seeded random-init checkpoint, preprocess the parity images, compute the reference."""
    import torch

    from imgembed.gate.samples import parity_images
    from imgembed.models.families import load_original
    from imgembed.models.registry import get_spec
    from imgembed.preprocess import preprocess_batch

    spec = get_spec(name)
    weights = work / "checkpoint"
    load_original(spec, random_init=True, seed=SEED).model.save_pretrained(str(weights))
    save_preprocessor(spec, weights)
    head = load_original(spec, weights=weights, attn="sdpa")
    pixels = preprocess_batch([img for _, img in parity_images()], spec.preprocess)
    reps = math.ceil(batch / len(pixels))
    timed = np.ascontiguousarray(np.concatenate([pixels] * reps)[:batch])
    with torch.inference_mode():
        reference = run_padded(lambda x: head(torch.from_numpy(x)).numpy(), pixels, batch)
    return Prepared(spec, weights, work, head, pixels, timed, reference)


def save_preprocessor(spec: Any, weights: Path) -> None:
    """``preprocessor_config.json`` as a hub checkpoint has it (Optimum reads the input size from it)."""
    import transformers

    pre = spec.preprocess
    getattr(transformers, pre.processor)(**pre.hf_kwargs()).save_pretrained(str(weights))


def run_padded(infer: Infer, pixels: np.ndarray, batch: int) -> np.ndarray:
    """Embed ``pixels`` in batches of exactly ``batch`` (the last one padded, its padding dropped)."""
    out = []
    for i in range(0, len(pixels), batch):
        chunk = pixels[i:i + batch]
        n = len(chunk)
        if n < batch:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch - n, axis=0)])
        out.append(np.asarray(infer(np.ascontiguousarray(chunk)), dtype=np.float32)[:n])
    return np.concatenate(out)


def calibration_items(spec: Any) -> list[np.ndarray]:
    """imgembed's built-in calibration images (the set its own static INT8 uses), preprocessed, in items of
    ``CALIBRATION_ITEM`` images."""
    from imgembed.gate.samples import calibration_images
    from imgembed.preprocess import preprocess_batch

    pixels = preprocess_batch(list(calibration_images()), spec.preprocess)
    return [np.ascontiguousarray(pixels[i:i + CALIBRATION_ITEM]) for i in range(0, len(pixels), CALIBRATION_ITEM)]


def postprocess(outputs: dict[str, np.ndarray], spec: Any, projection: np.ndarray | None) -> np.ndarray:
    """The registry's embedding from raw model outputs (mirrors ``EmbeddingHead.forward``) in numpy."""
    emb = spec.embedding
    if emb.output in outputs:
        x = outputs[emb.output]
    elif emb.output == "image_embeds" and projection is not None:
        x = outputs["pooler_output"] @ projection.T
    elif emb.output == "pooler_output" and spec.family == "resnet":  # ResNetModel's AdaptiveAvgPool2d(1)
        x = outputs["last_hidden_state"].mean(axis=(2, 3), keepdims=True)
    elif emb.output == "pooler_output" and spec.family == "dinov2":  # Dinov2Model: the CLS token after layernorm
        x = outputs["last_hidden_state"][:, 0]
    else:
        raise KeyError(f"output {emb.output!r} not among {sorted(outputs)}")
    if emb.pooling == "cls":
        x = x[:, 0]
    elif emb.pooling == "mean":
        x = x[:, 1:].mean(axis=1)
    elif emb.pooling == "gap":
        x = x.mean(axis=(2, 3))
    x = x.reshape(x.shape[0], -1)
    if emb.normalize:
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return x.astype(np.float32, copy=False)


# ---------------------------------------------------------------------------------------------------------
# contestants


def pytorch_fp32(p: Prepared, threads: int) -> list[Contestant]:
    import torch

    torch.set_num_threads(threads)

    def infer(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return p.head(torch.from_numpy(x)).numpy()

    attn = getattr(p.head.model.config, "_attn_implementation", None)
    return [Contestant(BASELINE, infer, {"what": "transformers model + EmbeddingHead, eager, inference_mode",
                                         "attention": attn, "torch_threads": torch.get_num_threads()})]


class ImgembedExport:
    """``imgembed export NAME --weights CKPT [--int8|--bf16]`` in a subprocess: started, later waited for."""

    def __init__(self, p: Prepared, precision: str, threads: int, speed_check: bool = True):
        self.precision, self.out = precision, p.work / f"imgembed-{precision}"
        self.log = p.work / f"imgembed-{precision}.log"
        flags = {"fp32": [], "int8": ["--int8"], "bf16": ["--bf16"]}[precision]
        self.cmd = [*imgembed_cli(), "export", p.spec.name, "--weights", str(p.weights), "--out", str(self.out),
                    "--threads", str(threads), *flags, *([] if speed_check else ["--no-speed-check"])]
        self.what = " ".join(["imgembed", *self.cmd[self.cmd.index("export"):]]).replace(
            str(p.weights), "CKPT").replace(str(self.out), "OUT")
        self.proc: subprocess.Popen | None = None
        self.seconds = 0.0

    def start(self) -> "ImgembedExport":
        if self.proc is None:
            self.t0 = time.perf_counter()
            with open(self.log, "wb") as log:
                self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT,
                                             env={**os.environ, "COLUMNS": "200", "NO_COLOR": "1"})
        return self

    def wait(self) -> Path:
        rc = self.start().proc.wait()
        self.seconds = self.seconds or time.perf_counter() - self.t0
        if rc != 0:
            tail = self.log.read_text(errors="replace").strip().splitlines()[-8:]
            raise RuntimeError(f"imgembed export --{self.precision} exited {rc}: " + " | ".join(tail))
        return self.out


def imgembed_artifact(export: ImgembedExport, threads: int) -> list[Contestant]:
    import imgembed
    from imgembed.artifact import read_manifest

    path = export.wait()
    emb = imgembed.load(path, threads=threads)
    emb.runner.activate()
    manifest = read_manifest(path).model_dump(mode="json", by_alias=True)
    precision = export.precision
    export_record = {k: v for k, v in manifest.get("export", {}).items() if k not in ("op_counts", "fused_ops")}
    info = {"what": export.what, "backend": emb.runner.backend, "runner": emb.runner.describe(),
            "export_seconds": round(export.seconds, 1), "manifest_precision": manifest.get("precision"),
            "artifact_parity": manifest.get("parity", {}).get("metrics"), "manifest_export": export_record}
    return [Contestant(f"imgembed-{precision}", emb.runner.infer, info, emb.close)]


def _ov_compile(model: Any, threads: int, precision: str | None) -> Any:
    import openvino as ov

    config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads}
    if precision is not None:
        config["INFERENCE_PRECISION_HINT"] = precision
    return ov.Core().compile_model(model, "CPU", config)


def _ov_contestant(key: str, compiled: Any, info: dict) -> Contestant:
    out = compiled.output(0)
    request = compiled.create_infer_request()
    precision = compiled.get_property("INFERENCE_PRECISION_HINT")
    info = {**info, "inference_precision": getattr(precision, "to_string", lambda: str(precision))(),
            "threads": compiled.get_property("INFERENCE_NUM_THREADS")}
    return Contestant(key, lambda x: request.infer([x])[out].copy(), info)


def openvino_all(p: Prepared, threads: int, bf16: bool) -> list[Contestant | tuple[str, str]]:
    """OpenVINO FP32, BF16 (if the CPU has it) and NNCF INT8; a failed step is a (key, reason) pair."""
    import openvino as ov
    import torch

    from imgembed.models.families import family_of

    ov_model = ov.convert_model(p.head, example_input=torch.from_numpy(p.batch))
    base = {"what": "openvino.convert_model(EmbeddingHead, example_input=batch)"}
    out: list[Contestant | tuple[str, str]] = [
        _ov_contestant("openvino-fp32", _ov_compile(ov_model, threads, "f32"), {**base, "hint": "f32"})]
    if bf16:
        out.append(_ov_contestant("openvino-bf16", _ov_compile(ov_model, threads, "bf16"), {**base, "hint": "bf16"}))
    try:
        out.append(_openvino_int8(p, ov_model, threads, family_of(p.spec).is_transformer, base))
    except Exception as e:  # a peer failing is a result, not a crash
        out.append(("openvino-int8", _reason(e)))
    return out


def _openvino_int8(p: Prepared, ov_model: Any, threads: int, transformer: bool, base: dict) -> Contestant:
    """NNCF INT8 with OpenVINO's default precision hint; on a CPU without BF16 that default is f32, set
    explicitly because OpenVINO reads BF16 support from CPUID and would pick bf16 under ``ONEDNN_MAX_CPU_ISA``."""
    import nncf

    from imgembed.runtime.host import missing_bf16_instructions

    bf16 = missing_bf16_instructions() is None

    kw = {"model_type": nncf.ModelType.TRANSFORMER} if transformer else {}
    t0 = time.perf_counter()
    q = nncf.quantize(ov_model, nncf.Dataset(calibration_items(p.spec)), subset_size=NNCF_SUBSET, **kw)
    info = {**base, "quantize": f"nncf.quantize(subset_size={NNCF_SUBSET}"
            + (", model_type=TRANSFORMER)" if transformer else ")"),
            "calibration": f"imgembed built-in calibration set, items of {CALIBRATION_ITEM} images",
            "quantize_seconds": round(time.perf_counter() - t0, 1),
            "hint": "OpenVINO default" if bf16 else "f32 (OpenVINO's default on a CPU without BF16)"}
    return _ov_contestant("openvino-int8", _ov_compile(q, threads, None if bf16 else "f32"), info)


def _ort_session(path: Path, threads: int) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def _optimum_contestant(key: str, path: Path, p: Prepared, threads: int, projection: np.ndarray | None,
                        info: dict) -> Contestant:
    session = _ort_session(path, threads)
    names = [o.name for o in session.get_outputs()]

    def infer(x: np.ndarray) -> np.ndarray:
        return postprocess(dict(zip(names, session.run(None, {"pixel_values": x}), strict=True)), p.spec, projection)

    return Contestant(key, infer, {**info, "onnx": path.name, "outputs": names})


def optimum_all(p: Prepared, threads: int) -> list[Contestant | tuple[str, str]]:
    """Optimum ONNX export (feature-extraction) in FP32 and its dynamic avx512_vnni INT8 quantization."""
    from optimum.exporters.onnx import main_export

    fp32_dir, int8_dir = p.work / "optimum-fp32", p.work / "optimum-int8"
    main_export(str(p.weights), output=str(fp32_dir), task="feature-extraction", device="cpu", do_validation=False)
    model_type = json.loads((fp32_dir / "config.json").read_text())["model_type"]
    projection = None
    note = f"main_export(task='feature-extraction') of model_type {model_type!r}; {p.spec.embedding.output}"
    if p.spec.family == "clip":
        projection = p.head.model.visual_projection.weight.detach().numpy().copy()
        note += " = pooler_output @ visual_projection.T (numpy, from the checkpoint)"
    elif p.spec.family == "resnet":
        note += " = mean of last_hidden_state over H, W (numpy; Optimum exports no pooler_output for ResNet)"
    elif p.spec.family == "dinov2":
        note += " = last_hidden_state[:, 0] (numpy; Optimum exports no pooler_output for DINOv2)"
    note += f", pooling {p.spec.embedding.pooling!r}, normalize {p.spec.embedding.normalize} in numpy"
    out: list[Contestant | tuple[str, str]] = [
        _optimum_contestant("optimum-fp32", fp32_dir / "model.onnx", p, threads, projection, {"what": note})]
    try:
        from optimum.onnxruntime import ORTQuantizer
        from optimum.onnxruntime.configuration import AutoQuantizationConfig

        qconfig = AutoQuantizationConfig.avx512_vnni(is_static=False, per_channel=False)
        ORTQuantizer.from_pretrained(str(fp32_dir)).quantize(save_dir=str(int8_dir), quantization_config=qconfig)
        path = next(int8_dir.glob("*quantized*.onnx"))
        info = {"what": note, "quantize": "ORTQuantizer + AutoQuantizationConfig.avx512_vnni(is_static=False, "
                "per_channel=False)"}
        out.append(_optimum_contestant("optimum-int8", path, p, threads, projection, info))
    except Exception as e:
        out.append(("optimum-int8", _reason(e)))
    return out


def _reason(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0][:400] if msg else ''}".strip()


def build_contestants(p: Prepared, threads: int, plan: dict, quick: bool) -> tuple[list[Contestant], dict[str, str]]:
    """Every contestant that could be built (in report order); the others as key -> reason.

    ``quick`` (a smoke test) runs the imgembed exports in the background while the peers are built, with
    ``--no-speed-check`` (the first engine that passes the gate wins); otherwise they run one at a time with
    imgembed's defaults, so that its engine race sees a quiet machine.
    """
    exports = [ImgembedExport(p, precision, threads, speed_check=not quick)
               for precision in plan["imgembed_precisions"]]
    if quick:
        for e in exports:
            e.start()
    ov_keys = ["openvino-fp32"] + (["openvino-bf16"] if plan["openvino_bf16"] else []) + ["openvino-int8"]
    steps: list[tuple[list[str], Callable[[], list]]] = [
        ([BASELINE], lambda: pytorch_fp32(p, threads)),
        (ov_keys, lambda: openvino_all(p, threads, plan["openvino_bf16"])),
        (["optimum-fp32", "optimum-int8"], lambda: optimum_all(p, threads))]
    for e in exports:
        steps.append(([f"imgembed-{e.precision}"], lambda e=e: imgembed_artifact(e, threads)))
    built, failed = [], {}
    for keys, step in steps:
        print(f"  building {', '.join(keys)}...", flush=True)
        try:
            items = step()
        except Exception as e:
            failed.update({k: _reason(e) for k in keys})
            print(f"    FAILED: {_reason(e)}", flush=True)
            if os.environ.get("PEERS_TRACEBACK"):
                traceback.print_exc()
            continue
        for item in items:
            if isinstance(item, Contestant):
                built.append(item)
            else:
                failed[item[0]] = item[1]
                print(f"    {item[0]} FAILED: {item[1]}", flush=True)
    built.sort(key=lambda c: (ORDER.index(c.key) if c.key in ORDER else len(ORDER), c.key))
    return built, failed


# ---------------------------------------------------------------------------------------------------------
# measurement


def parity(c: Contestant, p: Prepared, batch: int) -> dict:
    from imgembed.gate.parity import compare

    m = compare(p.reference, run_padded(c.infer, p.pixels, batch))
    return {"min_cosine": m["min_cosine"], "mean_cosine": m["mean_cosine"], "max_abs": m["max_abs"]}


def measure(contestants: list[Contestant], batch: np.ndarray, rounds: int, window: float,
            warmup: int) -> dict[str, dict]:
    """Interleaved rounds: every round gives each contestant one ``window``-second slice (at least one call),
    forward order on even rounds and reverse on odd ones; img/s is the median over rounds."""
    from imgembed.bench.measure import MeasureSettings, Trial

    settings = MeasureSettings(warmup=warmup, window_seconds=window, max_seconds=window * rounds,
                               stability_windows=min(3, rounds))
    n = len(batch)

    def batch_fn(c: Contestant) -> Callable[[], int]:
        return lambda: (c.infer(batch), n)[1]

    trials = [Trial(c.key, batch_fn(c), time.perf_counter) for c in contestants]
    for _ in range(warmup):
        for t in trials:
            t.call()
            t.warmup_calls += 1
    for r in range(rounds):
        for t in (trials if r % 2 == 0 else trials[::-1]):
            t.run_window(window)
    out = {}
    for t in trials:
        per_round = [w.throughput for w in t.windows]
        out[t.key] = {"img_per_s": float(np.median(per_round)), "round_img_per_s": [round(x, 3) for x in per_round],
                      "detail": t.result(settings).to_dict()}
    return out


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or not (a > 0 and b > 0):
        return None
    return a / b


def paired_ratio(results: dict, a: str, b: str) -> float | None:
    """Median over rounds of a's throughput / b's in the same round: robust to load that changes between
    rounds (both sides of a pair ran back to back)."""
    ra, rb = (results.get(k, {}).get("round_img_per_s") for k in (a, b))
    if not ra or not rb:
        return None
    return float(np.median([x / y for x, y in zip(ra, rb, strict=True)]))


def bench_model(name: str, args: argparse.Namespace, plan: dict) -> dict:
    print(f"{name}: preparing checkpoint and inputs", flush=True)
    with tempfile.TemporaryDirectory(prefix=f"imgembed-peers-{name}-") as tmp:
        p = prepare(name, Path(tmp), args.batch)
        contestants, failed = build_contestants(p, args.threads, plan, args.quick)
        results: dict[str, dict] = {}
        for c in list(contestants):
            try:
                results[c.key] = {"status": "ok", "parity": parity(c, p, args.batch), "info": c.info}
            except Exception as e:
                failed[c.key] = f"parity run failed: {_reason(e)}"
                contestants.remove(c)
        print(f"{name}: timing {len(contestants)} contestants, {args.rounds} interleaved rounds", flush=True)
        timings = measure(contestants, p.batch, args.rounds, args.window, args.warmup)
        for c in contestants:
            results[c.key].update(timings[c.key])
            c.close()
    for key, reason in failed.items():
        results[key] = {"status": "failed", "reason": reason}
    results = dict(sorted(results.items(), key=lambda kv: (ORDER.index(kv[0]) if kv[0] in ORDER else len(ORDER))))
    ips = {k: v.get("img_per_s") for k, v in results.items()}
    for v in results.values():
        v["ratio_vs_pytorch_fp32"] = ratio(v.get("img_per_s"), ips.get(BASELINE))
        v["ratio_vs_imgembed_int8"] = ratio(v.get("img_per_s"), ips.get(IMGEMBED_INT8))
    tracked = {f"{a} / {b}": {"of_medians": ratio(ips.get(a), ips.get(b)), "paired": paired_ratio(results, a, b)}
               for a, b in TRACKED_RATIOS}
    return {"model": name, "family": p.spec.family, "input_hw": list(p.spec.input_hw),
            "parity_images": int(len(p.pixels)), "contestants": results, "tracked_ratios": tracked}


# ---------------------------------------------------------------------------------------------------------
# output


def _fmt(x: float | None, spec: str) -> str:
    return "–" if x is None else format(x, spec)


def markdown(report: dict) -> str:
    cpu = report["cpu"]
    flags = ", ".join(f for f, on in cpu["flags"].items() if on) or "none"
    lines = [f"# imgembed vs peers (model-only, batch {report['batch']}, {report['threads']} threads, "
             f"median of {report['rounds']} interleaved rounds)", "",
             f"CPU: {cpu['model']} ({cpu['usable_cores']} usable cores); flags: {flags}.  ",
             "Versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items() if v) + ".  ",
             f"Load average (1/5/15 min) at start {report['load_average']}, at end {report.get('load_average_end')}; "
             "imgembed rows name the engine its artifact loaded with.", "",
             "| model | contestant | img/s | ratio vs PyTorch FP32 | ratio vs imgembed INT8 | min cos | mean cos |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for m in report["models"]:
        for key, r in m["contestants"].items():
            if r["status"] != "ok":
                lines.append(f"| {m['model']} | {key} | failed | – | – | – | – |")
                continue
            name = f"{key} ({r['info']['backend']})" if r["info"].get("backend") else key
            lines.append(f"| {m['model']} | {name} | {r['img_per_s']:.2f} | {_fmt(r['ratio_vs_pytorch_fp32'], '.2f')} "
                         f"| {_fmt(r['ratio_vs_imgembed_int8'], '.2f')} | {r['parity']['min_cosine']:.5f} "
                         f"| {r['parity']['mean_cosine']:.5f} |")
    lines += ["", "Tracked ratios (throughput; paired = median over rounds of the same-round ratio):", "",
              "| model | ratio | of medians | paired |", "|---|---|---:|---:|"]
    for m in report["models"]:
        for k, v in m["tracked_ratios"].items():
            lines.append(f"| {m['model']} | {k} | {_fmt(v['of_medians'], '.2f')} | {_fmt(v['paired'], '.2f')} |")
    for name, why in report.get("failed_models", {}).items():
        lines.append(f"\nModel {name} failed before any contestant ran: {why}")
    if report["plan"]["skipped"]:
        lines += ["", "Skipped contestants (not planned on this host):", ""]
        lines += [f"- {k}: {why}" for k, why in report["plan"]["skipped"].items()]
    failures = [(m["model"], k, r["reason"]) for m in report["models"] for k, r in m["contestants"].items()
                if r["status"] != "ok"]
    if failures:
        lines += ["", "Failed contestants:", ""] + [f"- {m} {k}: {why}" for m, k, why in failures]
    lines += ["", "Contestants: see the docstring of benchmarks/peers.py and each record's `info` in the JSON."]
    return "\n".join(lines) + "\n"


def _jsonable(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    return x


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=None, help=f"registry names (default: {' '.join(FULL_MODELS)}; "
                    f"with --quick: {' '.join(QUICK_MODELS)})")
    ap.add_argument("--quick", action="store_true", help="tiny test models, short windows (a smoke test)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 7; --quick 3)")
    ap.add_argument("--window", type=float, default=None,
                    help="seconds per contestant per round (default 2; --quick 0.2)")
    ap.add_argument("--warmup", type=int, default=2, help="calls per contestant before timing")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/peers.json"))
    ap.add_argument("--markdown", type=Path, default=None)
    ap.add_argument("--no-openvino-bf16", action="store_true", help="skip OpenVINO BF16 even if the CPU has it")
    args = ap.parse_args(argv)
    args.models = args.models or list(QUICK_MODELS if args.quick else FULL_MODELS)
    args.rounds = args.rounds or (3 if args.quick else 7)
    args.window = args.window or (0.2 if args.quick else 2.0)
    if args.threads < 1 or args.batch < 1 or args.rounds < 1 or args.window <= 0:
        ap.error("--threads, --batch, --rounds must be >= 1 and --window > 0")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    from imgembed.artifact import write_bytes_atomic, write_json_atomic
    from imgembed.models.registry import get_spec

    for name in args.models:
        get_spec(name)  # unknown names fail before any work
    cpu = cpu_record()
    plan = make_plan(imgembed_has_bf16(), args.no_openvino_bf16)
    print(f"plan: {plan}; cpu: {cpu['model']}", flush=True)
    report = {"benchmark": "peers", "mode": "model-only", "quick": args.quick, "threads": args.threads,
              "batch": args.batch, "rounds": args.rounds, "window_seconds": args.window, "warmup_calls": args.warmup,
              "seed": SEED, "cpu": cpu, "versions": versions(), "plan": plan,
              "load_average": [round(x, 2) for x in os.getloadavg()], "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "models": []}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for name in args.models:
        try:
            report["models"].append(bench_model(name, args, plan))
        except Exception as e:  # the checkpoint or the reference could not be built: no contestant can run
            report.setdefault("failed_models", {})[name] = _reason(e)
            print(f"{name}: FAILED {_reason(e)}", flush=True)
        write_json_atomic(args.out, _jsonable(report))  # partial results survive a later crash
    report["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    write_json_atomic(args.out, _jsonable(report))
    text = markdown(report)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(args.markdown, text.encode())
    print(text)
    return report


if __name__ == "__main__":
    main()
