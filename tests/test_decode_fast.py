"""decode="exact" (HF-identical) vs decode="fast" (JPEG DCT scaling, crop-only resize): fidelity, EXIF
orientation, and the same typed errors for bad inputs. (Speed: benchmarks/speed_bounds.py.)"""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

import imgembed
from imgembed.errors import ImageDecodeError
from imgembed.gate.samples import parity_images
from imgembed.models.registry import get_spec
from imgembed.preprocess import load_image, preprocess, resize_crop
from imgembed.preprocess.fast import crops_to_pixels, draft_request, fast_resize_crop, load_crop

from .helpers import cosine

SPECS = ("clip-vit-b32", "vit-b16", "dinov2-small", "resnet50", "test-dinov2-tiny")


def jpeg_bytes(img: Image.Image, megapixels: float, quality: int = 90, exif=None) -> bytes:
    """``img`` upscaled (bicubic) to about ``megapixels`` and saved as a JPEG."""
    img = img.convert("RGB")
    s = (megapixels * 1e6 / (img.width * img.height)) ** 0.5
    big = img.resize((round(img.width * s), round(img.height * s)), Image.BICUBIC)
    buf = io.BytesIO()
    big.save(buf, "JPEG", quality=quality, **({"exif": exif} if exif is not None else {}))
    return buf.getvalue()


@pytest.fixture(scope="module")
def big_jpegs():
    return [jpeg_bytes(img, 1.5) for _, img in parity_images()[:18]]


@pytest.mark.parametrize("name", SPECS)
def test_exact_crop_plus_lut_is_bit_identical_to_preprocess(name):
    spec = get_spec(name).preprocess
    for _, img in parity_images()[::3]:
        crop = load_crop(img, spec, "exact")
        assert crop.dtype == np.uint8 and crop.shape == (*spec.output_hw, 3)
        np.testing.assert_array_equal(crops_to_pixels(crop[None], spec)[0], preprocess(img, spec))


def test_draft_keeps_twice_the_resize_target():
    spec = get_spec("clip-vit-b32").preprocess  # shortest edge 224 -> 336 x 224 for a 3000 x 2000 photo
    assert draft_request(3000, 2000, spec) == (672, 448)
    img = Image.new("RGB", (3000, 2000), (120, 30, 200))
    buf = io.BytesIO()
    img.save(buf, "JPEG")
    with Image.open(io.BytesIO(buf.getvalue())) as j:
        j.draft("RGB", draft_request(3000, 2000, spec))
        assert j.size == (750, 500)  # libjpeg scale 1/4: the largest that keeps >= 672 x 448
    assert draft_request(300, 200, spec) == (300, 200)  # small images are never drafted below full size


def test_fast_crop_of_a_decoded_image_matches_the_exact_resize():
    spec = get_spec("clip-vit-b32").preprocess
    for name, img in parity_images()[:8]:
        diff = np.abs(fast_resize_crop(img, spec).astype(int) - resize_crop(img, spec))
        if min(img.size) < 2 * 224:  # only the crop box is resampled, with the same filter taps
            assert diff.max() <= 1 and diff.mean() < 1e-3, name
        else:  # >= 2x the target: Image.reduce by the integer part of the scale first
            assert diff.mean() < 1.5, (name, diff.mean())


@pytest.mark.parametrize("name", ["test-clip-tiny", "test-dinov2-tiny", "test-resnet-tiny"])
def test_fast_and_exact_embeddings_agree_on_large_photos(name, artifact_dir, big_jpegs):
    emb = imgembed.load(artifact_dir(name))
    exact = emb.embed(big_jpegs, decode="exact")
    fast = emb.embed(big_jpegs, decode="fast")
    cos = cosine(exact, fast)
    assert cos.min() > 0.99 and cos.mean() > 0.998, (cos.min(), cos.mean())  # random tiny models: sensitive


def test_fast_and_exact_crops_differ_by_one_or_two_grey_levels(big_jpegs):
    spec = get_spec("clip-vit-b32").preprocess
    diffs = [np.abs(load_crop(d, spec, "exact").astype(int) - load_crop(d, spec, "fast")).mean() for d in big_jpegs]
    assert np.mean(diffs) < 2.0 and np.median(diffs) < 1.5 and max(diffs) < 8, diffs  # max: a page of text


def test_fast_decoding_applies_exif_orientation():
    spec = get_spec("clip-vit-b32").preprocess
    a = np.zeros((1000, 1600, 3), np.uint8)
    a[:, :800] = (250, 20, 20)     # left half red, right half blue
    a[:, 800:] = (20, 20, 250)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed: red on top
    data = jpeg_bytes(Image.fromarray(a), 1.6, exif=exif.tobytes())
    exact, fast = load_crop(data, spec, "exact"), load_crop(data, spec, "fast")
    assert np.abs(exact.astype(int) - fast).mean() < 1.0
    assert fast[10, 112, 0] > 200 and fast[-10, 112, 2] > 200  # top is red, bottom is blue


def test_fast_handles_png_and_paths_like_exact(tmp_path):
    spec = get_spec("test-clip-tiny").preprocess
    img = parity_images()[0][1]
    png = tmp_path / "a.png"
    img.save(png)
    np.testing.assert_array_equal(load_crop(png, spec, "fast"), fast_resize_crop(load_image(png), spec))
    jpg = tmp_path / "b.jpg"
    jpg.write_bytes(jpeg_bytes(img, 1.0))
    np.testing.assert_array_equal(load_crop(jpg, spec, "fast"), load_crop(jpg.read_bytes(), spec, "fast"))


def test_fast_mode_reports_bad_inputs_with_the_exact_errors(tmp_path, big_jpegs):
    spec = get_spec("test-clip-tiny").preprocess
    truncated = big_jpegs[0][: len(big_jpegs[0]) // 3]
    cases = {
        b"\xff\xd8\xff\xe0 definitely not a jpeg": "the-item: ",
        truncated: "the-item: truncated or corrupt image data",
        b"": "the-item: empty input",
        str(tmp_path / "missing.jpg"): "the-item: file not found",
        str(tmp_path): "the-item: is a directory",
    }
    for item, reason in cases.items():
        messages = []
        for mode in ("exact", "fast"):
            with pytest.raises(ImageDecodeError, match=reason) as e:
                load_crop(item, spec, mode, name="the-item")
            messages.append(str(e.value))
        assert messages[0] == messages[1]  # the fast path reports exactly what the exact one does
    with pytest.raises(ImageDecodeError, match=r"too many pixels: 1225x1225 = 1500625 > max_pixels=1000000"):
        load_crop(big_jpegs[0], spec, "fast", max_pixels=1_000_000)
    with pytest.raises(ImageDecodeError, match="decoding took longer than max_seconds=0"):
        load_crop(big_jpegs[0], spec, "fast", max_seconds=0)
    with pytest.raises(ValueError, match=r"decode mode 'quick'; expected one of \['exact', 'fast'\]"):
        load_crop(big_jpegs[0], spec, "quick")
