"""The engine race of an export: build every candidate the installed engines offer, gate each, time the
passing ones side by side on this machine, keep the fastest as the artifact's default engine.

A :class:`Candidate` is one way to run the model at the requested precision: ONNX Runtime with a graph
(FP32/FP16, or INT8 with a quantization preset), or OpenVINO with an IR (FP32, BF16 as an inference hint,
INT8 through NNCF, optionally with BF16 for the float remainder). Every candidate passes the same parity gate
at batch sizes 1, 3 and 8; candidates that claim batch invariance (static activation scales) are also gated on
``batch_variation``. Passing candidates are timed in interleaved rounds (same threads, same batch), so the
ratios hold even on a busy machine. Candidates that cannot be built here (OpenVINO not installed, no BF16
instructions) are listed with the reason and never silently dropped.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..artifact import Engine
from ..errors import BackendUnavailableError, ExportError, ImgembedError
from ..parity import ParityReport, gate_thresholds, parity_report
from ..registry import ModelSpec
from ..runtime.backends import EngineRef, get_backend
from ..runtime.host import int8_kernels
from ..runtime.timing import interleaved_medians
from .onnx_export import DEFAULT_OPSET
from .quantize import PORTABLE_PRESETS, PRESETS, QuantConfig, quantize, quantized_op_counts, saturates
from .reference import ParitySet

SPEED_BATCH = 8
TIE = 0.03  # speeds closer than this are a tie (the portable engine wins it: choose)
Step = Callable[[str], None]
LAST_RESORT = "*"  # fallback_for of a candidate built only when no candidate before it passed


@dataclass
class Inputs:
    """What candidates are built from: the exported graphs, the parity set, calibration data (lazy)."""

    spec: ModelSpec
    work: Path
    plain: Path                     # the exported ONNX graph (no com.microsoft ops)
    ort_graph: Path                 # the graph ONNX Runtime runs in float (fused when optimized)
    input_format: str               # "float32" | "uint8"
    parity: ParitySet
    calibration: Callable[[], tuple[list[np.ndarray], list[np.ndarray], dict]]  # () -> (pixels, crops, info)
    threads: int | None
    transformer: bool
    built: dict = field(default_factory=dict)   # files shared between candidates, by builder
    _uint8_plain: Path | None = None
    head: object | None = None      # the original after export surgery (candidates that re-export it)
    opset: int = DEFAULT_OPSET
    input_name: str = "pixel_values"  # the graph's input ("input_ids" for a text tower)

    def plain_in_format(self) -> Path:
        """The plain graph with the artifact's input (uint8 prefix added when asked)."""
        if self.input_format != "uint8":
            return self.plain
        if self._uint8_plain is None:
            from .uint8_input import add_uint8_input

            self._uint8_plain = add_uint8_input(self.plain, self.work / "plain-uint8.onnx", self.spec.preprocess)
        return self._uint8_plain


@dataclass
class Candidate:
    """One engine to try. ``build(inputs, directory)`` writes its files and returns (files, record)."""

    id: str
    backend: str
    precision: str
    build: Callable[[Inputs, Path], tuple[dict[str, Path], dict]]
    batch_invariant: bool
    inference_precision: str = "fp32"
    unavailable: str | None = None   # why it cannot be built here
    portable: bool = False           # runs as gated on every CPU: kept as the fallback when another engine wins
    fallback_for: str | None = None  # built only when this candidate (same graph structure) failed its gate
    needs_vnni: bool = False         # gated with exact int8 dot products; 8-bit sums saturate on x86 without VNNI


@dataclass
class Outcome:
    """What happened to one candidate."""

    candidate: Candidate
    files: dict[str, Path] = field(default_factory=dict)
    record: dict = field(default_factory=dict)
    report: ParityReport | None = None
    error: str | None = None
    seconds: float | None = None

    @property
    def passed(self) -> bool:
        return self.report is not None and self.report.passed

    @property
    def img_per_s(self) -> float | None:
        return None if not self.seconds else SPEED_BATCH / self.seconds

    def row(self) -> dict:
        """The candidate's line of the export table (manifest ``selection.candidates``)."""
        c = self.candidate
        failures = [] if self.report is None else self.report.failures
        why = self.error or c.unavailable or (None if self.passed else "; ".join(failures))
        return {"id": c.id, "backend": c.backend, "precision": c.precision,
                "inference_precision": c.inference_precision, "batch_invariant": c.batch_invariant,
                "portable": c.portable, "needs_vnni": c.needs_vnni, "passed": self.passed, "why_not": why,
                "metrics": None if self.report is None else self.report.metrics,
                "img_per_s": None if self.img_per_s is None else round(self.img_per_s, 2)}


# ------------------------------------------------------------------------------------------ builders
def _batches(a: np.ndarray, size: int = 8) -> list[np.ndarray]:
    """Calibration data in the batches the quantizers read."""
    return [a[i:i + size] for i in range(0, len(a), size)]


def _ort_float(inputs: Inputs, directory: Path) -> tuple[dict[str, Path], dict]:
    path = _with_input_format(inputs, inputs.ort_graph, directory / "model.onnx")
    return {"model": path}, {}


def _ort_fp16(inputs: Inputs, directory: Path) -> tuple[dict[str, Path], dict]:
    from .onnx_export import convert_fp16

    directory.mkdir(parents=True, exist_ok=True)
    path = convert_fp16(inputs.ort_graph, directory / "fp16.onnx")
    return {"model": _with_input_format(inputs, path, directory / "model.onnx")}, {"fp16": "onnxruntime float16 "
                                                                                   "converter, norms in fp32"}


def _ort_int8(config: QuantConfig) -> Callable[[Inputs, Path], tuple[dict[str, Path], dict]]:
    def build(inputs: Inputs, directory: Path) -> tuple[dict[str, Path], dict]:
        directory.mkdir(parents=True, exist_ok=True)
        pixels, _, info = inputs.calibration() if config.mode == "static" else (None, None, None)
        batches = None if pixels is None else _batches(pixels)
        # static Q/DQ goes on the plain graph (ORT fuses Q/DQ pairs into integer kernels when it loads it;
        # on the fused graph the Attention ops stay float); dynamic presets use the fused graph's QAttention
        graph = inputs.plain if config.mode == "static" else inputs.ort_graph
        q = quantize(graph, directory / "int8.onnx", config, batches, input_name=inputs.input_name)
        path = _with_input_format(inputs, q, directory / "model.onnx")
        return {"model": path}, {"preset": config.to_dict(), "calibration": info,
                                 "quantized_ops": quantized_op_counts(q)}
    return build


def _ort_int8_smoothquant(preset: str) -> Callable[[Inputs, Path], tuple[dict[str, Path], dict]]:
    """Static Q/DQ on a graph exported from a SmoothQuant-ed copy of the original (alpha searched on the
    calibration images), with the most sensitive MatMuls kept float if still needed (:mod:`.int8_search`).
    The search runs once per export: the other weight width re-quantizes its smoothed graph with the same
    float MatMuls."""
    config = PRESETS[preset]

    def build(inputs: Inputs, directory: Path) -> tuple[dict[str, Path], dict]:
        from .int8_search import smoothquant_int8

        if inputs.head is None:
            raise ExportError("the smoothquant candidate needs the PyTorch original (Inputs.head)")
        pixels, _, info = inputs.calibration()
        if "smoothquant" in inputs.built:
            smoothed, recipe = inputs.built["smoothquant"]
            directory.mkdir(parents=True, exist_ok=True)
            q = quantize(smoothed, directory / "int8.onnx", config, _batches(pixels), exclude=recipe["excluded_nodes"])
        else:
            q, smoothed, recipe = smoothquant_int8(inputs.head, inputs.spec, pixels, directory, config, inputs.opset,
                                                   inputs.spec.thresholds("int8"), threads=inputs.threads)
            inputs.built["smoothquant"] = smoothed, recipe
        path = _with_input_format(inputs, q, directory / "model.onnx")
        return {"model": path}, {"preset": config.to_dict(), "calibration": info, "smoothquant": recipe,
                                 "quantized_ops": quantized_op_counts(q)}
    return build


def _with_input_format(inputs: Inputs, src: Path, dst: Path) -> Path:
    """``src`` as the artifact's input format: copied for float32, prefixed with the uint8 input otherwise."""
    import shutil

    dst.parent.mkdir(parents=True, exist_ok=True)
    if inputs.input_format == "uint8":
        from .uint8_input import add_uint8_input

        return add_uint8_input(src, dst, inputs.spec.preprocess)
    if Path(src) != dst:
        shutil.copyfile(src, dst)
    return dst


def _ov_float(inputs: Inputs, directory: Path) -> tuple[dict[str, Path], dict]:
    from .openvino import convert_onnx, ir_files

    directory.mkdir(parents=True, exist_ok=True)
    return ir_files(convert_onnx(inputs.plain_in_format(), directory / "model.xml")), {}


def _cle_graph(inputs: Inputs) -> tuple[Path, dict]:
    """The plain graph after cross-layer equalization (:mod:`.equalize`), built once per export; an ExportError
    when the graph has no chain to equalize (the candidate would repeat its plain recipe)."""
    if "cle" not in inputs.built:
        from .equalize import equalize

        path = inputs.work / "cle.onnx"
        inputs.built["cle"] = path, equalize(inputs.plain, path)
    path, record = inputs.built["cle"]
    if not record["pairs"]:
        raise ExportError("cross-layer equalization does not apply: no Conv -> Relu -> Conv chain whose "
                          "activation is positively homogeneous (ReLU6/Clip, Sigmoid and shared tensors block it)")
    return path, record


def _ort_int8_cle(preset: str) -> Callable[[Inputs, Path], tuple[dict[str, Path], dict]]:
    """Static QOperator INT8 (QLinearConv with the ReLU folded into its output range, per-channel weights) on
    the cross-layer-equalized graph, for CNNs whose channel ranges defeat the plain presets."""
    config = PRESETS[preset]

    def build(inputs: Inputs, directory: Path) -> tuple[dict[str, Path], dict]:
        directory.mkdir(parents=True, exist_ok=True)
        graph, equalization = _cle_graph(inputs)
        pixels, _, info = inputs.calibration()
        q = quantize(graph, directory / "int8.onnx", config, _batches(pixels), input_name=inputs.input_name)
        path = _with_input_format(inputs, q, directory / "model.onnx")
        return {"model": path}, {"preset": config.to_dict(), "calibration": info, "equalization": equalization,
                                 "quantized_ops": quantized_op_counts(q)}
    return build


def _ort_int8_mixed(preset: str) -> Callable[[Inputs, Path], tuple[dict[str, Path], dict]]:
    """Static INT8 with the most sensitive layers kept in float, the fewest that meet the gate on the calibration
    images (:mod:`.mixed_precision`); the last resort when no full-INT8 candidate passes."""
    config = PRESETS[preset]

    def build(inputs: Inputs, directory: Path) -> tuple[dict[str, Path], dict]:
        from .int8_search import _embed
        from .mixed_precision import mixed_int8

        pixels, _, info = inputs.calibration()
        batches = _batches(pixels)
        reference = _embed(inputs.plain, batches, inputs.threads)
        q, recipe = mixed_int8(inputs.plain, directory / "search", config, batches, reference,
                               inputs.spec.thresholds("int8"), threads=inputs.threads)
        path = _with_input_format(inputs, q, directory / "model.onnx")
        return {"model": path}, {"preset": config.to_dict(), "calibration": info, "mixed_precision": recipe,
                                 "quantized_ops": quantized_op_counts(q)}
    return build


def _ov_int8(smooth_quant: bool, equalized: bool = False) -> Callable[[Inputs, Path], tuple[dict[str, Path], dict]]:
    """NNCF INT8 IR (SmoothQuant on or off; on the cross-layer-equalized graph when ``equalized``); built
    once per export and shared by the candidates that differ only in their inference hint."""
    key = f"openvino-int8{'-smoothquant' if smooth_quant else ''}{'-cle' if equalized else ''}"

    def build(inputs: Inputs, directory: Path) -> tuple[dict[str, Path], dict]:
        from .openvino import convert_onnx, ir_files, quantize_nncf

        if key in inputs.built:
            files, record = inputs.built[key]
            return files, dict(record)
        directory.mkdir(parents=True, exist_ok=True)
        pixels, crops, info = inputs.calibration()
        data = crops if inputs.input_format == "uint8" else pixels
        extra: dict = {}
        if equalized:
            graph, extra["equalization"] = _cle_graph(inputs)
            graph = _with_input_format(inputs, graph, directory / "cle.onnx")
        else:
            graph = inputs.plain_in_format()
        fp32 = convert_onnx(graph, directory / "fp32.xml")
        record = quantize_nncf(fp32, directory / "model.xml", _batches(data), transformer=inputs.transformer,
                               smooth_quant=smooth_quant, overflow_fix=int8_kernels("openvino") == "saturating")
        for p in [*ir_files(fp32).values(), *([graph] if equalized else [])]:
            p.unlink()
        inputs.built[key] = ir_files(directory / "model.xml"), {**record, **extra, "calibration": info}
        return ir_files(directory / "model.xml"), {**record, **extra, "calibration": info}
    return build


# ------------------------------------------------------------------------------------------ candidates
def _openvino_reason() -> str | None:
    return get_backend("openvino").unavailable("cpu")


def _bf16_reason() -> str | None:
    from ..runtime.host import missing_bf16_instructions

    return _openvino_reason() or missing_bf16_instructions()


def _ort_int8_candidate(config: QuantConfig, vnni: bool, **kw) -> Candidate:
    """An ONNX Runtime INT8 candidate; an 8-bit one gated with VNNI kernels is not portable (it would saturate
    on x86 CPUs without VNNI), one with 7-bit weights or gated on saturating kernels is."""
    vnni_only = vnni and saturates(config)
    return Candidate(f"onnxruntime-int8-{config.name}", "onnxruntime", "int8", _ort_int8(config),
                     config.mode == "static", portable=not vnni_only, needs_vnni=vnni_only, **kw)


def int8_presets(spec_is_transformer: bool, forced: str | None) -> list[QuantConfig]:
    """The ONNX Runtime INT8 presets to try: the forced one, or the batch-invariant (static) defaults."""
    from .quantize import CNN_CANDIDATES, TRANSFORMER_CANDIDATES

    if forced:
        if forced not in PRESETS:
            raise ExportError(f"unknown INT8 preset {forced!r}; expected one of {sorted(PRESETS)}")
        return [PRESETS[forced]]
    return [PRESETS[n] for n in (TRANSFORMER_CANDIDATES if spec_is_transformer else CNN_CANDIDATES)]


def plan(precision: str, *, transformer: bool, int8_preset: str | None = None,
         engine: str | None = None, reexport: bool = True) -> list[Candidate]:
    """Every candidate for ``precision``, ONNX Runtime first; ``engine`` keeps one backend only.
    ``reexport=False``: no candidate that re-exports the image original (ONNX Runtime SmoothQuant), for graphs
    that are not an image tower."""
    ov, bf16 = _openvino_reason(), _bf16_reason()
    if precision == "fp32":
        out = [Candidate("onnxruntime-fp32", "onnxruntime", "fp32", _ort_float, True, portable=True),
               Candidate("openvino-fp32", "openvino", "fp32", _ov_float, True, unavailable=ov)]
    elif precision == "bf16":
        # ONNX Runtime has no fast BF16 CPU path: its FP32 graph is the portable fallback of a BF16 artifact
        out = [Candidate("openvino-bf16", "openvino", "bf16", _ov_float, True, "bf16", unavailable=bf16),
               Candidate("onnxruntime-fp32", "onnxruntime", "fp32", _ort_float, True, portable=True)]
    elif precision == "fp16":
        out = [Candidate("onnxruntime-fp16", "onnxruntime", "fp16", _ort_fp16, True, portable=True)]
    elif precision == "int8":
        # On a VNNI CPU the 8-bit candidates are exact here but would saturate on x86 CPUs without VNNI
        # (needs_vnni); the 7-bit twin of the first preset is the portable engine. On a CPU without VNNI every
        # candidate is gated with the saturating kernels themselves (NNCF then keeps weights 7-bit everywhere).
        # (each engine's own kernels: ONEDNN_MAX_CPU_ISA caps OpenVINO's, not ONNX Runtime's)
        vnni, ov_vnni = int8_kernels("onnxruntime") == "vnni", int8_kernels("openvino") == "vnni"
        presets = int8_presets(transformer, int8_preset)
        if int8_preset is None:
            presets.append(PRESETS[PORTABLE_PRESETS[presets[0].name]])
        out = [_ort_int8_candidate(c, vnni) for c in presets]
        # the outlier-aware recipes, each where its plain preset fails the gate (same graph structure and
        # speed); on a VNNI CPU also at 7 bits, behind the portable preset
        recipes = []
        if int8_preset is None and transformer and reexport:  # outlier channels: SmoothQuant
            recipes = [("smoothquant", _ort_int8_smoothquant, "static-qdq-matmul")]
        if int8_preset is None and not transformer:           # CNN channel-range imbalance: equalize first
            recipes = [("cle", _ort_int8_cle, "static-qoperator")]
        for name, builder, base in recipes:
            out.append(Candidate(f"onnxruntime-int8-{name}", "onnxruntime", "int8", builder(base), True,
                                 portable=not vnni, needs_vnni=vnni, fallback_for=f"onnxruntime-int8-{base}"))
            if vnni:
                seven = PORTABLE_PRESETS[base]
                out.append(Candidate(f"onnxruntime-int8-{name}-7bit", "onnxruntime", "int8", builder(seven), True,
                                     portable=True, fallback_for=f"onnxruntime-int8-{seven}"))
        if int8_preset is None:
            # NNCF without SmoothQuant first; with it only where that fails the gate (outlier channels), as for
            # ONNX Runtime. CNNs get cross-layer equalization instead, also only where the plain recipe fails.
            out += [Candidate("openvino-int8", "openvino", "int8", _ov_int8(False), True, unavailable=ov,
                              needs_vnni=ov_vnni),
                    Candidate("openvino-int8-bf16", "openvino", "int8", _ov_int8(False), True, "bf16",
                              unavailable=bf16, needs_vnni=ov_vnni)]
            if not transformer:
                out += [Candidate("openvino-int8-cle", "openvino", "int8", _ov_int8(False, True), True,
                                  unavailable=ov, fallback_for="openvino-int8", needs_vnni=ov_vnni),
                        Candidate("openvino-int8-cle-bf16", "openvino", "int8", _ov_int8(False, True), True, "bf16",
                                  unavailable=bf16, fallback_for="openvino-int8-bf16", needs_vnni=ov_vnni)]
            if transformer:
                out += [Candidate("openvino-int8-smoothquant", "openvino", "int8", _ov_int8(True), True,
                                  unavailable=ov, fallback_for="openvino-int8", needs_vnni=ov_vnni),
                        Candidate("openvino-int8-smoothquant-bf16", "openvino", "int8", _ov_int8(True), True,
                                  "bf16", unavailable=bf16, fallback_for="openvino-int8-bf16", needs_vnni=ov_vnni)]
        # --- recipe hook: accuracy-aware mixed precision, the last resort of a CNN (built only when none passed)
        if int8_preset is None and not transformer:
            out.append(Candidate("onnxruntime-int8-mixed", "onnxruntime", "int8", _ort_int8_mixed("static-qdq"), True,
                                 portable=not vnni, needs_vnni=vnni, fallback_for=LAST_RESORT))
    else:
        raise ExportError(f"precision {precision!r} is not supported; expected one of fp32, bf16, fp16, int8")
    if engine is not None:
        get_backend(engine)
        out = [c for c in out if c.backend == engine]
        if not out:
            raise ExportError(f"engine {engine!r} offers no {precision} candidate"
                              + (f" with --int8-preset {int8_preset}" if int8_preset else ""))
    return out


def check_available(candidates: Sequence[Candidate], precision: str) -> None:
    """Raise when no candidate computing at ``precision`` can be built here, naming each reason (e.g. the
    missing BF16 instructions); portable fallbacks at another precision do not count."""
    own = [c for c in candidates if c.precision == precision]
    if not own or all(c.unavailable for c in own):
        reasons = "; ".join(f"{c.id}: {c.unavailable}" for c in own) or "no candidate"
        raise BackendUnavailableError(f"no engine can build a {precision} artifact on this machine ({reasons})")


# ------------------------------------------------------------------------------------------ the race
def _gate(outcome: Outcome, inputs: Inputs, thresholds: dict[str, float], step: Step) -> None:
    c = outcome.candidate
    thresholds = gate_thresholds(thresholds, c.batch_invariant)
    step(f"checking parity of {c.id}")
    runner = _runner(inputs, outcome)
    with runner:
        outcome.report = parity_report(inputs.parity.reference, runner, inputs.parity.inputs(runner), thresholds,
                                       c.precision, inputs.parity.names)


def _runner(inputs: Inputs, outcome: Outcome):
    c = outcome.candidate
    record = Engine(id=c.id, backend=c.backend, precision=c.precision, inference_precision=c.inference_precision,
                    files={k: str(p.relative_to(inputs.work)) for k, p in outcome.files.items()})
    ref = EngineRef(inputs.work, record, inputs.spec.embedding.dim, f"{inputs.spec.name}-{c.id}")
    return get_backend(c.backend).open(ref, "cpu", inputs.threads, c.precision)


def run(candidates: Sequence[Candidate], inputs: Inputs, thresholds: dict[str, float], step: Step, *,
        speed_check: bool = True) -> list[Outcome]:
    """Build and gate every available candidate, then time the passing ones side by side (with ONNX
    Runtime's FP32 graph as the reference when the precision is not FP32: ``record["speed_check"]``)."""
    outcomes = []
    for c in candidates:
        outcome = Outcome(c)
        outcomes.append(outcome)
        if c.unavailable:
            continue
        if c.fallback_for == LAST_RESORT and any(o.passed for o in outcomes):
            outcome.error = "not needed: a full-INT8 candidate passed the gate"
            continue
        if c.fallback_for and any(o.candidate.id == c.fallback_for and o.passed for o in outcomes):
            outcome.error = f"not needed: {c.fallback_for} passed the gate"
            continue
        step(f"building {c.id}")
        try:
            outcome.files, outcome.record = c.build(inputs, inputs.work / c.id)
            _gate(outcome, inputs, thresholds, step)
        except ImgembedError as e:
            outcome.error = f"{type(e).__name__}: {str(e).splitlines()[0]}"
    passing = [o for o in outcomes if o.passed]
    if speed_check and passing:
        _time(passing, inputs, step)
    return outcomes


def _time(passing: Sequence[Outcome], inputs: Inputs, step: Step) -> None:
    reference = None
    if passing[0].candidate.precision != "fp32":
        files, _ = _ort_float(inputs, inputs.work / "fp32-reference")
        reference = Outcome(Candidate("fp32-reference", "onnxruntime", "fp32", _ort_float, True), files)
    timed = [*passing, *([reference] if reference else [])]
    step(f"timing {len(passing)} passing engine(s) side by side (batch {SPEED_BATCH})")
    runners = {o.candidate.id: _runner(inputs, o).activate() for o in timed}
    try:
        first = next(iter(runners.values()))  # every engine of one export takes the same input
        medians = interleaved_medians(runners, inputs.parity.inputs(first)[:SPEED_BATCH])
    finally:
        for r in runners.values():
            r.deactivate()
    for o in passing:
        o.seconds = medians[o.candidate.id]
        if reference is not None:
            fp32 = medians["fp32-reference"]
            o.record["speed_check"] = {"batch_size": SPEED_BATCH, "threads": inputs.threads,
                                       "fp32_ms": fp32 * 1e3, f"{o.candidate.precision}_ms": o.seconds * 1e3,
                                       "speedup_vs_fp32": fp32 / o.seconds}


def choose(outcomes: Sequence[Outcome], keep_all: bool) -> tuple[Outcome | None, list[Outcome]]:
    """The winner (fastest passing at the requested precision, the first candidate's; first passing when
    untimed) and the outcomes to keep in the artifact: the winner, plus the fastest passing portable (ONNX
    Runtime) engine as a fallback, or every passing one.

    A portable engine of the same backend and precision within :data:`TIE` of the winner's speed (or both
    untimed) wins instead: the 7-bit INT8 engine runs the same kernels as its 8-bit twin, so this keeps one
    engine that runs everywhere rather than two that differ by timing noise."""
    passing = [o for o in outcomes if o.passed]
    if not passing:
        return None, []
    ranked = sorted(passing, key=lambda o: o.seconds if o.seconds else float("inf"))
    asked = outcomes[0].candidate.precision
    winner = next((o for o in ranked if o.candidate.precision == asked), ranked[0])
    if not winner.candidate.portable:
        winner = next((o for o in ranked if _portable_tie(o, winner)), winner)
    ranked.remove(winner)
    ranked.insert(0, winner)
    if keep_all:
        return winner, ranked
    kept = [winner]
    if not winner.candidate.portable:
        kept += [o for o in ranked if o.candidate.portable][:1]
    return winner, kept


def _portable_tie(o: Outcome, winner: Outcome) -> bool:
    """``o`` is a portable engine of ``winner``'s backend and precision that is as fast within :data:`TIE`
    (or both are untimed)."""
    c, w = o.candidate, winner.candidate
    if not (c.portable and c.backend == w.backend and c.precision == w.precision):
        return False
    if not winner.seconds:
        return not o.seconds
    return bool(o.seconds) and o.seconds <= winner.seconds * (1 + TIE)
