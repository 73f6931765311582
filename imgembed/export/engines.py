"""The engine race of an export: build every candidate the installed engines offer, gate each, time the
passing ones side by side on this machine, keep the fastest as the artifact's default engine.

A :class:`Candidate` is one way to run the model at the requested precision: ONNX Runtime with a graph
(FP32/FP16, or INT8 with a quantization preset), or OpenVINO with an IR (FP32, BF16 as an inference hint,
INT8 through NNCF, optionally with BF16 for the float remainder), made from a registered recipe
(:mod:`.recipes`: the plan is computed from the registry). Every candidate passes the same parity gate
at batch sizes 1, 3 and 8; candidates that claim batch invariance (static activation scales) are also gated on
``batch_variation``. Passing candidates are timed in interleaved rounds (same threads, same batch), so the
ratios hold even on a busy machine. Candidates that cannot be built here (OpenVINO not installed, no BF16
instructions, no GPU for TensorRT) are listed with the reason and never silently dropped.

Every candidate runs on its own ``device``: it is gated and timed there (the runner is opened through the
backend table on that device), and engines of one device are timed against each other only. The default
engine is chosen among the candidates of the export's primary device (the CPU, unless only GPU engines were
planned: ``--backend tensorrt``); passing engines of other devices (TensorRT plans, ``--trt``) are kept beside
it, each with the GPU ``target`` its builder recorded.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from imgembed.artifact import Engine
from imgembed.errors import BackendUnavailableError, ImgembedError
from imgembed.export.onnx_export import DEFAULT_OPSET
from imgembed.gate.parity import ParityReport, gate_thresholds, parity_report
from imgembed.gate.reference import ParitySet
from imgembed.models.registry import ModelSpec
from imgembed.runtime.backends import EngineRef, get_backend
from imgembed.runtime.timing import interleaved_medians

SPEED_BATCH = 8
TIE = 0.03  # speeds closer than this are a tie (the portable engine wins it: choose)
Step = Callable[[str], None]
Builder = Callable[["Inputs", Path], "tuple[dict[str, Path], dict]"]  # (inputs, directory) -> (files, record)
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
    backend_options: dict = field(default_factory=dict)  # by backend: e.g. "tensorrt" -> TrtOptions (profile...)

    def plain_in_format(self) -> Path:
        """The plain graph with the artifact's input (uint8 prefix added when asked)."""
        if self.input_format != "uint8":
            return self.plain
        if self._uint8_plain is None:
            from imgembed.export.uint8_input import add_uint8_input

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
    device: str = "cpu"              # where it runs, is gated and timed ("cuda": TensorRT plans)


@dataclass
class Outcome:
    """What happened to one candidate."""

    candidate: Candidate
    files: dict[str, Path] = field(default_factory=dict)
    record: dict = field(default_factory=dict)
    report: ParityReport | None = None
    error: str | None = None
    seconds: float | None = None
    target: dict | None = None       # a GPU engine's target (the builder's ``record["target"]``): GPU, version...

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


# ------------------------------------------------------------------------------------------ helpers of builders
def batches_of(a: np.ndarray, size: int = 8) -> list[np.ndarray]:
    """Calibration data in the batches the quantizers read."""
    return [a[i:i + size] for i in range(0, len(a), size)]


def with_input_format(inputs: Inputs, src: Path, dst: Path) -> Path:
    """``src`` as the artifact's input format: copied for float32, prefixed with the uint8 input otherwise."""
    import shutil

    dst.parent.mkdir(parents=True, exist_ok=True)
    if inputs.input_format == "uint8":
        from imgembed.export.uint8_input import add_uint8_input

        return add_uint8_input(src, dst, inputs.spec.preprocess)
    if Path(src) != dst:
        shutil.copyfile(src, dst)
    return dst


# ------------------------------------------------------------------------------------------ candidates
def check_available(candidates: Sequence[Candidate], precision: str) -> None:
    """Raise when no candidate computing at ``precision`` can be built here, naming each reason (e.g. the
    missing BF16 instructions); portable fallbacks at another precision do not count."""
    own = [c for c in candidates if c.precision == precision]
    device = primary_device(candidates)
    own = [c for c in own if c.device == device]
    if not own or all(c.unavailable for c in own):
        reasons = "; ".join(f"{c.id}: {c.unavailable}" for c in own) or "no candidate"
        raise BackendUnavailableError(f"no engine can build a {precision} artifact on this machine ({reasons})")
    others = [c for c in candidates if c.device != device]   # GPU engines asked for beside the CPU ones (--trt)
    if others and all(c.unavailable for c in others):
        reasons = "; ".join(f"{c.id}: {c.unavailable}" for c in others)
        raise BackendUnavailableError(f"GPU engines were asked for, but none can be built on this machine "
                                      f"({reasons})")


def primary_device(candidates: Sequence[Candidate]) -> str:
    """The device the default engine is chosen on: the CPU when any CPU candidate is planned, else the first
    candidate's."""
    devices = [c.device for c in candidates]
    return "cpu" if "cpu" in devices or not devices else devices[0]


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
                    device=c.device, target=outcome.target,
                    files={k: str(p.relative_to(inputs.work)) for k, p in outcome.files.items()})
    ref = EngineRef(inputs.work, record, inputs.spec.embedding.dim, f"{inputs.spec.name}-{c.id}")
    return get_backend(c.backend).open(ref, c.device, inputs.threads, c.precision)


def run(candidates: Sequence[Candidate], inputs: Inputs, thresholds: dict[str, float], step: Step, *,
        speed_check: bool = True, fp32_reference: Builder | None = None) -> list[Outcome]:
    """Build and gate every available candidate, then time the passing ones side by side (with the graph
    ``fp32_reference`` builds as the reference when the precision is not FP32: ``record["speed_check"]``)."""
    outcomes = []
    for c in candidates:
        outcome = Outcome(c)
        outcomes.append(outcome)
        if c.unavailable:
            continue
        if c.fallback_for == LAST_RESORT and any(o.passed and o.candidate.device == c.device for o in outcomes):
            outcome.error = "not needed: a full-INT8 candidate passed the gate"
            continue
        if c.fallback_for and any(o.candidate.id == c.fallback_for and o.passed for o in outcomes):
            outcome.error = f"not needed: {c.fallback_for} passed the gate"
            continue
        step(f"building {c.id}")
        try:
            outcome.files, outcome.record = c.build(inputs, inputs.work / c.id)
            outcome.target = outcome.record.pop("target", None)
            _gate(outcome, inputs, thresholds, step)
        except ImgembedError as e:
            outcome.error = f"{type(e).__name__}: {str(e).splitlines()[0]}"
    passing = [o for o in outcomes if o.passed]
    if speed_check and passing:
        for device in dict.fromkeys(o.candidate.device for o in passing):   # each device's engines side by side
            _time([o for o in passing if o.candidate.device == device], inputs, step,
                  fp32_reference if device == "cpu" else None)
    return outcomes


def _time(passing: Sequence[Outcome], inputs: Inputs, step: Step, fp32_reference: Builder | None) -> None:
    reference = None
    if passing[0].candidate.precision != "fp32" and fp32_reference is not None:
        files, _ = fp32_reference(inputs, inputs.work / "fp32-reference")
        reference = Outcome(Candidate("fp32-reference", "onnxruntime", "fp32", fp32_reference, True), files)
    timed = [*passing, *([reference] if reference else [])]
    device = passing[0].candidate.device
    step(f"timing {len(passing)} passing engine(s) side by side (batch {SPEED_BATCH}"
         + (f", {device})" if device != "cpu" else ")"))
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
    Runtime) engine as a fallback, or every passing one. The winner is one of the :func:`primary_device`'s
    candidates (the CPU's); every passing engine of another device (a TensorRT plan) is kept beside it.

    A portable engine of the same backend and precision within :data:`TIE` of the winner's speed (or both
    untimed) wins instead: the 7-bit INT8 engine runs the same kernels as its 8-bit twin, so this keeps one
    engine that runs everywhere rather than two that differ by timing noise."""
    device = primary_device([o.candidate for o in outcomes])
    elsewhere = sorted((o for o in outcomes if o.passed and o.candidate.device != device),
                       key=lambda o: o.seconds if o.seconds else float("inf"))
    outcomes = [o for o in outcomes if o.candidate.device == device]
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
        return winner, ranked + elsewhere
    kept = [winner]
    if not winner.candidate.portable:
        kept += [o for o in ranked if o.candidate.portable][:1]
    return winner, kept + elsewhere


def _portable_tie(o: Outcome, winner: Outcome) -> bool:
    """``o`` is a portable engine of ``winner``'s backend and precision that is as fast within :data:`TIE`
    (or both are untimed)."""
    c, w = o.candidate, winner.candidate
    if not (c.portable and c.backend == w.backend and c.precision == w.precision):
        return False
    if not winner.seconds:
        return not o.seconds
    return bool(o.seconds) and o.seconds <= winner.seconds * (1 + TIE)
