"""The parity images and the PyTorch original's embeddings of them, computed once per gate.

The export's engine race (TensorRT plans included, :func:`~imgembed.export.add_plan.add_engine` too) and
``imgembed parity`` (:func:`~imgembed.export.pipeline.recheck_artifact`) all compare against
:func:`reference_set`, so they judge engines against the same reference.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from imgembed.gate.parity import run_batched
from imgembed.gate.samples import parity_images
from imgembed.models.registry import ModelSpec
from imgembed.preprocess import PreprocessSpec
from imgembed.preprocess.fast import crops_of, crops_to_pixels
from imgembed.runtime.base import Runner
from imgembed.runtime.inputs import model_input
from imgembed.runtime.runners.pytorch import TorchRunner

REFERENCE_BATCH = 8


@dataclass(frozen=True)
class ParitySet:
    """The parity images, prepared once: names, uint8 crops, float pixels, and the original's embeddings."""

    names: tuple[str, ...]
    crops: np.ndarray       # (N, H, W, 3) uint8: input of uint8 artifacts
    pixels: np.ndarray      # (N, 3, H, W) float32: the same crops normalised (identical to preprocess_batch)
    reference: np.ndarray   # (N, dim) float32: the PyTorch original's embeddings of ``pixels``
    preprocess: PreprocessSpec

    def inputs(self, runner: Runner) -> np.ndarray:
        """The parity images as ``runner`` takes them (see :func:`imgembed.runtime.inputs.model_input`)."""
        return model_input(runner, self.crops, self.preprocess)


def reference_set(head, spec: ModelSpec, threads: int | None, images=None) -> ParitySet:
    """Prepare the parity images once and embed them with the original ``head`` (batches of 8).

    ``images``: (name, PIL image) pairs to use instead of the built-in parity set (``parity --images DIR``).
    """
    pairs = parity_images() if images is None else tuple(images)
    names, images = tuple(n for n, _ in pairs), [im for _, im in pairs]
    crops = crops_of(images, spec.preprocess)
    pixels = crops_to_pixels(crops, spec.preprocess)
    with TorchRunner(head, spec.input_hw, spec.embedding.dim, threads=threads) as runner:
        reference = run_batched(runner, pixels, REFERENCE_BATCH)
    return ParitySet(names, crops, pixels, reference, spec.preprocess)
