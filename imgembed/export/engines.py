"""The engine race of an export: build every candidate the installed engines offer, time each briefly, gate
them fastest first, time the passing ones side by side on this machine, keep the fastest as the artifact's
default engine.

A :class:`Candidate` is one way to run the model at the requested precision: ONNX Runtime with a graph
(FP32/FP16, or INT8 with a quantization preset), or OpenVINO with an IR (FP32, BF16 as an inference hint,
INT8 through NNCF, optionally with BF16 for the float remainder), made from a registered recipe
(:mod:`.recipes`: the plan is computed from the registry). A gated candidate passes the parity gate at batch
sizes 1, 3 and 8; candidates that claim batch invariance (static activation scales) are also gated on
``batch_variation``. Building is the expensive part (calibration, quantization), gating is cheap, so the race
builds every candidate, times each briefly, and gates the fastest first: it stops once the fastest passing
engine cannot be beaten by an untried one by more than the brief timing's noise (and a portable engine passed
beside a winner that is not portable). Candidates it did not need are marked "not needed" with the brief
timing that ruled them out; ``--keep-candidates`` gates every one. Passing candidates are timed in
interleaved rounds (same threads, same batch), so the ratios hold even on a busy machine. Candidates that
cannot be built here (OpenVINO not installed, no BF16 instructions, no GPU for TensorRT) are listed with the
reason and never silently dropped.

Every candidate runs on its own ``device``: it is gated and timed there (the runner is opened through the
backend table on that device), and engines of one device are timed against each other only. The default
engine is chosen among the candidates of the export's primary device (the CPU, unless only GPU engines were
planned: ``--backend tensorrt``); passing engines of other devices (TensorRT plans, ``--trt``) are all gated and
kept beside it, each with the GPU ``target`` its builder recorded.
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

    @property
    def quantize_cache(self) -> Path:
        """Where ONNX Runtime quantizations of this export share pre-processed graphs and calibrated ranges
        (:func:`~imgembed.export.quantize.quantize`'s ``cache``)."""
        return self.work / "quantize-cache"

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
    same_speed_as: str | None = None  # runs that candidate's kernels: raced at its brief speed, built when needed


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
def run(candidates: Sequence[Candidate], inputs: Inputs, thresholds: dict[str, float], step: Step, *,
        speed_check: bool = True, fp32_reference: Builder | None = None, gate_all: bool = False) -> list[Outcome]:
    """Build, gate and time the candidates; returns one :class:`Outcome` per candidate, in plan order.

    With ``speed_check`` (the default race) every candidate is built, timed briefly, and gated fastest first: the
    race stops gating once a candidate at the asked precision passed that no untried one beats by more than
    :data:`QUICK_NOISE` in the brief timing (and, when that one is not portable, once a portable engine passed
    too); the passing ones are then timed side by side (with the graph ``fp32_reference`` builds as the reference
    when the precision is not FP32: ``record["speed_check"]``). Candidates the race did not need are marked
    "not needed". ``gate_all`` (``--keep-candidates``) or no ``speed_check``: every candidate is gated, in plan
    order. Fallback recipes are built only when their own candidate failed its gate, last resorts only when
    nothing of their device passed."""
    outcomes = [Outcome(c) for c in candidates]
    runners = _Runners(inputs)
    try:
        if speed_check and not gate_all:
            _fastest_first(outcomes, inputs, thresholds, step, runners)
        else:
            for o in outcomes:
                if _settle_fallback(o, outcomes) or o.candidate.unavailable:
                    continue
                if _build(o, inputs, step):
                    _gate(o, inputs, thresholds, step, runners)
                    runners.drop(o)   # every candidate is gated here: hold one open at a time
        passing = [o for o in outcomes if o.passed]
        if speed_check and passing:
            for device in dict.fromkeys(o.candidate.device for o in passing):   # each device's engines side by side
                _time([o for o in passing if o.candidate.device == device], inputs, step,
                      fp32_reference if device == "cpu" else None, runners)
    finally:
        runners.close()
    return outcomes


QUICK_NOISE = 0.10   # brief timings (a few interleaved runs) this close may swap order in the final timing
QUICK_ROUNDS = 3


class _Runners:
    """The race's open runners, by candidate id: opened once, used by the brief timing, the gate and the final
    timing, closed when the race ends (or as soon as a candidate is out of the race)."""

    def __init__(self, inputs: Inputs) -> None:
        self.inputs = inputs
        self.open: dict[str, object] = {}

    def __call__(self, outcome: Outcome):
        key = outcome.candidate.id
        if key not in self.open:
            self.open[key] = _runner(self.inputs, outcome).activate()
        return self.open[key]

    def drop(self, outcome: Outcome) -> None:
        runner = self.open.pop(outcome.candidate.id, None)
        if runner is not None:
            runner.deactivate()

    def close(self) -> None:
        for runner in self.open.values():
            runner.deactivate()
        self.open.clear()


def _runner(inputs: Inputs, outcome: Outcome):
    c = outcome.candidate
    record = Engine(id=c.id, backend=c.backend, precision=c.precision, inference_precision=c.inference_precision,
                    device=c.device, target=outcome.target,
                    files={k: str(p.relative_to(inputs.work)) for k, p in outcome.files.items()})
    ref = EngineRef(inputs.work, record, inputs.spec.embedding.dim, f"{inputs.spec.name}-{c.id}")
    return get_backend(c.backend).open(ref, c.device, inputs.threads, c.precision)


def _why(e: Exception) -> str:
    """An error as one line of a candidate's row: its type and its message's first line."""
    return f"{type(e).__name__}: {next(iter(str(e).splitlines()), '')}"


def _build(outcome: Outcome, inputs: Inputs, step: Step) -> bool:
    c = outcome.candidate
    step(f"building {c.id}")
    try:
        outcome.files, outcome.record = c.build(inputs, inputs.work / c.id)
        outcome.target = outcome.record.pop("target", None)
        return True
    except ImgembedError as e:
        outcome.error = _why(e)
        return False


def _gate(outcome: Outcome, inputs: Inputs, thresholds: dict[str, float], step: Step, runners: _Runners) -> None:
    c = outcome.candidate
    thresholds = gate_thresholds(thresholds, c.batch_invariant)
    step(f"checking parity of {c.id}")
    try:
        runner = runners(outcome)
        outcome.report = parity_report(inputs.parity.reference, runner, inputs.parity.inputs(runner), thresholds,
                                       c.precision, inputs.parity.names)
    except ImgembedError as e:
        outcome.error = _why(e)
    if not outcome.passed:
        runners.drop(outcome)


def _settle_fallback(o: Outcome, outcomes: Sequence[Outcome]) -> bool:
    """Mark ``o`` not needed when its recipe is a fallback whose reason to exist is gone; True when marked."""
    c = o.candidate
    if c.unavailable:
        return False
    if c.fallback_for == LAST_RESORT and any(x.passed and x.candidate.device == c.device for x in outcomes):
        o.error = "not needed: a full-INT8 candidate passed the gate"
        return True
    if c.fallback_for and any(x.candidate.id == c.fallback_for and x.passed for x in outcomes):
        o.error = f"not needed: {c.fallback_for} passed the gate"
        return True
    return False


def _fastest_first(outcomes: list[Outcome], inputs: Inputs, thresholds: dict[str, float], step: Step,
                   runners: _Runners) -> None:
    """The default race: build every plain candidate and time them briefly, then gate the most promising untried
    one until :func:`_next_to_gate` finds none worth gating. A fallback enters the race when its own candidate
    failed, at that candidate's brief speed (same graph structure), and is built only when its turn comes; a last
    resort enters when nothing of its device passed."""
    quick: dict[str, float] = {}
    state: dict[str, str] = {}   # id -> "built" | "gated" | "done" (failed to build or to open, unavailable)
    for o in outcomes:
        if o.candidate.unavailable:
            state[o.candidate.id] = "done"
    fresh = [o for o in outcomes if o.candidate.id not in state and not o.candidate.fallback_for
             and not _timed_by_twin(o, outcomes, state)]
    _build_and_time(fresh, inputs, step, runners, quick, state)
    while True:
        nxt = _next_to_gate(outcomes, state, quick)
        if nxt is None:
            break
        if nxt.candidate.id not in state:   # a fallback or last resort whose turn came: build it, then re-rank
            _build_and_time([nxt], inputs, step, runners, quick, state)
            continue
        _gate(nxt, inputs, thresholds, step, runners)
        state[nxt.candidate.id] = "gated"
    for o in outcomes:
        c = o.candidate
        if state.get(c.id) == "built":   # built and timed, never gated: something faster passed
            runners.drop(o)
            o.error = _not_needed(o, outcomes, quick)
        elif c.id not in state and c.same_speed_as and not c.fallback_for:
            o.error = _not_needed(o, outcomes, {**quick, c.id: quick.get(c.same_speed_as)}, twin=c.same_speed_as)
        elif c.id not in state and not _settle_fallback(o, outcomes):
            o.error = _fallback_not_needed(o, outcomes, state)


def _build_and_time(group: list[Outcome], inputs: Inputs, step: Step, runners: _Runners, quick: dict[str, float],
                    state: dict[str, str]) -> None:
    built = []
    for o in group:
        if _build(o, inputs, step):
            state[o.candidate.id] = "built"
            built.append(o)
        else:
            state[o.candidate.id] = "done"
    if built:
        _quick_time(built, inputs, step, runners, quick)
    for o in built:
        if o.error is not None:   # could not be opened for the brief timing
            state[o.candidate.id] = "done"


def _fallback_not_needed(o: Outcome, outcomes: Sequence[Outcome], state: dict[str, str]) -> str:
    """Why a fallback (or last resort) the race never built was not needed."""
    parent = o.candidate.fallback_for
    if parent == LAST_RESORT:
        return "not needed: a full-INT8 candidate passed the gate"
    if state.get(parent) == "gated":
        return f"not needed: {parent} failed its gate, but a faster engine passed"
    if state.get(parent) in ("built", None):
        return f"not needed: built only when {parent} fails its gate, and {parent} was not needed"
    return "not needed: the race ended before its turn"


def _timed_by_twin(o: Outcome, outcomes: Sequence[Outcome], state: dict[str, str]) -> bool:
    """Whether ``o`` waits for the brief timing of the candidate whose kernels it runs (planned and buildable)."""
    twin = o.candidate.same_speed_as
    return bool(twin) and any(x.candidate.id == twin and state.get(twin) != "done" for x in outcomes)


def _entered(o: Outcome, outcomes: Sequence[Outcome], state: dict[str, str]) -> bool:
    """Whether an unbuilt candidate entered the race: one timed by its twin once the twin was built (or could not
    be); a fallback once its own candidate failed its gate (or could not be built); a last resort once nothing of
    its device is left untried and nothing passed."""
    c = o.candidate
    if c.same_speed_as and not c.fallback_for:
        return not _timed_by_twin(o, outcomes, state) or state.get(c.same_speed_as) in ("built", "gated")
    if c.fallback_for == LAST_RESORT:
        mine = [x for x in outcomes if x.candidate.device == c.device and x.candidate.fallback_for != LAST_RESORT]
        return (all(state.get(x.candidate.id) in ("gated", "done") for x in mine)
                and not any(x.passed for x in mine))
    parent = next((x for x in outcomes if x.candidate.id == c.fallback_for), None)
    status = None if parent is None else state.get(parent.candidate.id)
    return parent is None or status == "done" or (status == "gated" and not parent.passed)


def _quick_time(fresh: list[Outcome], inputs: Inputs, step: Step, runners: _Runners, quick: dict[str, float]) -> None:
    """A brief interleaved timing of newly built candidates (per device), to gate the fastest first."""
    for device in dict.fromkeys(o.candidate.device for o in fresh):
        group = [o for o in fresh if o.candidate.device == device]
        step(f"timing {len(group)} candidate(s) briefly (batch {SPEED_BATCH}"
             + (f", {device})" if device != "cpu" else ")"))
        opened = {}
        for o in group:
            try:
                opened[o.candidate.id] = runners(o)
            except ImgembedError as e:
                o.error = _why(e)
        if not opened:
            continue
        try:
            first = next(iter(opened.values()))
            quick.update(interleaved_medians(opened, inputs.parity.inputs(first)[:SPEED_BATCH], warmup=1,
                                             rounds=QUICK_ROUNDS, max_seconds=5.0))
        except ImgembedError as e:   # an engine that cannot run the batch: gated untimed (the gate reports why)
            step(f"brief timing failed ({_why(e)})")


def _next_to_gate(outcomes: Sequence[Outcome], state: dict[str, str], quick: dict[str, float]) -> Outcome | None:
    """The untried candidate to gate (or build) next, or None when none can change the race's outcome: the fastest
    untried one while nothing at the asked precision passed; then untried ones within :data:`QUICK_NOISE` of the
    fastest passing one; then, beside a winner that is not portable, portable ones until one passed (and those
    within the noise of it). Engines of other devices than the primary one are all gated. An unbuilt fallback
    ranks at its own candidate's brief speed, one that runs another's kernels at that one's, a last resort
    first."""
    def speed(o: Outcome) -> float:
        if o.candidate.id in quick:
            return quick[o.candidate.id]
        parent = o.candidate.same_speed_as or o.candidate.fallback_for
        return quick.get(parent, 0.0) if parent and parent != LAST_RESORT else 0.0   # untimed: first

    def rank(o: Outcome) -> tuple:   # ties: built before unbuilt, portable before not
        return speed(o), o.candidate.id not in state, not o.candidate.portable

    untried = sorted((o for o in outcomes if state.get(o.candidate.id) == "built"
                      or (o.candidate.id not in state and _entered(o, outcomes, state))), key=rank)
    if not untried:
        return None
    device = primary_device([o.candidate for o in outcomes])
    elsewhere = [o for o in untried if o.candidate.device != device]
    if elsewhere:
        return elsewhere[0]
    asked = outcomes[0].candidate.precision
    passing = sorted((o for o in outcomes if o.passed and o.candidate.device == device), key=speed)
    best = next((o for o in passing if o.candidate.precision == asked), None)
    if best is None:
        return untried[0]
    near = [o for o in untried if speed(o) <= speed(best) * (1 + QUICK_NOISE)]
    if near:
        return near[0]
    if not best.candidate.portable:
        portable = next((o for o in passing if o.candidate.portable), None)
        candidates = [o for o in untried if o.candidate.portable
                      and (portable is None or speed(o) <= speed(portable) * (1 + QUICK_NOISE))]
        if candidates:
            return candidates[0]
    return None


def _not_needed(o: Outcome, outcomes: Sequence[Outcome], quick: dict[str, float], twin: str | None = None) -> str:
    mine = quick.get(o.candidate.id)
    faster = sorted((x for x in outcomes if x.passed and x.candidate.device == o.candidate.device),
                    key=lambda x: quick.get(x.candidate.id, float("inf")))
    if mine is None or not faster or faster[0].candidate.id not in quick:
        return "not needed: the race ended before its turn"
    w = faster[0]
    runs = f" (runs the kernels of {twin}: not built)" if twin else ""
    return (f"not needed: {w.candidate.id} passed the gate and is faster here "
            f"({SPEED_BATCH / quick[w.candidate.id]:.1f} vs {SPEED_BATCH / mine:.1f} img/s, brief timing){runs}")


def _time(passing: Sequence[Outcome], inputs: Inputs, step: Step, fp32_reference: Builder | None,
          runners: _Runners) -> None:
    reference = None
    if passing[0].candidate.precision != "fp32" and fp32_reference is not None:
        step("building the FP32 reference for the speed check")
        files, _ = fp32_reference(inputs, inputs.work / "fp32-reference")
        reference = Outcome(Candidate("fp32-reference", "onnxruntime", "fp32", fp32_reference, True), files)
    timed = [*passing, *([reference] if reference else [])]
    device = passing[0].candidate.device
    step(f"timing {len(passing)} passing engine(s) side by side (batch {SPEED_BATCH}"
         + (f", {device})" if device != "cpu" else ")"))
    opened = {o.candidate.id: runners(o) for o in timed}
    first = next(iter(opened.values()))  # every engine of one export takes the same input
    medians = interleaved_medians(opened, inputs.parity.inputs(first)[:SPEED_BATCH])
    if reference is not None:
        runners.drop(reference)
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
