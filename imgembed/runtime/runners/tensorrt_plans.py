"""TensorRT engine bookkeeping, in pure Python: batch profiles, engine keys, compatibility, chunking.

A serialized TensorRT engine runs only with the TensorRT version that built it and on the GPU model it was
built (and tuned) for. imgembed therefore keys every engine by GPU name, compute capability, TensorRT
version, precision and batch profile, puts the key in the engine's file name, and records it in the
artifact manifest (an engine with ``backend: tensorrt`` and its ``target``). Loading picks the engine recorded
for this machine; none compatible is an :class:`~imgembed.errors.EngineMismatchError` naming what differs.

No TensorRT import here: everything is testable on a machine without a GPU.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Sequence

from imgembed.errors import EngineMismatchError
from imgembed.runtime.gpu import GpuIdentity

ENGINE_PRECISIONS = ("fp32", "fp16", "int8")


@dataclass(frozen=True)
class BatchProfile:
    """A TensorRT optimization profile over the batch axis: kernels are tuned for ``opt`` and the engine
    accepts any batch in [min, max] (imgembed's runner splits larger batches and pads smaller ones)."""

    min: int
    opt: int
    max: int

    def __post_init__(self) -> None:
        if not (1 <= self.min <= self.opt <= self.max):
            raise ValueError(f"batch profile min={self.min}, opt={self.opt}, max={self.max}: expected "
                             "1 <= min <= opt <= max")

    def to_dict(self) -> dict:
        return {"min": self.min, "opt": self.opt, "max": self.max}

    @classmethod
    def from_dict(cls, d: dict) -> "BatchProfile":
        return cls(int(d["min"]), int(d["opt"]), int(d["max"]))

    def __str__(self) -> str:
        return f"{self.min},{self.opt},{self.max}"


DEFAULT_PROFILE = BatchProfile(1, 32, 256)


def parse_profile(text: str) -> BatchProfile:
    """``"1,8,64"`` -> BatchProfile(1, 8, 64); anything else is a ValueError naming the text."""
    parts = [p.strip() for p in str(text).split(",")]
    if len(parts) != 3 or not all(re.fullmatch(r"\d+", p) for p in parts):
        raise ValueError(f"--trt-batch {text!r}: expected three comma-separated integers min,opt,max "
                         "(e.g. 1,32,256)")
    try:
        return BatchProfile(*(int(p) for p in parts))
    except ValueError as e:
        raise ValueError(f"--trt-batch {text!r}: {e}") from None


@dataclass(frozen=True)
class EngineEnv:
    """Where an engine is built or loaded: the GPU and the TensorRT version."""

    gpu: GpuIdentity
    tensorrt: str

    def to_dict(self) -> dict:
        return {"gpu": self.gpu.to_dict(), "tensorrt": self.tensorrt}


def slug(text: str) -> str:
    """Lower-case, file-name-safe form of a GPU name."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def engine_key(env: EngineEnv, precision: str, profile: BatchProfile) -> str:
    """File-name-safe key, e.g. ``nvidia-h100-80gb-hbm3-sm90-trt10.5.0-fp16-b1-32-256``."""
    if precision not in ENGINE_PRECISIONS:
        raise ValueError(f"engine precision {precision!r}; expected one of {list(ENGINE_PRECISIONS)}")
    sm = "sm" + env.gpu.compute_capability.replace(".", "")
    trt = "trt" + re.sub(r"[^0-9.]+", "", env.tensorrt)
    return f"{slug(env.gpu.name)}-{sm}-{trt}-{precision}-b{profile.min}-{profile.opt}-{profile.max}"


def engine_file_name(key: str) -> str:
    return f"engine-{key}.plan"


def engine_record(env: EngineEnv, precision: str, profile: BatchProfile, **extra) -> dict:
    """The manifest record of one engine (``extra``: parity report, build seconds, source hash...)."""
    key = engine_key(env, precision, profile)
    return {"file": engine_file_name(key), "key": key, "precision": precision, "gpu": env.gpu.to_dict(),
            "tensorrt": env.tensorrt, "profile": profile.to_dict(), **extra}


def incompatibilities(record: dict, env: EngineEnv) -> list[str]:
    """Why the engine of ``record`` cannot run in ``env`` (empty when it can): each reason names both sides."""
    if not isinstance(record, dict):  # an artifact engine's target (imgembed.artifact.GpuTarget)
        record = record.model_dump()
    reasons = []
    gpu = record.get("gpu") or {}
    if gpu.get("name") != env.gpu.name:
        reasons.append(f"built for GPU {gpu.get('name')!r}, this GPU is {env.gpu.name!r}")
    elif gpu.get("compute_capability") != env.gpu.compute_capability:
        reasons.append(f"built for compute capability {gpu.get('compute_capability')}, this GPU has "
                       f"{env.gpu.compute_capability}")
    if record.get("tensorrt") != env.tensorrt:
        reasons.append(f"built with TensorRT {record.get('tensorrt')}, this machine has TensorRT {env.tensorrt}")
    return reasons


def select_engine(records: Sequence[dict], env: EngineEnv, precision: str | None = None,
                  where: str = "artifact") -> dict:
    """The recorded engine that runs in ``env`` (at ``precision`` if given; the largest max batch wins).

    None compatible: EngineMismatchError listing every engine with what differs, and how to rebuild.
    """
    candidates = [r for r in records if precision is None or r.get("precision") == precision]
    if not candidates:
        have = sorted({str(r.get("precision")) for r in records})
        raise EngineMismatchError(f"{where} has no TensorRT engine" + (f" at precision {precision}" if precision
                                  else "") + (f" (engines: {have})" if have else "")
                                  + "; build one with `imgembed export NAME --trt`")
    ok = [r for r in candidates if not incompatibilities(r, env)]
    if ok:
        return max(ok, key=lambda r: r["profile"]["max"])
    details = "; ".join(f"{r.get('file')}: {', '.join(incompatibilities(r, env))}" for r in candidates)
    raise EngineMismatchError(f"no TensorRT engine in {where} runs here ({env.gpu.name}, TensorRT {env.tensorrt}): "
                              f"{details}. Engines are tied to the GPU model and TensorRT version; rebuild on "
                              "this machine with `imgembed export NAME --trt`")


def replace_record(records: Iterable[dict], new: dict) -> list[dict]:
    """``records`` with ``new`` added, replacing an engine of the same key."""
    return [r for r in records if r.get("key") != new["key"]] + [new]


def plan_chunks(n: int, profile: BatchProfile) -> list[tuple[int, int, int]]:
    """Split a batch of ``n`` into engine calls ``(start, stop, run_size)``: at most ``profile.max`` images
    each; a call smaller than ``profile.min`` is zero-padded up to ``run_size = profile.min``."""
    if n < 1:
        raise ValueError(f"batch of {n} images; expected at least 1")
    out = []
    for start in range(0, n, profile.max):
        stop = min(start + profile.max, n)
        out.append((start, stop, max(stop - start, profile.min)))
    return out
