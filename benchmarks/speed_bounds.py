"""Wall-clock bounds, kept out of the unit tests (they depend on the machine and on its load).

Not collected by ``pytest benchmarks`` (the file name does not start with ``test_``); run it on a quiet
machine with::

    python -m pytest benchmarks/speed_bounds.py -q

- fast decoding (JPEG DCT scaling) is more than twice as fast as exact decoding on 3 MP JPEGs;
- the decode/inference pipeline overlaps them: wall time well under their sum;
- preprocessing a 1 x 1,000,000 px image takes under 5 s (no full-size resize).
"""
from __future__ import annotations

import io
import time

import numpy as np
from PIL import Image

from imgembed.gate.samples import parity_images
from imgembed.models.registry import get_spec
from imgembed.preprocess import load_image, preprocess
from imgembed.preprocess.fast import load_crop
from imgembed.runtime.pipeline import pipelined_batches


def _jpeg_bytes(img: Image.Image, megapixels: float) -> bytes:
    """``img`` upscaled (bicubic) to about ``megapixels`` and saved as a JPEG (quality 90)."""
    img = img.convert("RGB")
    s = (megapixels * 1e6 / (img.width * img.height)) ** 0.5
    buf = io.BytesIO()
    img.resize((round(img.width * s), round(img.height * s)), Image.BICUBIC).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def test_fast_decoding_is_faster_on_3mp_jpegs():
    spec = get_spec("clip-vit-b32").preprocess
    data = [_jpeg_bytes(img, 3.0) for _, img in parity_images()[:3]]

    def best(mode: str) -> float:
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            for d in data:
                load_crop(d, spec, mode)
            times.append(time.perf_counter() - t0)
        return min(times)

    exact, fast = best("exact"), best("fast")
    assert exact / fast > 2.0, f"fast {fast * 1e3:.0f} ms vs exact {exact * 1e3:.0f} ms for 3 images"


def test_decode_overlaps_inference_in_wall_time():
    """Decoding in 2 threads while 'inference' sleeps: wall time ~ max(decode, infer), not their sum."""
    def prepare(x):
        time.sleep(0.02)
        return x

    def infer(inputs):
        time.sleep(0.02 * len(inputs) / 2)
        return np.zeros((len(inputs), 1), np.float32)

    t0 = time.perf_counter()
    list(pipelined_batches(prepare, infer, range(24), batch_size=4, workers=2))
    parallel = time.perf_counter() - t0
    serial = 24 * 0.02 + 24 * 0.01  # 0.72 s with no overlap
    assert parallel < 0.75 * serial, f"{parallel:.3f} s vs {serial:.3f} s serial"


def test_extreme_aspect_ratio_preprocesses_in_under_5_seconds():
    line = np.zeros((1, 1_000_000, 3), np.uint8)
    line[:, 500_000 - 8:500_000 + 8] = 255
    t0 = time.perf_counter()
    preprocess(load_image(line), get_spec("test-clip-tiny").preprocess)
    assert time.perf_counter() - t0 < 5
