"""One flow for every tower of an export: race the candidates, judge the outcome, record it; re-check an engine.

The image tower (:mod:`.pipeline`) and the text tower (:mod:`.text_tower`) are two instances of :class:`Tower`:
each brings its own original, reference set, exported graph and calibration data (an :class:`~.engines.Inputs`)
and its candidates; everything after that is shared:

* :func:`race` builds and gates every candidate, times the passing ones and picks the winner
  (:mod:`.engines`); no engine built, or none passing, ends the export the same way for both towers (or keeps
  the closest engine, marked failed, with ``keep_failed``);
* :func:`selection` is the tower's record of the race (the manifest's ``selection``);
* :func:`gate_engine` re-runs the gate of an artifact's engine against a fresh reference (``imgembed parity``).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from imgembed.artifact import Candidate as CandidateRow
from imgembed.artifact import Engine, Manifest, Selection
from imgembed.errors import ExportError, ParityError
from imgembed.export import engines

Step = Callable[[str], None]


@dataclass
class Tower:
    """One tower of an export, ready to race: its name in messages, its candidates and what they are built from."""

    label: str                              # "clip-vit-b32" / "clip-vit-b32 text tower"
    precision: str
    candidates: Sequence[engines.Candidate]
    inputs: engines.Inputs
    thresholds: dict[str, float]


@dataclass
class Raced:
    """The outcome of a tower's race: the winner (the default engine), the engines to keep, every outcome."""

    winner: engines.Outcome
    kept: list[engines.Outcome]
    outcomes: list[engines.Outcome]

    @property
    def passed(self) -> bool:
        return self.winner.passed


def race(tower: Tower, step: Step, *, speed_check: bool = True, keep_candidates: bool = False,
         keep_failed: bool = False) -> Raced:
    """Build, gate and time ``tower``'s candidates and choose its default engine.

    No candidate built: ExportError naming each one's reason. None passing: ParityError with every failure and the
    closest engine's report, unless ``keep_failed`` (the closest engine is kept; the caller marks it failed)."""
    from imgembed.export.recipes import ORT_FP32
    from imgembed.gate.parity import format_report

    outcomes = engines.run(tower.candidates, tower.inputs, tower.thresholds, step, speed_check=speed_check,
                           fp32_reference=ORT_FP32.builder, gate_all=keep_candidates)
    winner, kept = engines.choose(outcomes, keep_candidates)
    if winner is None:
        device = engines.primary_device(tower.candidates)
        built = [o for o in outcomes if o.report is not None and o.candidate.device == device]
        if not built:
            raise ExportError(f"{tower.label} {tower.precision}: no engine could be built ("
                              + "; ".join(f"{o.candidate.id}: {o.error or o.candidate.unavailable}"
                                          for o in outcomes) + ")")
        best = max(built, key=lambda o: o.report.metrics["min_cosine"])
        if not keep_failed:
            lines = "; ".join(f"{o.candidate.id}: {', '.join(o.report.failures)}" for o in built)
            raise ParityError(f"{tower.label} {tower.precision} failed the parity gate on every engine ({lines}); "
                              f"no artifact written (pass --keep-failed to keep the closest one, marked failed)\n"
                              f"{format_report(best.report)}", best.report)
        winner, kept = best, [best, *(o for o in outcomes if o.passed and o.candidate.device != device)]
    return Raced(winner, kept, outcomes)


def selection(raced: Raced, threads: int | None, forced_backend: str | None = None) -> Selection:
    """The manifest's record of a tower's race: the host, the timing setup and every candidate's row."""
    from imgembed.runtime.host import cpu_summary

    return Selection(cpu=cpu_summary(), threads=threads, batch_size=engines.SPEED_BATCH,
                     forced_backend=forced_backend,
                     candidates=[CandidateRow.model_validate(o.row()) for o in raced.outcomes])


def gate_engine(artifact: Path, manifest: Manifest, engine: Engine, parity_set, thresholds: dict[str, float], *,
                threads: int | None = None, dim: int | None = None, name: str | None = None):
    """Re-run the parity gate of one engine of an artifact against ``parity_set`` (a fresh reference from the
    rebuilt original), with the thresholds of its precision; the report names the engine."""
    from imgembed.gate.parity import gate_thresholds, parity_report
    from imgembed.runtime.backends import open_engine

    thresholds = gate_thresholds(thresholds, engine.batch_invariant)
    with open_engine(artifact, manifest, engine, threads=threads, dim=dim, name=name) as runner:
        report = parity_report(parity_set.reference, runner, parity_set.inputs(runner), thresholds, engine.precision,
                               parity_set.names)
    return report.with_engine(engine.id)
