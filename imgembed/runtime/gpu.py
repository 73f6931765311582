"""What GPU this is: name, compute capability, driver, memory and clocks (torch and ``nvidia-smi``).

Used by the benchmark report (``host.gpu``) and by TensorRT engine keys (an engine runs only on the GPU
model and TensorRT version it was built with). Everything here degrades to ``None`` / ``[]`` on a machine
without a GPU, torch or ``nvidia-smi``; nothing imports torch at module import time.
"""
from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass

from imgembed.errors import BackendUnavailableError

# nvidia-smi --query-gpu fields, in the order asked for; "nounits" strips MiB / MHz / W suffixes.
NVIDIA_SMI_FIELDS = ("index", "name", "driver_version", "memory.total", "memory.used", "clocks.sm",
                     "clocks.max.sm", "clocks.mem", "clocks.max.mem", "compute_cap", "power.limit", "pstate")
_NUMERIC = {"index": int, "memory.total": float, "memory.used": float, "clocks.sm": float, "clocks.max.sm": float,
            "clocks.mem": float, "clocks.max.mem": float, "power.limit": float}
_MISSING = {"", "[N/A]", "N/A", "[Not Supported]", "Not Supported", "[Unknown Error]"}


@dataclass(frozen=True)
class GpuIdentity:
    """What a TensorRT engine is tied to: the GPU model name and its compute capability."""

    name: str
    compute_capability: str   # "9.0"

    def to_dict(self) -> dict:
        return {"name": self.name, "compute_capability": self.compute_capability}


def parse_nvidia_smi_csv(text: str, fields: tuple[str, ...] = NVIDIA_SMI_FIELDS) -> list[dict]:
    """Rows of ``nvidia-smi --query-gpu=<fields> --format=csv,noheader,nounits`` as dicts.

    Numbers become int/float, ``[N/A]``-style cells become None; a row with the wrong number of cells is a
    ValueError naming the row and the fields expected (nvidia-smi changed its output: better loud than wrong).
    """
    rows = []
    for line in text.splitlines():
        if not line.strip():
            continue
        cells = [c.strip() for c in line.split(",")]
        if len(cells) != len(fields):
            raise ValueError(f"nvidia-smi row {line!r} has {len(cells)} cells; expected {len(fields)} "
                             f"({', '.join(fields)})")
        rows.append({f: _cell(f, c) for f, c in zip(fields, cells, strict=True)})
    return rows


def _cell(field: str, value: str):
    if value in _MISSING:
        return None
    convert = _NUMERIC.get(field)
    if convert is None:
        return value
    try:
        return convert(float(value)) if convert is int else convert(value)
    except ValueError:
        return None


def nvidia_smi(timeout: float = 10.0) -> list[dict] | None:
    """Per-GPU driver, memory and clocks from ``nvidia-smi``; None when it is missing or fails."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    cmd = [exe, f"--query-gpu={','.join(NVIDIA_SMI_FIELDS)}", "--format=csv,noheader,nounits"]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=True)
        return parse_nvidia_smi_csv(done.stdout)
    except (OSError, subprocess.SubprocessError, ValueError):
        return None


def torch_devices() -> list[dict]:
    """Every CUDA device torch sees (name, memory, compute capability, SMs); [] without torch or CUDA."""
    try:
        import torch
    except ImportError:
        return []
    if not torch.cuda.is_available():
        return []
    out = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        out.append({"index": i, "name": p.name, "memory_gib": round(p.total_memory / 2**30, 1),
                    "compute_capability": f"{p.major}.{p.minor}", "multiprocessors": p.multi_processor_count})
    return out


def gpu_report() -> dict | None:
    """GPU block of a benchmark report: torch's view of device 0 plus nvidia-smi's driver, memory and clocks
    for every GPU; None on a machine without a CUDA device visible to torch."""
    devices = torch_devices()
    if not devices:
        return None
    import torch

    smi = nvidia_smi()
    first = devices[0]
    report = {"name": first["name"], "memory_gib": first["memory_gib"], "compute_capability":
              first["compute_capability"], "cuda": torch.version.cuda, "count": len(devices), "devices": devices,
              "driver": None, "clocks_mhz": None, "nvidia_smi": smi}
    if smi:
        row = smi[0]
        report["driver"] = row["driver_version"]
        report["clocks_mhz"] = {"sm": row["clocks.sm"], "sm_max": row["clocks.max.sm"], "mem": row["clocks.mem"],
                                "mem_max": row["clocks.max.mem"]}
    return report


def current_gpu(index: int = 0) -> GpuIdentity:
    """The identity of CUDA device ``index`` (what engines are keyed by); BackendUnavailableError without one."""
    devices = torch_devices()
    if index >= len(devices):
        raise BackendUnavailableError(f"no CUDA device {index} (torch sees {len(devices)}); TensorRT engines "
                                      "need an NVIDIA GPU and a CUDA build of torch")
    d = devices[index]
    return GpuIdentity(d["name"], d["compute_capability"])


def describe_gpu(report: dict | None) -> str:
    """One line for a markdown report: ``NVIDIA H100 80GB HBM3 (sm 9.0, 79.1 GiB, driver 550.54, CUDA 12.4,
    SM 1980/1980 MHz, memory 2619/2619 MHz)``; "none" without a GPU."""
    if not report:
        return "none"
    parts = [f"sm {report['compute_capability']}"] if report.get("compute_capability") else []
    parts.append(f"{report.get('memory_gib')} GiB")
    if report.get("driver"):
        parts.append(f"driver {report['driver']}")
    parts.append(f"CUDA {report.get('cuda')}")
    clocks = report.get("clocks_mhz") or {}
    if clocks.get("sm") is not None:
        parts.append(f"SM {clocks['sm']:g}/{clocks.get('sm_max') or 0:g} MHz")
    if clocks.get("mem") is not None:
        parts.append(f"memory {clocks['mem']:g}/{clocks.get('mem_max') or 0:g} MHz")
    count = report.get("count") or 1
    return f"{report['name']}{f' x{count}' if count > 1 else ''} ({', '.join(parts)})"
