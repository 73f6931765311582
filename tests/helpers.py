"""Shared test helpers (fixtures live in conftest.py); holds no tests itself.

The CLI through subprocesses (:func:`run_cli`, :func:`start_cli`, :func:`cli_env`), one cosine similarity,
leftover inspection of artifact writers, GPU detection, and an exporter for script use.
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

import numpy as np

REPO = Path(__file__).resolve().parents[1]


@lru_cache(maxsize=None)
def exported(name: str, precision: str = "fp32") -> Path:
    """An artifact of registry model ``name``, exported once per process into a temporary directory
    removed at exit (for scripts; tests use conftest's ``artifact_dir`` fixture)."""
    from imgembed.export.pipeline import ExportOptions, export_model

    work = Path(tempfile.mkdtemp(prefix="imgembed-tests-"))
    atexit.register(shutil.rmtree, work, ignore_errors=True)
    out = work / f"{name}-{precision}"
    export_model(name, out, ExportOptions(precision=precision, random_init=True, speed_check=False))
    return out


def cli_env(**extra: str) -> dict[str, str]:
    """Environment for ``python -m imgembed.cli`` subprocesses: offline, the repo importable, help text
    200 columns wide (no wrapping inside asserted phrases); ``extra`` overrides (e.g. OMP_NUM_THREADS)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", COLUMNS="200", PYTHONDONTWRITEBYTECODE="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(extra)
    return env


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 600,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m imgembed.cli ARGS`` to completion, output captured as text."""
    return subprocess.run([sys.executable, "-m", "imgembed.cli", *args], capture_output=True, text=True,
                          cwd=cwd, env=env or cli_env(), timeout=timeout)


def start_cli(*args: str, env: dict[str, str] | None = None, **kw) -> subprocess.Popen:
    """Start ``python -m imgembed.cli ARGS`` (one thread by default) with stdout and stderr piped (step lines
    are read from stderr)."""
    return subprocess.Popen([sys.executable, "-m", "imgembed.cli", *args], cwd=REPO,
                            env=env or cli_env(OMP_NUM_THREADS="1"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def hidden_leftovers(out: Path) -> list[str]:
    """Names of the hidden siblings of ``out`` other than its lock file."""
    return sorted(p.name for p in out.parent.iterdir()
                  if p.name.startswith(f".{out.name}.") and p.name != f".{out.name}.lock")


def external_data_model(directory: Path, location: str) -> Path:
    """``directory/model.onnx``: a one-node ONNX model (y = x + w) whose initializer ``w`` lives in external
    data at ``location``."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.arange(4, dtype=np.float32).reshape(1, 4), "w")
    w.ClearField("raw_data")
    w.data_location = TensorProto.EXTERNAL
    for key, value in {"location": location, "offset": "0", "length": "16"}.items():
        entry = w.external_data.add()
        entry.key, entry.value = key, value
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4])
    graph = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "g", [x], [y], [w])
    path = directory / "model.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def unbuildable_here() -> set[str]:
    """The reasons an export race gives for candidates this host cannot build (``why_not`` of such rows): the
    CPU lacks BF16 instructions, OpenVINO is not installed. Empty where every candidate can be built."""
    from imgembed.runtime.backends import get_backend
    from imgembed.runtime.host import missing_bf16_instructions

    return {r for r in (missing_bf16_instructions(), get_backend("openvino").unavailable("cpu")) if r}


def cosine(a, b):
    """Cosine similarity along the last axis, in float64: a float for two vectors, one value per row for
    two matrices."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    cos = np.sum(a * b, axis=-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    return float(cos) if cos.ndim == 0 else cos


def gpu_available() -> bool:
    """True when torch sees a CUDA device (GPU tests skip otherwise)."""
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def post_json(client, path: str, payload) -> tuple[int, dict, dict]:
    """POST ``payload`` as JSON with an :class:`~imgembed.serve.client.EmbeddingClient`: (status, headers,
    the decoded JSON answer)."""
    import json

    status, headers, body = client.post_json(path, payload)
    return status, headers, json.loads(body)


def minimal_manifest(**changes) -> dict:
    """The smallest valid format-2 manifest (one ONNX Runtime engine, ``model.onnx``); ``files`` empty."""
    return {"format_version": 2, "status": "passed", "name": "m", "model": {},
            "source": {"kind": "random-init", "seed": 0, "arch": {}}, "precision": "fp32",
            "input": {"name": "pixel_values", "dtype": "float32", "shape": [None, 3, 8, 8], "layout": "NCHW"},
            "output": {"dim": 1, "normalized": False},
            "preprocess": {"processor": "CLIPImageProcessor", "size": {"shortest_edge": 8}, "resample": "bicubic",
                           "image_mean": [0.0, 0.0, 0.0], "image_std": [1.0, 1.0, 1.0]},
            "default_engine": "onnxruntime",
            "engines": [{"id": "onnxruntime", "backend": "onnxruntime", "precision": "fp32",
                         "files": {"model": "model.onnx"}}],
            "files": {}, **changes}


def manifest_json(artifact) -> dict:
    """The artifact's ``manifest.json`` as written (the format-2 JSON a reader in any language sees);
    ``artifact`` is a directory or an export result."""
    import json as _json

    path = Path(getattr(artifact, "path", artifact))
    return _json.loads((path / "manifest.json").read_text(encoding="utf-8"))
