"""What a runner is fed: the one place that decides between uint8 crops and float pixels.

Every path (the Embedder, serving, benchmarks, the export's parity gate) turns images into uint8
``(N, H, W, 3)`` model-size crops first; :func:`model_input` then gives a runner what it takes: the crops as
they are for a uint8-input artifact (its graph resizes nothing and normalises itself), float32 NCHW pixels
normalised exactly as the HF processor does for every other runner.
"""
from __future__ import annotations

import numpy as np

from imgembed.preprocess import PreprocessSpec
from imgembed.preprocess.fast import crops_to_pixels
from imgembed.runtime.base import Runner


def takes_crops(runner: Runner) -> bool:
    """True when ``runner`` takes uint8 NHWC crops (a uint8-input artifact), False for float32 NCHW pixels."""
    return runner.input_spec.dtype == "uint8"


def model_input(runner: Runner, crops: np.ndarray, preprocess: PreprocessSpec) -> np.ndarray:
    """``runner``'s input for uint8 ``(N, H, W, 3)`` crops: the crops, or their normalised float32 NCHW pixels."""
    return crops if takes_crops(runner) else crops_to_pixels(crops, preprocess)
