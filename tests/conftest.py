"""Shared fixtures: tiny exported artifacts (built once per session). Helper functions: tests/helpers.py.

Tier 0: tiny random-init models (test-*-tiny in models.yaml), seconds each.
Tier 1 (marker `slow`, still in the default run): full-size architectures with random weights.
GPU tests (marker `gpu`) skip cleanly where no CUDA device is present.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest

from tests.helpers import gpu_available  # noqa: F401 - re-exported: `from .conftest import gpu_available`

os.environ.setdefault("HF_HUB_OFFLINE", "1")        # tests never touch the network
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

TINY = ("test-clip-tiny", "test-vit-tiny", "test-dinov2-tiny", "test-resnet-tiny")


@pytest.fixture(scope="session")
def artifact_dir(tmp_path_factory):
    """``artifact_dir(name, precision, backend="onnxruntime")`` -> path of a random-init artifact, exported once
    per session with only that backend's candidates (``backend=None`` races every installed backend; the race
    itself is tested in tests/test_engines.py)."""
    from imgembed.export.pipeline import ExportOptions

    return _cached_exports(tmp_path_factory.mktemp("artifacts"), lambda name, precision, backend: ExportOptions(
        precision=precision, random_init=True, speed_check=False, backend=backend))


def _cached_exports(root: Path, options):
    """``get(name, precision="fp32", backend="onnxruntime")`` exporting each key once into ``root`` with
    ``options(name, precision, backend)`` (an ExportOptions)."""
    from imgembed.export.pipeline import export_model

    cache: dict[tuple[str, str, str | None], Path] = {}

    def get(name: str, precision: str = "fp32", backend: str | None = "onnxruntime") -> Path:
        key = (name, precision, backend)
        if key not in cache:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Int8SlowerWarning is expected on toy models
                suffix = "" if backend == "onnxruntime" else f"-{backend or 'race'}"
                res = export_model(name, root / f"{name}-{precision}{suffix}", options(name, precision, backend))
            cache[key] = res.path
        return cache[key]

    return get


@pytest.fixture(scope="session")
def text_checkpoint(tmp_path_factory):
    """``text_checkpoint(name)`` -> a full image-text checkpoint directory (random weights, a tokenizer trained
    here in the family's format; imgembed.testing.text), written once per session."""
    from imgembed.testing.text import write_image_text_checkpoint

    root = tmp_path_factory.mktemp("text-checkpoints")
    cache: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in cache:
            cache[name] = write_image_text_checkpoint(name, root / name)
        return cache[name]

    return get


@pytest.fixture(scope="session")
def text_artifact(tmp_path_factory, text_checkpoint):
    """``text_artifact(name, precision="fp32", backend="onnxruntime")`` -> an artifact with image and text
    towers, exported once per session from :func:`text_checkpoint` (``backend=None`` races every backend)."""
    from imgembed.export.pipeline import ExportOptions

    return _cached_exports(tmp_path_factory.mktemp("text-artifacts"), lambda name, precision, backend: ExportOptions(
        precision=precision, weights=text_checkpoint(name), text=True, speed_check=backend is None, backend=backend))
