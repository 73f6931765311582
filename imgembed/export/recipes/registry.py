"""The recipe registry: every way an export can build an engine is a :class:`Recipe` record, and the candidate
plan of an export is computed from the records.

A recipe says what it builds (backend, precision, inference hint, builder), which graphs it is raced for
(``kinds``: ``"transformer"`` and ``"cnn"`` image towers, ``"text"`` towers), where it sits in the race
(``order``), when it is built at all (``fallback_for`` another recipe that failed its gate, or
:data:`LAST_RESORT`; ``same_speed_as`` a recipe whose kernels it runs: raced at that one's brief speed and built only
when the race gets to it), what it needs on this machine (``probes``; the backend's own availability is always
checked) and how its INT8 kernels behave (``portable`` / ``needs_vnni`` / ``planned``: rules of whether the
backend's int8 kernels here are VNNI ones, read when the plan is made).

A recipe also names the ``device`` its engine runs on. CPU recipes make every plan; GPU recipes (TensorRT,
:mod:`.tensorrt`) are planned only when the export asks for GPU engines (``gpu=True``: ``--trt``, or their
backend named: ``--backend tensorrt``), and then they race, are gated and timed on their device.

Orders, by convention: float engines 10-30, ONNX Runtime INT8 presets 100-110, ONNX Runtime outlier recipes
200-210, OpenVINO INT8 300-320, last resorts 900, GPU engines 1000.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Union

from imgembed.errors import ExportError
from imgembed.export.engines import LAST_RESORT, Candidate
from imgembed.runtime import host
from imgembed.runtime.backends import get_backend

if TYPE_CHECKING:
    from imgembed.export.engines import Inputs

Builder = Callable[["Inputs", Path], "tuple[dict[str, Path], dict]"]
Probe = Callable[[], Union[str, None]]  # why the recipe cannot be built here, None when it can
KernelRule = Callable[[bool], bool]     # whether the backend's int8 kernels here are VNNI ones -> value
KINDS = ("transformer", "cnn", "text")
PRECISIONS = ("fp32", "bf16", "fp16", "int8")


def always(vnni: bool) -> bool:
    return True


def never(vnni: bool) -> bool:
    return False


def with_vnni(vnni: bool) -> bool:
    return vnni


def without_vnni(vnni: bool) -> bool:
    return not vnni


@dataclass(frozen=True, eq=False)
class Recipe:
    """One way to build an engine. ``precision`` is what the engine computes in; ``serves`` adds the precisions
    whose plan races it too (ONNX Runtime's FP32 graph is the portable fallback of a BF16 artifact)."""

    id: str
    backend: str
    precision: str
    builder: Builder
    kinds: frozenset[str] = frozenset()  # graphs raced by default; empty: built only when forced (``preset``)
    order: int = 500
    inference_precision: str = "fp32"
    batch_invariant: bool = True
    portable: KernelRule = never         # runs as gated on every CPU
    needs_vnni: KernelRule = never       # gated with exact int8 dot products (saturates without VNNI)
    planned: KernelRule = always         # planned at all (the 7-bit twins of outlier recipes: on VNNI kernels)
    fallback_for: Recipe | str | None = None  # built only when that recipe failed its gate (or LAST_RESORT)
    same_speed_as: Recipe | None = None  # runs that recipe's kernels: raced at its brief speed, built when needed
    probes: tuple[Probe, ...] = ()
    serves: frozenset[str] = frozenset()
    preset: str | None = None            # the ONNX Runtime INT8 preset it builds (``--int8-preset`` picks it)
    device: str = "cpu"                  # where its engine runs, is gated and timed ("cuda": GPU recipes)
    why: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ExportError(f"recipe {self.id}: precision {self.precision!r}; expected one of {list(PRECISIONS)}")
        bad = sorted(set(self.kinds) - set(KINDS))
        if bad:
            raise ExportError(f"recipe {self.id}: unknown kinds {bad}; expected some of {list(KINDS)}")
        object.__setattr__(self, "kinds", frozenset(self.kinds))
        object.__setattr__(self, "serves", frozenset(self.serves) | {self.precision})
        if isinstance(self.fallback_for, str) and self.fallback_for != LAST_RESORT:
            raise ExportError(f"recipe {self.id}: fallback_for is a Recipe or LAST_RESORT, not {self.fallback_for!r}")

    def unavailable(self) -> str | None:
        """Why it cannot be built here: its backend on its device first, then its own probes."""
        reason = get_backend(self.backend).unavailable(self.device)
        for probe in self.probes:
            reason = reason or probe()
        return reason

    def candidate(self, vnni: bool) -> Candidate:
        """The race's candidate, with the kernel rules read for ``vnni`` kernels."""
        fallback = self.fallback_for.id if isinstance(self.fallback_for, Recipe) else self.fallback_for
        return Candidate(self.id, self.backend, self.precision, self.builder, self.batch_invariant,
                         self.inference_precision, unavailable=self.unavailable(), portable=self.portable(vnni),
                         fallback_for=fallback, needs_vnni=self.needs_vnni(vnni), device=self.device,
                         same_speed_as=None if self.same_speed_as is None else self.same_speed_as.id)


_REGISTRY: dict[str, Recipe] = {}


def register(recipe: Recipe) -> Recipe:
    """Add ``recipe`` (its fallback must be registered); returns it, so a module can name its records."""
    if recipe.id in _REGISTRY:
        raise ExportError(f"recipe {recipe.id!r} is already registered")
    if isinstance(recipe.fallback_for, Recipe) and _REGISTRY.get(recipe.fallback_for.id) is not recipe.fallback_for:
        raise ExportError(f"recipe {recipe.id}: its fallback_for {recipe.fallback_for.id!r} is not registered")
    if recipe.same_speed_as is not None and _REGISTRY.get(recipe.same_speed_as.id) is not recipe.same_speed_as:
        raise ExportError(f"recipe {recipe.id}: its same_speed_as {recipe.same_speed_as.id!r} is not registered")
    _REGISTRY[recipe.id] = recipe
    return recipe


def unregister(recipe: Recipe | str) -> None:
    rid = recipe if isinstance(recipe, str) else recipe.id
    get(rid)
    del _REGISTRY[rid]


@contextlib.contextmanager
def registered(*added: Recipe) -> Iterator[tuple[Recipe, ...]]:
    """Register ``added`` for the duration of the block (tests, experiments)."""
    done = []
    try:
        for r in added:
            done.append(register(r))
        yield tuple(done)
    finally:
        for r in reversed(done):
            unregister(r)


def get(recipe_id: str) -> Recipe:
    if recipe_id not in _REGISTRY:
        raise ExportError(f"unknown recipe {recipe_id!r}; expected one of {sorted(_REGISTRY)}")
    return _REGISTRY[recipe_id]


def recipes(precision: str | None = None, *, kind: str | None = None, backend: str | None = None,
            preset: str | None = None) -> list[Recipe]:
    """The registered recipes raced for ``precision`` on a ``kind`` graph (by default, i.e. not only when
    forced), of ``backend``, building ``preset``; in race order."""
    out = [r for r in _REGISTRY.values()
           if (precision is None or precision in r.serves) and (kind is None or kind in r.kinds)
           and (backend is None or r.backend == backend) and (preset is None or r.preset == preset)]
    return sorted(out, key=lambda r: r.order)


def presets() -> list[str]:
    """The ONNX Runtime INT8 presets a recipe builds (what ``--int8-preset`` accepts)."""
    return sorted(r.preset for r in _REGISTRY.values() if r.preset)


def kind_of(transformer: bool, reexport: bool = True) -> str:
    """The graph kind of an image tower (``reexport``: its PyTorch original is at hand) or a text tower."""
    return "cnn" if not transformer else "transformer" if reexport else "text"


def plan(precision: str, *, kind: str | None = None, transformer: bool | None = None, int8_preset: str | None = None,
         backend: str | None = None, reexport: bool = True, gpu: bool = False) -> list[Candidate]:
    """The candidates of an export at ``precision`` for a ``kind`` graph (or ``transformer`` + ``reexport``:
    see :func:`kind_of`), in race order: the recipe of ``int8_preset`` alone when one is forced; only
    ``backend``'s when given. GPU recipes (``device`` not ``"cpu"``) are planned only with ``gpu`` (whatever
    ``backend`` restricts the CPU ones to) or when ``backend`` names theirs; ``int8_preset`` forces the CPU
    recipe, GPU recipes build their own graphs."""
    if precision not in PRECISIONS:
        raise ExportError(f"precision {precision!r} is not supported; expected one of {', '.join(PRECISIONS)}")
    if kind is None:
        if transformer is None:
            raise ExportError("plan() needs the graph kind (kind=, or transformer=)")
        kind = kind_of(transformer, reexport)
    if kind not in KINDS:
        raise ExportError(f"unknown graph kind {kind!r}; expected one of {list(KINDS)}")
    if precision == "int8" and int8_preset:
        if int8_preset not in presets():
            raise ExportError(f"unknown INT8 preset {int8_preset!r}; expected one of {presets()}")
        chosen = recipes(precision, preset=int8_preset)
        chosen += [r for r in recipes(precision, kind=kind) if r.device != "cpu"]
    else:
        chosen = recipes(precision, kind=kind)
    chosen = [r for r in chosen if r.device == "cpu" or gpu or r.backend == backend]
    if gpu and all(r.device == "cpu" for r in chosen):
        raise ExportError(f"no GPU engine recipe builds a {precision} {kind} engine (GPU engines: "
                          f"{sorted({r.id for r in _REGISTRY.values() if r.device != 'cpu'})})")
    vnni = _VnniKernels()
    out = [r.candidate(vnni(r)) for r in chosen if r.planned(vnni(r))]
    if backend is not None:
        get_backend(backend)
        if not any(c.backend == backend for c in out):
            raise ExportError(f"backend {backend!r} offers no {precision} candidate"
                              + (f" with --int8-preset {int8_preset}" if int8_preset else ""))
        out = [c for c in out if c.backend == backend or (gpu and c.device != "cpu")]
    return out


class _VnniKernels:
    """Whether each backend's int8 kernels here are VNNI ones (:func:`imgembed.runtime.host.int8_kernels`),
    read once per plan."""

    def __init__(self) -> None:
        self._seen: dict[str, bool] = {}

    def __call__(self, recipe: Recipe) -> bool:
        if recipe.device != "cpu":
            return False   # int8 kernels of a CPU backend: a GPU engine has none of the x86 rules
        backend = recipe.backend
        if backend not in self._seen:
            self._seen[backend] = host.int8_kernels(backend) == "vnni"
        return self._seen[backend]
