"""The clock of an export's stages: every step message starts a stage and ends the one before it, so the
export prints, and records in its manifest (``export.stages``), where its time went."""
from __future__ import annotations

import time
from typing import Callable

Step = Callable[[str], None]


class StageClock:
    """A step callback that also times the stages it announces (wraps the caller's ``step``)."""

    def __init__(self, step: Step = lambda s: None) -> None:
        self._step = step
        self._name: str | None = None
        self._start = 0.0
        self.stages: list[tuple[str, float]] = []

    def __call__(self, text: str) -> None:
        self._switch(text)
        self._step(text)

    def back(self) -> None:
        """End the current stage and go on timing the one before it (a stage that ran inside another, such as the
        calibration the first quantizing candidate asks for), without announcing it again."""
        if self.stages:
            self._switch(self.stages[-1][0])

    def _switch(self, name: str | None) -> None:
        now = time.perf_counter()
        if self._name is not None:
            self.stages.append((self._name, now - self._start))
        self._name, self._start = name, now

    def record(self) -> list[dict]:
        """The stages so far (the running one included, up to now), as the manifest records them."""
        running = [] if self._name is None else [(self._name, time.perf_counter() - self._start)]
        return [{"name": name, "seconds": round(seconds, 3)} for name, seconds in [*self.stages, *running]]

    @staticmethod
    def of(step: Step) -> "StageClock":
        """``step`` itself when it is a clock already, else a clock around it."""
        return step if isinstance(step, StageClock) else StageClock(step)
