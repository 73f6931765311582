"""Shared helpers of the hardening suite (tests/test_hardening_*.py); holds no tests itself.

Subprocess helpers for the CLI, leftover inspection, cosine similarity, and an exporter for script use.
"""
from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from functools import lru_cache
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@lru_cache(maxsize=None)
def exported(name: str, precision: str = "fp32") -> Path:
    """An artifact of registry model ``name``, exported once per process into a temporary directory
    removed at exit (for scripts; tests use conftest's ``artifact_dir`` fixture)."""
    from imgembed.export.pipeline import ExportOptions, export_model

    work = Path(tempfile.mkdtemp(prefix="imgembed-hardening-"))
    atexit.register(shutil.rmtree, work, ignore_errors=True)
    out = work / f"{name}-{precision}"
    export_model(name, out, ExportOptions(precision=precision, random_init=True, speed_check=False))
    return out


def cli_env() -> dict[str, str]:
    """Environment for ``python -m imgembed.cli`` subprocesses: the repo importable, few threads."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    return env


def start_cli(*args: str, **kw) -> subprocess.Popen:
    """Start ``python -m imgembed.cli ARGS`` with stderr piped (step lines are read from it)."""
    return subprocess.Popen([sys.executable, "-m", "imgembed.cli", *args], cwd=REPO, env=cli_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def hidden_leftovers(out: Path) -> list[str]:
    """Names of the hidden siblings of ``out`` other than its lock file."""
    return sorted(p.name for p in out.parent.iterdir()
                  if p.name.startswith(f".{out.name}.") and p.name != f".{out.name}.lock")


def cosine(a, b) -> float:
    """Cosine similarity of two vectors."""
    import numpy as np

    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
