"""What machine this is: CPU model, cores, SIMD features, GPU, library versions.

Exports record it next to every measured number, engine choices that depend on the CPU (BF16, INT8 kernels)
are probed with it, and benchmark reports carry it in their ``host`` block.

SIMD features decide what INT8 can gain on a CPU: VNNI (AVX512_VNNI or AVX-VNNI) gives ONNX Runtime's
integer kernels a fused multiply-add on int8, AMX gives tile matrix units; without them INT8 often gains
little over FP32. Flags come from ``/proc/cpuinfo`` (Linux) or py-cpuinfo elsewhere, capped by
``ONEDNN_MAX_CPU_ISA`` when it is set: oneDNN, the kernel library of PyTorch and OpenVINO's CPU plugin, then uses
no instruction above that level, so BF16, VNNI and AMX count as absent for those engines. ONNX Runtime's own
kernels (MLAS) ignore the cap: ``int8_kernels("onnxruntime")`` reads the uncapped flags.
"""
from __future__ import annotations

import os
import platform
from importlib import metadata
from pathlib import Path

# Report key -> CPU flags that imply it (Linux /proc/cpuinfo and py-cpuinfo spellings).
SIMD_FLAGS: dict[str, tuple[str, ...]] = {
    "sse4_2": ("sse4_2",),
    "avx": ("avx",),
    "avx2": ("avx2",),
    "fma": ("fma",),
    "avx512f": ("avx512f",),
    "avx512_vnni": ("avx512_vnni", "avx512vnni"),
    "avx_vnni": ("avx_vnni", "avxvnni"),
    "avx512_bf16": ("avx512_bf16",),
    "amx_tile": ("amx_tile",),
    "amx_int8": ("amx_int8",),
    "amx_bf16": ("amx_bf16",),
    "neon": ("asimd", "neon"),
    "arm_dotprod": ("asimddp", "dotprod"),
    "arm_i8mm": ("i8mm",),
    "sve": ("sve",),
}
LIBRARIES = ("imgembed", "torch", "onnxruntime", "onnxruntime-gpu", "onnx", "openvino", "nncf", "transformers",
             "numpy", "pillow", "tensorrt", "tensorrt-cu12", "tensorrt-cu13")
CPU_FLAGS_ENV = "IMGEMBED_CPU_FLAGS"
# Instructions that make BF16 inference fast on a CPU (AVX512_BF16 or AMX-BF16).
BF16_FEATURES = ("avx512_bf16", "amx_bf16")
# x86 instructions that multiply uint8 x int8 and accumulate in int32 (VNNI, AMX-INT8). Without them the int8
# kernels of ONNX Runtime (MLAS) and OpenVINO (oneDNN) use VPMADDUBSW, which adds pairs of 8-bit products in
# int16 with saturation: with full-range 8-bit weights the sums clip and vectors drift (7-bit weights are exact).
INT8_DOT_FEATURES = ("avx512_vnni", "avx_vnni", "amx_int8")
X86_ARCHES = ("x86_64", "amd64", "i386", "i686", "x86")
ONEDNN_ISA_ENV = "ONEDNN_MAX_CPU_ISA"
# ONEDNN_MAX_CPU_ISA value -> the features of SIMD_FLAGS above plain SSE that oneDNN may still use (oneDNN's
# cpu_isa_t bit sets: AVX512_CORE has no VNNI, AVX512_CORE_VNNI includes AVX-VNNI, AMX comes with the AMX levels).
_AVX2 = ("avx", "avx2", "fma")
_AVX512_VNNI = (*_AVX2, "avx512f", "avx512_vnni", "avx_vnni")
_AVX512_BF16 = (*_AVX512_VNNI, "avx512_bf16")
_AMX = (*_AVX512_BF16, "amx_tile", "amx_int8", "amx_bf16")
ONEDNN_ISA_FEATURES: dict[str, tuple[str, ...]] = {
    "SSE41": (), "AVX": ("avx",), "AVX2": _AVX2, "AVX2_VNNI": (*_AVX2, "avx_vnni"),
    "AVX2_VNNI_2": (*_AVX2, "avx_vnni"), "AVX512_CORE": (*_AVX2, "avx512f"), "AVX512_CORE_VNNI": _AVX512_VNNI,
    "AVX512_CORE_BF16": _AVX512_BF16, "AVX512_CORE_FP16": _AVX512_BF16, "AVX10_1_512": _AVX512_BF16,
    "AVX10_2_512": _AVX512_BF16, "AVX512_CORE_AMX": _AMX, "AVX512_CORE_AMX_FP16": _AMX, "AVX10_1_512_AMX": _AMX,
    "AVX10_1_512_AMX_FP16": _AMX, "AVX10_2_512_AMX_2": _AMX}
_ONEDNN_CAPPED = frozenset(_AMX)  # the features a cap can take away


def parse_cpuinfo(text: str) -> dict:
    """CPU model name, flag set and physical core count from the text of ``/proc/cpuinfo``."""
    model, flags, cores = None, set(), set()
    physical_id = core_id = None
    for line in text.splitlines():
        key, _, value = (part.strip() for part in line.partition(":"))
        if key in ("model name", "Model", "cpu model") and model is None:
            model = value
        elif key in ("flags", "Features") and not flags:
            flags = set(value.split())
        elif key == "physical id":
            physical_id = value
        elif key == "core id":
            core_id = value
        elif not key and physical_id is not None and core_id is not None:
            cores.add((physical_id, core_id))
            physical_id = core_id = None
    if physical_id is not None and core_id is not None:
        cores.add((physical_id, core_id))
    return {"model": model, "flags": flags, "physical_cores": len(cores) or None}


def simd_features(flags: set[str]) -> dict[str, bool]:
    """Which of :data:`SIMD_FLAGS` a flag set has."""
    return {name: any(f in flags for f in aliases) for name, aliases in SIMD_FLAGS.items()}


def onednn_isa_cap(flags: set[str], isa: str | None) -> set[str]:
    """``flags`` without those above the oneDNN ISA level ``isa`` (an ``ONEDNN_MAX_CPU_ISA`` value; None, empty,
    ``ALL``, ``DEFAULT`` or a value oneDNN does not know leave them as they are, as oneDNN does)."""
    allowed = ONEDNN_ISA_FEATURES.get((isa or "").strip().upper())
    if allowed is None:
        return set(flags)
    dropped = {alias for name in _ONEDNN_CAPPED - set(allowed) for alias in SIMD_FLAGS[name]}
    return set(flags) - dropped


def _cpu_flags(capped: bool = True) -> dict:
    """Model, flags and physical cores of this CPU (:func:`_detected_flags`); with ``capped``, without the flags
    above ``ONEDNN_MAX_CPU_ISA``.

    ``IMGEMBED_CPU_FLAGS`` (comma-separated flags) replaces the detected flag set, capped or not: it makes
    imgembed choose engines as on another CPU (for example ``avx2,fma`` for an AVX2-only host)."""
    info = _detected_flags()
    override = os.environ.get(CPU_FLAGS_ENV)
    if override is not None:
        return {**info, "flags": {f.strip() for f in override.split(",") if f.strip()}, "flags_source": CPU_FLAGS_ENV}
    isa = os.environ.get(ONEDNN_ISA_ENV)
    if capped and onednn_isa_cap(info["flags"], isa) != info["flags"]:
        info = {**info, "flags": onednn_isa_cap(info["flags"], isa),
                "flags_source": f"{info['flags_source']} capped by {ONEDNN_ISA_ENV}={isa}"}
    return info


def _detected_flags() -> dict:
    """Model, flags and physical cores from /proc/cpuinfo, else py-cpuinfo, else what platform knows, with
    where they came from."""
    path = Path("/proc/cpuinfo")
    if path.is_file():
        info = parse_cpuinfo(path.read_text(encoding="utf-8", errors="replace"))
        info["flags_source"] = "/proc/cpuinfo"
        if info["flags"]:
            return info
    try:
        import cpuinfo  # py-cpuinfo, from the [bench] extra

        raw = cpuinfo.get_cpu_info()
        return {"model": raw.get("brand_raw"), "flags": set(raw.get("flags", [])), "physical_cores": None,
                "flags_source": "py-cpuinfo"}
    except Exception:  # py-cpuinfo missing or failing: report what is known
        return {"model": platform.processor() or None, "flags": set(), "physical_cores": None,
                "flags_source": "unavailable"}


def cpu_info(capped: bool = True) -> dict:
    """CPU model, architecture, core counts (logical, usable by this process, physical) and SIMD features
    (``capped``: those oneDNN may use under ``ONEDNN_MAX_CPU_ISA``; else all the CPU has)."""
    info = _cpu_flags(capped)
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"model": info["model"], "arch": platform.machine(), "logical_cores": os.cpu_count(),
            "usable_cores": usable, "physical_cores": info["physical_cores"],
            "simd": simd_features(info["flags"]), "flags_source": info["flags_source"]}


def missing_bf16_instructions() -> str | None:
    """None when this CPU has native BF16 instructions, else a sentence naming what is missing."""
    info = cpu_info()
    simd = info["simd"]
    if any(simd.get(f) for f in BF16_FEATURES):
        return None
    return (f"this CPU ({_cpu_name(info)}) lacks native BF16 instructions "
            f"(needs AVX512_BF16 or AMX-BF16; has {', '.join(k for k, v in simd.items() if v) or 'none detected'})")


def _cpu_name(info: dict) -> str:
    """The model, and the cap or simulation its flags went through, for messages."""
    source = info["flags_source"]
    how = f", {source}" if ONEDNN_ISA_ENV in source or source == CPU_FLAGS_ENV else ""
    return f"{info['model'] or 'unknown model'}{how}"


def int8_kernels(backend: str | None = None) -> str:
    """How this CPU's int8 GEMM kernels add 8-bit products: ``"vnni"`` (x86 with VNNI/AMX-INT8, exact int32
    sums), ``"saturating"`` (x86 without them: int16 pair sums that clip for full-range 8-bit weights) or
    ``"other"`` (not x86). ``backend="onnxruntime"``: ONNX Runtime's kernels, which ignore ``ONEDNN_MAX_CPU_ISA``;
    any other: oneDNN's (OpenVINO, PyTorch), which honour it."""
    info = cpu_info(capped=backend != "onnxruntime")
    if str(info["arch"]).lower() not in X86_ARCHES:
        return "other"
    return "vnni" if any(info["simd"].get(f) for f in INT8_DOT_FEATURES) else "saturating"


def int8_saturation(backend: str | None = None) -> str | None:
    """None unless ``backend``'s int8 kernels (:func:`int8_kernels`) lack VNNI/AMX-INT8 here, else a sentence
    saying what that means for INT8."""
    if int8_kernels(backend) != "saturating":
        return None
    name = _cpu_name(cpu_info(capped=backend != "onnxruntime"))
    return (f"this CPU ({name}) lacks VNNI (AVX512_VNNI, AVX-VNNI or AMX-INT8): "
            "its int8 kernels add pairs of 8-bit products in int16 and saturate with full-range 8-bit weights")


def cpu_summary() -> dict:
    """Model and the SIMD features present, for manifests and export tables."""
    info = cpu_info()
    return {"model": info["model"], "arch": info["arch"], "flags": sorted(k for k, v in info["simd"].items() if v)}


def library_versions() -> dict[str, str | None]:
    """Installed versions of the libraries that decide the speed (None when not installed)."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def gpu_info() -> dict | None:
    """The CUDA GPU torch sees (name, memory, compute capability, CUDA version, count) plus the driver,
    memory and clocks of every GPU from ``nvidia-smi`` when present; None without a CUDA device."""
    from imgembed.runtime.gpu import gpu_report

    return gpu_report()


def host_info() -> dict:
    """Everything above, plus OS, ONNX Runtime execution providers and the 1/5/15-minute load average (other
    work on the machine skews timings): the report's ``host`` block."""
    from imgembed.runtime.runners.onnxruntime import available_providers

    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"hostname": platform.node(), "os": f"{platform.system()} {platform.release()}",
            "cpu": cpu_info(), "gpu": gpu_info(), "onnxruntime_providers": available_providers(),
            "libraries": library_versions(),
            "load_average": None if load is None else [round(x, 2) for x in load]}


def default_threads() -> int:
    """All cores this process may use (the default for ``--threads``)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
