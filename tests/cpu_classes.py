"""The CPU-dependent tests on every x86 CPU class this machine can reach (``make test-cpu-classes``).

    python -m tests.cpu_classes                      # every class, the CPU-dependent test files
    python -m tests.cpu_classes --classes avx2 avx512 -- -k int8

oneDNN, the kernels of PyTorch and OpenVINO's CPU plugin, is capped with ``ONEDNN_MAX_CPU_ISA`` (and imgembed's
host probe reads the same cap, :mod:`imgembed.runtime.host`); ONNX Runtime ignores that cap, so its AVX2-only
kernels run under ``qemu-x86_64 -cpu Haswell`` (tests/test_emulated_avx2.py and the emulated test of
tests/test_int8_portability.py; they skip where qemu-user is not installed). Classes above this CPU's own
cannot be reached and are reported as such. Prints one row per class: passed, skipped, failed, wall time;
exits 1 when a test failed in any class.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CPU_TESTS = ("tests/test_bench_peers.py", "tests/test_text_tower.py", "tests/test_int8_portability.py",
             "tests/test_torch_precisions.py", "tests/test_engines.py", "tests/test_runtime_conformance.py",
             "tests/test_outliers.py", "tests/test_equalize.py", "tests/test_export.py", "tests/test_roofline.py")
EMULATED = ("tests/test_emulated_avx2.py", "tests/test_int8_portability.py::"
            "test_the_7bit_onnxruntime_engine_is_exact_on_an_emulated_avx2_cpu")
# name -> (what it is, ONEDNN_MAX_CPU_ISA or None for this CPU's own, the flags it needs here, test files)
CLASSES: dict[str, tuple[str, str | None, tuple[str, ...], tuple[str, ...]]] = {
    "avx2": ("AVX2 only (oneDNN capped)", "AVX2", ("avx2",), CPU_TESTS),
    "avx2-onnxruntime": ("AVX2 only (ONNX Runtime under qemu -cpu Haswell)", None, ("avx2",), EMULATED),
    "avx512": ("AVX-512 without VNNI (oneDNN capped)", "AVX512_CORE", ("avx512f",), CPU_TESTS),
    "avx512-vnni": ("AVX-512 VNNI (oneDNN capped)", "AVX512_CORE_VNNI", ("avx512_vnni",), CPU_TESTS),
    "host": ("this CPU, uncapped", None, (), CPU_TESTS),
}


def run_class(name: str, extra: list[str]) -> dict:
    """Run one class's tests in a pytest subprocess; its counts from the JUnit XML report."""
    from imgembed.runtime.host import cpu_info

    what, isa, needs, tests = CLASSES[name]
    simd = cpu_info(capped=False)["simd"]
    missing = [f for f in needs if not simd.get(f)]
    if missing:
        return {"class": name, "what": what, "unreachable": f"this CPU lacks {', '.join(missing)}"}
    env = {k: v for k, v in os.environ.items() if k not in ("ONEDNN_MAX_CPU_ISA", "IMGEMBED_CPU_FLAGS")}
    if isa:
        env["ONEDNN_MAX_CPU_ISA"] = isa
    with tempfile.TemporaryDirectory(prefix="imgembed-cpu-class-") as tmp:
        xml = Path(tmp) / "junit.xml"
        start = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rsfE", "-p", "no:cacheprovider",
                               f"--junitxml={xml}", *tests, *extra], cwd=REPO, env=env)
        wall = time.monotonic() - start
        counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
        if xml.is_file():
            for suite in ET.parse(xml).getroot().iter("testsuite"):
                for key in counts:
                    counts[key] += int(suite.get(key, 0))
    failed = counts["failures"] + counts["errors"]
    return {"class": name, "what": what, "isa": isa or "-", "passed": counts["tests"] - failed - counts["skipped"],
            "skipped": counts["skipped"], "failed": failed, "wall_s": round(wall, 1), "rc": proc.returncode}


def table(rows: list[dict]) -> str:
    lines = ["| class | ONEDNN_MAX_CPU_ISA | passed | skipped | failed | wall (s) |", "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        if "unreachable" in r:
            lines.append(f"| {r['what']} | – | – | – | – | {r['unreachable']} |")
        else:
            lines.append(f"| {r['what']} | {r['isa']} | {r['passed']} | {r['skipped']} | {r['failed']} "
                         f"| {r['wall_s']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--classes", nargs="+", choices=list(CLASSES), default=list(CLASSES))
    ap.add_argument("pytest_args", nargs="*", help="after --: passed to pytest (e.g. -k int8 -x)")
    args = ap.parse_args(argv)
    rows = []
    for name in args.classes:
        print(f"== {name}: {CLASSES[name][0]}", flush=True)
        rows.append(run_class(name, args.pytest_args))
        print(table(rows[-1:]), flush=True)
    print("\n" + table(rows))
    bad = [r for r in rows if r.get("failed") or r.get("rc") not in (None, 0, 5)]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
