"""Property-based fuzzing of decode + preprocess (hypothesis).

For every input -- random bytes, mutated valid JPEG/PNG/GIF/WebP/BMP/TIFF files, PNG headers with any
declared size / bit depth / colour type, random arrays of any dtype and shape, PIL images of every mode --
the only allowed outcomes are a finite float32 tensor of the model's input shape, or one ImageDecodeError.
Anything else (another exception type, a hang past the hypothesis deadline) fails and is shrunk.

Default run: 200 examples per target, derandomized (reproducible). Long run, random seeds:
    IMGEMBED_FUZZ_EXAMPLES=20000 python -m pytest tests/test_hardening_fuzz.py -s -p no:cacheprovider
"""
from __future__ import annotations

import io
import os
import struct
import zlib
from collections import Counter
from datetime import timedelta

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from imgembed.errors import ImageDecodeError
from imgembed.models.registry import get_spec
from imgembed.preprocess import load_image, preprocess

EXAMPLES = int(os.environ.get("IMGEMBED_FUZZ_EXAMPLES", "200"))
LONG_RUN = "IMGEMBED_FUZZ_EXAMPLES" in os.environ
FUZZ = settings(max_examples=EXAMPLES, deadline=timedelta(seconds=5), derandomize=not LONG_RUN, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
SPECS = [get_spec("test-clip-tiny").preprocess, get_spec("test-vit-tiny").preprocess]
LIMITS = {"max_pixels": 2_000_000, "max_seconds": 2.0}  # small caps keep each example fast


def check(item, spec, **limits) -> str:
    """The property: "ok" (RGB image -> finite float32 (3, H, W)) or "error" (ImageDecodeError, named)."""
    try:
        img = load_image(item, name="fuzz-input", **limits)
    except ImageDecodeError as e:
        assert str(e).startswith("fuzz-input: ") and len(str(e)) > len("fuzz-input: "), str(e)
        return "error"
    assert img.mode == "RGB" and img.width * img.height > 0
    out = preprocess(img, spec)
    assert out.dtype == np.float32 and out.shape == (3, *spec.output_hw)
    assert np.isfinite(out).all()
    return "ok"


def _report(name: str, counts: Counter) -> None:
    """Print a target's example count and outcomes (visible with -s)."""
    print(f"\nfuzz {name}: {sum(counts.values())} examples, outcomes {dict(counts)}")


# -------------------------------------------------------------------------------------------- seeds
def _seed_files() -> dict[str, bytes]:
    """Small valid files of every decodable flavour, the starting points of the mutation fuzzer."""
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
    img, out = Image.fromarray(arr), {}
    for key, fmt, kw in [("jpeg", "JPEG", {}), ("jpeg_progressive", "JPEG", {"progressive": True}),
                         ("png", "PNG", {}), ("png_palette", "PNG", {"bits": 4}), ("gif", "GIF", {}),
                         ("webp", "WEBP", {"lossless": True}), ("webp_lossy", "WEBP", {}), ("bmp", "BMP", {}),
                         ("tiff", "TIFF", {"compression": "tiff_lzw"})]:
        buf = io.BytesIO()
        (img.convert("P") if key == "png_palette" else img).save(buf, format=fmt, **kw)
        out[key] = buf.getvalue()
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 65535, (9, 7), dtype=np.uint16)).save(buf, format="PNG")
    out["png16"] = buf.getvalue()
    return out


SEEDS = _seed_files()


@st.composite
def mutated(draw) -> bytes:
    """A seed file with 1-4 mutations: byte flips/sets, truncation, insertion, deletion, duplication."""
    data = bytearray(SEEDS[draw(st.sampled_from(sorted(SEEDS)))])
    for _ in range(draw(st.integers(1, 4))):
        if not data:
            break
        op = draw(st.sampled_from(["flip", "set", "truncate", "insert", "delete", "duplicate"]))
        pos = draw(st.integers(0, len(data) - 1))
        if op == "flip":
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "set":
            data[pos] = draw(st.sampled_from([0, 1, 0x7F, 0x80, 0xFF, draw(st.integers(0, 255))]))
        elif op == "truncate":
            del data[pos:]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=64))
        elif op == "delete":
            del data[pos:pos + draw(st.integers(1, 64))]
        else:
            span = bytes(data[pos:pos + draw(st.integers(1, 256))])
            data[pos:pos] = span
    return bytes(data)


def _chunk(ctype: bytes, data: bytes) -> bytes:
    """One PNG chunk with a correct CRC."""
    return struct.pack(">I", len(data)) + ctype + data + struct.pack(">I", zlib.crc32(ctype + data))


@st.composite
def png_headers(draw) -> bytes:
    """Structurally valid PNGs (correct CRCs) with arbitrary IHDR fields and a small random payload."""
    w, h = draw(st.integers(0, 2**31 - 1)), draw(st.integers(0, 2**31 - 1))
    if draw(st.booleans()):
        w, h = draw(st.integers(0, 64)), draw(st.integers(0, 64))
    depth = draw(st.sampled_from([1, 2, 4, 8, 16, draw(st.integers(0, 255))]))
    color = draw(st.sampled_from([0, 2, 3, 4, 6, draw(st.integers(0, 255))]))
    interlace = draw(st.sampled_from([0, 1, draw(st.integers(0, 255))]))
    channels = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}.get(color)
    if channels and w * h <= 4096 and draw(st.booleans()):  # well-formed scanlines for the declared size
        interlace, row = 0, 1 + (w * channels * depth + 7) // 8
        rows = [bytes([draw(st.integers(0, 4))]) + draw(st.binary(min_size=row - 1, max_size=row - 1))
                for _ in range(h)]  # filter type byte + row data
        payload = zlib.compress(b"".join(rows))
    else:
        raw = draw(st.binary(max_size=512))
        payload = zlib.compress(raw) if draw(st.booleans()) else raw
    ihdr = struct.pack(">IIBBBBB", w, h, depth, color, 0, 0, interlace)
    chunks = [_chunk(b"IHDR", ihdr)]
    if color == 3 and draw(st.booleans()):
        chunks.append(_chunk(b"PLTE", draw(st.binary(min_size=3, max_size=96))))
    chunks.append(_chunk(b"IDAT", payload))
    return b"\x89PNG\r\n\x1a\n" + b"".join(chunks) + _chunk(b"IEND", b"")


# -------------------------------------------------------------------------------------------- targets
def test_fuzz_random_bytes():
    counts: Counter = Counter()

    @FUZZ
    @given(data=st.binary(max_size=4096), spec=st.sampled_from(SPECS))
    def run(data, spec):
        counts[check(data, spec, **LIMITS)] += 1

    run()
    _report("random bytes", counts)
    assert counts["error"] > 0


def test_fuzz_mutated_valid_files():
    counts: Counter = Counter()

    @FUZZ
    @given(data=mutated(), spec=st.sampled_from(SPECS))
    def run(data, spec):
        counts[check(data, spec, **LIMITS)] += 1

    run()
    _report("mutated JPEG/PNG/GIF/WebP/BMP/TIFF", counts)
    assert counts["ok"] > 0 and counts["error"] > 0  # the mutations reach both outcomes


def test_fuzz_png_headers_any_declared_size():
    counts: Counter = Counter()

    @FUZZ
    @given(data=png_headers(), spec=st.sampled_from(SPECS))
    def run(data, spec):
        counts[check(data, spec, **LIMITS)] += 1

    run()
    _report("PNG headers", counts)
    assert counts["ok"] > 0 and counts["error"] > 0


DTYPES = st.one_of(st.just(np.dtype(np.uint8)), st.sampled_from(
    [np.int8, np.uint16, np.int32, np.int64, np.float16, np.float32, np.float64, np.bool_, np.complex64]))
SHAPES = st.one_of(hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=9),
                   st.tuples(st.integers(0, 9), st.integers(0, 9), st.integers(1, 5)))


def test_fuzz_arrays_any_dtype_and_shape():
    """Arrays have an exact oracle: only uint8 HxW / HxWx{1,3,4} with pixels succeed, and then the tensor
    equals the one of the same pixels given as a PIL image."""
    counts: Counter = Counter()

    @FUZZ
    @given(arr=hnp.arrays(DTYPES, SHAPES),
           spec=st.sampled_from(SPECS))
    def run(arr, spec):
        valid = arr.dtype == np.uint8 and arr.size > 0 and (
            arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (1, 3, 4)))
        outcome = check(arr, spec)
        assert outcome == ("ok" if valid else "error"), (arr.dtype, arr.shape)
        if valid:
            rgb = arr[..., :3] if arr.ndim == 3 and arr.shape[2] >= 3 else np.repeat(arr.reshape(arr.shape[:2])[
                ..., None], 3, 2)
            np.testing.assert_array_equal(preprocess(load_image(arr), spec),
                                          preprocess(Image.fromarray(np.ascontiguousarray(rgb)), spec))
        counts[outcome] += 1

    run()
    _report("arrays", counts)
    assert counts["ok"] > 0 and counts["error"] > 0


MODES = ["1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV", "I",
         "I;16", "I;16B", "I;16L", "F"]


def test_fuzz_pil_images_every_mode():
    counts: Counter = Counter()

    @FUZZ
    @given(mode=st.sampled_from(MODES), w=st.integers(1, 40), h=st.integers(1, 40), seed=st.integers(0, 2**16),
           spec=st.sampled_from(SPECS))
    def run(mode, w, h, seed, spec):
        probe = Image.new(mode, (1, 1))
        raw = np.random.default_rng(seed).integers(0, 256, w * h * len(probe.tobytes()), dtype=np.uint8)
        img = Image.frombytes(mode, (w, h), raw.tobytes())
        counts[f"{check(img, spec)}"] += 1

    run()
    _report("PIL images of every mode", counts)
    assert counts["ok"] > 0


@pytest.mark.skipif(not LONG_RUN, reason="long fuzz run only (IMGEMBED_FUZZ_EXAMPLES set)")
def test_fuzz_default_limits_long_run():
    """Long run only: mutated files under the default limits (64 Mpx, 20 s)."""
    counts: Counter = Counter()

    @FUZZ
    @given(data=mutated(), spec=st.sampled_from(SPECS))
    def run(data, spec):
        counts[check(data, spec)] += 1

    run()
    _report("mutated files, default limits", counts)
