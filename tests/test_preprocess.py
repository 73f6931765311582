"""imgembed.preprocess: fidelity against the HF slow image processors, spec handling, image decoding.

Every test image is generated here (scikit-image sample photos, numpy, PIL); nothing is downloaded.
"""
from __future__ import annotations

import io
import json
import pathlib

import numpy as np
import pytest
import transformers
from PIL import Image
from skimage import data as skdata

from imgembed.errors import ImageDecodeError, RegistryError
from imgembed.preprocess import PreprocessSpec, load_image, preprocess, preprocess_batch

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
FAMILY_SPECS = {
    "clip": PreprocessSpec("CLIPImageProcessor", {"shortest_edge": 224}, "bicubic", {"height": 224, "width": 224},
                           None, (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    "vit": PreprocessSpec("ViTImageProcessor", {"height": 224, "width": 224}, "bilinear", None, None,
                          (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "dinov2": PreprocessSpec("BitImageProcessor", {"shortest_edge": 256}, "bicubic", {"height": 224, "width": 224},
                             None, *IMAGENET),
    "resnet": PreprocessSpec("ConvNextImageProcessor", {"shortest_edge": 224}, "bicubic", None, 0.875, *IMAGENET),
    "siglip": PreprocessSpec("SiglipImageProcessor", {"height": 224, "width": 224}, "bicubic", None, None,
                             (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}
DINOV3 = PreprocessSpec("DINOv3ViTImageProcessor", {"height": 224, "width": 224}, "bilinear", None, None, *IMAGENET)
# Other corners of the HF logic: ConvNext >= 384 (warp, no crop), a crop larger than the resized image
# (HF zero-pads), fixed-size resize without crop, nearest / lanczos, no rescale/normalize.
EXTRA_SPECS = {
    "convnext384": PreprocessSpec("ConvNextImageProcessor", {"shortest_edge": 384}, "bilinear", None, 0.875, *IMAGENET),
    "convnext_pct1": PreprocessSpec("ConvNextImageProcessor", {"shortest_edge": 96}, "lanczos", None, 1.0, *IMAGENET),
    "clip_pad": PreprocessSpec("CLIPImageProcessor", {"shortest_edge": 100}, "bicubic", {"height": 160, "width": 90},
                               None, *IMAGENET),
    "clip_hw_nocrop": PreprocessSpec("CLIPImageProcessor", {"height": 120, "width": 200}, "nearest", None, None,
                                     *IMAGENET),
    "siglip2_bilinear": PreprocessSpec("SiglipImageProcessor", {"height": 96, "width": 160}, "bilinear", None, None,
                                       (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "bit_odd_crop": PreprocessSpec("BitImageProcessor", {"shortest_edge": 101}, "bilinear", {"height": 77, "width": 99},
                                   None, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), rescale_factor=1.0),
}
ODD_SIZES = [(37, 501), (300, 17), (17, 300), (225, 224), (224, 225), (100, 100), (5, 7), (2000, 13)]
TOL = 1e-5


def _rng_image(h: int, w: int, seed: int = 0, channels: int = 3) -> np.ndarray:
    shape = (h, w, channels) if channels > 1 else (h, w)
    return np.random.default_rng(seed + h * 7919 + w).integers(0, 256, shape, dtype=np.uint8)


def _png_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", **kw)
    return buf.getvalue()


def _jpeg_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def raw_images() -> dict[str, Image.Image]:
    """Name -> PIL image in its original mode (photos, odd sizes, L, RGBA, P, P with transparency)."""
    imgs = {name: Image.fromarray(getattr(skdata, name)())
            for name in ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "camera", "logo")}
    imgs.update({f"rand_{h}x{w}": Image.fromarray(_rng_image(h, w)) for h, w in ODD_SIZES})
    imgs["palette"] = imgs["chelsea"].convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    p_trans = Image.fromarray(_rng_image(90, 140, channels=1)).convert("P")
    p_trans.info["transparency"] = 0
    imgs["palette_transparency"] = Image.open(io.BytesIO(_png_bytes(p_trans)))
    assert imgs["camera"].mode == "L" and imgs["logo"].mode == "RGBA" and imgs["palette"].mode == "P"
    return imgs


def _hf(spec: PreprocessSpec):
    return getattr(transformers, spec.record.hf_class)(**spec.hf_kwargs())


def _hf_input(spec: PreprocessSpec, img: Image.Image) -> Image.Image:
    """HF ConvNext has no do_convert_rgb: feed it the RGB image HF's convert_to_rgb would make."""
    return img.convert("RGB") if spec.processor == "ConvNextImageProcessor" and img.mode != "RGB" else img


def _assert_close(ours: np.ndarray, ref: np.ndarray, names: list[str]) -> None:
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    diffs = {n: float(np.abs(o - r).max()) for n, o, r in zip(names, ours, ref, strict=True)}
    assert max(diffs.values()) <= TOL, diffs


# ------------------------------------------------------------------------------------------- fidelity
@pytest.mark.parametrize("family", list(FAMILY_SPECS))
def test_matches_hf_processor_on_photos_odd_sizes_and_modes(family, raw_images):
    spec = FAMILY_SPECS[family]
    names = list(raw_images)
    ours = preprocess_batch([load_image(raw_images[n]) for n in names], spec)
    ref = _hf(spec)(images=[_hf_input(spec, raw_images[n]) for n in names], return_tensors="np")["pixel_values"]
    assert ours.dtype == np.float32 and ours.flags.c_contiguous
    assert ours.shape == (len(names), 3, *spec.output_hw) == (len(names), 3, 224, 224)
    _assert_close(ours, ref, names)


@pytest.mark.parametrize("key", list(EXTRA_SPECS))
def test_matches_hf_processor_on_other_spec_corners(key, raw_images):
    spec = EXTRA_SPECS[key]
    names = ["coffee", "camera", "logo", "rand_37x501", "rand_300x17", "rand_5x7", "rand_100x100"]
    ours = preprocess_batch([load_image(raw_images[n]) for n in names], spec)
    ref = _hf(spec)(images=[_hf_input(spec, raw_images[n]) for n in names], return_tensors="np")["pixel_values"]
    assert ours.shape[2:] == spec.output_hw
    _assert_close(ours, ref, names)



def _torch_antialiased_bilinear(img: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    """DINOv3ViTImageProcessorFast's order: rescale the uint8 image to float, resize it with
    ``interpolate(bilinear, antialias=True)``, normalize."""
    import torch

    x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)[None].float() * spec.rescale_factor
    x = torch.nn.functional.interpolate(x, size=spec.output_hw, mode="bilinear", antialias=True, align_corners=False)
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in (spec.image_mean, spec.image_std))
    return ((x[0] - mean) / std).numpy()


def test_dinov3_matches_torch_antialiased_bilinear_within_one_level(raw_images):
    """Ours resizes the uint8 image with PIL (two passes, each rounded to uint8) before the rescale; the
    residual against the float resize is at most one uint8 level, about a quarter level on average."""
    names = ["astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "camera", "rand_37x501",
             "rand_300x17", "rand_100x100"]
    one_level = 1 / 255 / np.asarray(DINOV3.image_std)[:, None, None]
    for name in names:
        img = load_image(raw_images[name])
        diff = np.abs(preprocess(img, DINOV3) - _torch_antialiased_bilinear(img, DINOV3)) / one_level
        assert diff.max() <= 1.0 + 1e-3 and diff.mean() <= 0.35, (name, diff.max(), diff.mean())


@pytest.mark.parametrize("key", ["siglip", "siglip2_bilinear"])
def test_siglip_is_bit_identical_to_the_slow_hf_processor(key, raw_images):
    spec = {**FAMILY_SPECS, **EXTRA_SPECS}[key]
    names = list(raw_images)
    ours = preprocess_batch([load_image(raw_images[n]) for n in names], spec)
    ref = _hf(spec)(images=[raw_images[n] for n in names], return_tensors="np")["pixel_values"]
    assert ours.shape == ref.shape == (len(names), 3, *spec.output_hw)
    np.testing.assert_array_equal(ours, ref)

def test_dinov3_and_siglip_hub_configs_map_to_specs():
    dinov3 = {"image_processor_type": "DINOv3ViTImageProcessorFast", "do_resize": True, "resample": 2,
              "size": {"height": 224, "width": 224}, "do_rescale": True, "rescale_factor": 0.00392156862745098,
              "do_normalize": True, "image_mean": list(IMAGENET[0]), "image_std": list(IMAGENET[1])}
    assert PreprocessSpec.from_hf_config(dinov3) == DINOV3
    assert PreprocessSpec.from_hf_config({"image_processor_type": "DINOv3ViTImageProcessorFast"}) == DINOV3
    siglip = {"image_processor_type": "SiglipImageProcessor", "resample": 3, "size": {"height": 224, "width": 224},
              "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "rescale_factor": 0.00392156862745098}
    assert PreprocessSpec.from_hf_config(siglip) == FAMILY_SPECS["siglip"]
    assert PreprocessSpec.from_hf_config({"image_processor_type": "SiglipImageProcessor"}) == FAMILY_SPECS["siglip"]
    assert DINOV3.record.hf_class is None and FAMILY_SPECS["siglip"].record.hf_class == "SiglipImageProcessor"

@pytest.mark.parametrize("hw", [(1, 1), (3, 50), (1, 40), (50, 3)])
def test_height_1_or_3_images(hw):
    """HF guesses (1|3, W, 3) arrays are channels-first; told channels_last it agrees with us exactly."""
    img = Image.fromarray(_rng_image(*hw))
    for spec in FAMILY_SPECS.values():
        ours = preprocess(img, spec)
        ref = _hf(spec)(images=[img], return_tensors="np", input_data_format="channels_last")["pixel_values"]
        _assert_close(ours[None], ref, [str(hw)])


def test_preprocess_single_equals_batch_and_shapes(raw_images):
    imgs = [load_image(raw_images[n]) for n in ("astronaut", "rand_37x501")]
    for spec in [*FAMILY_SPECS.values(), *EXTRA_SPECS.values()]:
        batch = preprocess_batch(imgs, spec)
        single = preprocess(imgs[1], spec)
        assert single.dtype == np.float32 and single.shape == (3, *spec.output_hw)
        np.testing.assert_array_equal(batch[1], single)
        assert preprocess_batch([], spec).shape == (0, 3, *spec.output_hw)
    assert EXTRA_SPECS["convnext384"].output_hw == (384, 384)
    assert EXTRA_SPECS["clip_pad"].output_hw == (160, 90)
    assert EXTRA_SPECS["clip_hw_nocrop"].output_hw == (120, 200)


def test_preprocess_converts_non_rgb_itself(raw_images):
    spec = FAMILY_SPECS["clip"]
    logo = raw_images["logo"]
    np.testing.assert_array_equal(preprocess(logo, spec), preprocess(load_image(logo), spec))
    with pytest.raises(TypeError, match="PIL"):
        preprocess(np.zeros((4, 4, 3), np.uint8), spec)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------- spec handling
@pytest.mark.parametrize("spec", [*FAMILY_SPECS.values(), *EXTRA_SPECS.values()], ids=[*FAMILY_SPECS, *EXTRA_SPECS])
def test_from_hf_config_round_trip(spec):
    hf_dict = _hf(spec).to_dict()
    assert PreprocessSpec.from_hf_config(hf_dict) == spec
    assert PreprocessSpec.from_hf_config(json.loads(json.dumps(hf_dict))) == spec  # as saved on disk


@pytest.mark.parametrize("spec", [*FAMILY_SPECS.values(), *EXTRA_SPECS.values()], ids=[*FAMILY_SPECS, *EXTRA_SPECS])
def test_to_dict_round_trip(spec):
    d = json.loads(json.dumps(spec.to_dict()))
    again = PreprocessSpec.from_dict(d)
    assert again == spec and hash(again) == hash(spec)


def test_from_hf_config_legacy_hub_files():
    """The preprocessor_config.json files as published on the hub (int sizes, *FeatureExtractor names)."""
    clip = {"crop_size": 224, "do_center_crop": True, "do_normalize": True, "do_resize": True,
            "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": list(FAMILY_SPECS["clip"].image_mean),
            "image_std": list(FAMILY_SPECS["clip"].image_std), "resample": 3, "size": 224}
    vit = {"do_normalize": True, "do_resize": True, "feature_extractor_type": "ViTFeatureExtractor",
           "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "resample": 2, "size": 224}
    dino = {"crop_size": {"height": 224, "width": 224}, "do_center_crop": True, "do_convert_rgb": True,
            "do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": list(IMAGENET[0]),
            "image_processor_type": "BitImageProcessor", "image_std": list(IMAGENET[1]), "resample": 3,
            "rescale_factor": 0.00392156862745098, "size": {"shortest_edge": 256}}
    resnet = {"crop_pct": 0.875, "do_normalize": True, "do_resize": True, "feature_extractor_type":
              "ConvNextFeatureExtractor", "image_mean": list(IMAGENET[0]), "image_std": list(IMAGENET[1]),
              "resample": 3, "size": 224}
    for cfg, fam in ((clip, "clip"), (vit, "vit"), (dino, "dinov2"), (resnet, "resnet")):
        assert PreprocessSpec.from_hf_config(cfg) == FAMILY_SPECS[fam], fam
    fast = dict(dino, image_processor_type="BitImageProcessorFast")
    assert PreprocessSpec.from_hf_config(fast) == FAMILY_SPECS["dinov2"]
    with pytest.raises(RegistryError, match=r"'Siglip2ImageProcessor' is not supported \(it is NaFlex"):
        PreprocessSpec.from_hf_config(dict(dino, image_processor_type="Siglip2ImageProcessor"))
    with pytest.raises(RegistryError, match="resample=4"):
        PreprocessSpec.from_hf_config(dict(dino, resample=4))


def _spec_dict(**overrides) -> dict:
    return {**FAMILY_SPECS["clip"].to_dict(), **overrides}


@pytest.mark.parametrize("overrides, pattern", [
    ({"resample": "cubic"}, r"'resample'.*'cubic'.*bicubic"),
    ({"image_mean": [0.5, 0.5]}, r"'image_mean'.*length 2.*exactly 3"),
    ({"image_std": [0.5, 0.0, 0.5]}, r"'image_std'.*> 0"),
    ({"size": {"shortest_edge": -224}}, r"'size'.*-224.*positive"),
    ({"crop_size": {"height": 224}}, r"'crop_size'.*expected"),
    ({"crop_size": None}, r"'crop_size'.*variable output shape"),
    ({"crop_pct": 0.9}, r"'crop_pct'.*ConvNextImageProcessor"),
    ({"processor": "Siglip2ImageProcessor"}, r"'processor'.*'Siglip2ImageProcessor' \(it is NaFlex"),
    ({"rescale_factor": 0}, r"'rescale_factor'"),
    ({"interpolation": "bicubic"}, r"unknown key.*interpolation"),
])
def test_spec_validation_errors(overrides, pattern):
    with pytest.raises(RegistryError, match=pattern):
        PreprocessSpec.from_dict(_spec_dict(**overrides))


def test_spec_validation_per_processor():
    resnet = FAMILY_SPECS["resnet"].to_dict()
    with pytest.raises(RegistryError, match=r"'crop_pct'.*\(0, 1\]"):
        PreprocessSpec.from_dict({**resnet, "crop_pct": None})
    with pytest.raises(RegistryError, match=r"'crop_size'.*does not center-crop"):
        PreprocessSpec.from_dict({**resnet, "crop_size": {"height": 224, "width": 224}})
    with pytest.raises(RegistryError, match=r"'size'.*height"):
        PreprocessSpec.from_dict({**FAMILY_SPECS["vit"].to_dict(), "size": {"shortest_edge": 224}})
    with pytest.raises(RegistryError, match=r"missing required key.*image_std"):
        PreprocessSpec.from_dict({k: v for k, v in resnet.items() if k != "image_std"})
    with pytest.raises(RegistryError, match="mapping"):
        PreprocessSpec.from_dict(["not", "a", "mapping"])  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------ decoding
def test_load_image_input_kinds_give_identical_pixels(tmp_path):
    arr = skdata.chelsea()
    png = _png_bytes(Image.fromarray(arr))
    path = tmp_path / "cat.png"
    path.write_bytes(png)
    results = [load_image(str(path)), load_image(path), load_image(png), load_image(bytearray(png)),
               load_image(memoryview(png)), load_image(Image.open(path)), load_image(Image.fromarray(arr)),
               load_image(arr), load_image(np.asfortranarray(arr))]
    for img in results:
        assert img.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(img), arr)


def test_load_image_array_channel_variants():
    gray = _rng_image(20, 30, channels=1)
    rgba = _rng_image(20, 30, channels=4)
    for a in (gray, gray[:, :, None]):
        np.testing.assert_array_equal(np.asarray(load_image(a)), np.repeat(gray[:, :, None], 3, axis=2))
    np.testing.assert_array_equal(np.asarray(load_image(rgba)), rgba[:, :, :3])  # alpha dropped, like HF


def test_load_image_does_not_mutate_pil_input():
    src = Image.fromarray(_rng_image(10, 12, channels=4), mode="RGBA")
    out = load_image(src)
    assert src.mode == "RGBA" and out is not src and out.mode == "RGB"


def test_load_image_of_a_pil_image_is_a_new_image_and_the_input_is_left_alone():
    """The decoder orients and converts images it opened itself in place (no full-size copy); a caller's
    image is never modified, whether it needs a transposition or nothing at all."""
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated = Image.open(io.BytesIO(_jpeg_bytes(Image.fromarray(_rng_image(20, 40)), exif=exif.tobytes())))
    before = np.asarray(rotated).copy()
    out = load_image(rotated)
    assert out is not rotated and out.size == (20, 40) and rotated.size == (40, 20)
    assert rotated.getexif().get(0x0112) == 6
    np.testing.assert_array_equal(np.asarray(rotated), before)
    plain = Image.fromarray(_rng_image(10, 12))
    out = load_image(plain)
    assert out is not plain
    out.paste((0, 0, 0), (0, 0, 12, 10))
    assert np.asarray(plain).any()


def test_load_image_of_encoded_bytes_equals_pil_decoding(tmp_path):
    data = _jpeg_bytes(Image.fromarray(_rng_image(30, 50)))
    path = tmp_path / "a.jpg"
    path.write_bytes(data)
    want = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    for item in (data, path):
        out = load_image(item)
        assert out.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(out), want)
        resized = np.asarray(Image.fromarray(want).resize((25, 15)))
        np.testing.assert_array_equal(np.asarray(out.resize((25, 15))), resized)  # usable after decoding


def test_load_image_applies_exif_orientation(tmp_path):
    arr = np.zeros((20, 40, 3), np.uint8)  # H=20, W=40: red left half, blue right half
    arr[:, :20] = (255, 0, 0)
    arr[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    path = tmp_path / "rotated.jpg"
    path.write_bytes(_jpeg_bytes(Image.fromarray(arr), exif=exif.tobytes()))
    assert Image.open(path).size == (40, 20)
    out = np.asarray(load_image(path)).astype(int)
    assert out.shape == (40, 20, 3)  # transposed
    assert np.abs(out[5, 10] - (255, 0, 0)).max() < 40  # left half is now on top
    assert np.abs(out[35, 10] - (0, 0, 255)).max() < 40


def test_load_image_cmyk_jpeg():
    cmyk = Image.new("CMYK", (32, 16), (0, 0, 0, 0))  # white
    cmyk.paste((0, 255, 255, 0), (0, 0, 16, 16))  # red left half
    data = _jpeg_bytes(cmyk)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    out = load_image(data)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
    px = np.asarray(out).astype(int)
    assert np.abs(px[8, 4] - (255, 0, 0)).max() < 30 and np.abs(px[8, 28] - (255, 255, 255)).max() < 30


def test_load_image_16_bit_scales_instead_of_clipping():
    vals = np.array([[0, 255, 256, 32768, 65535]], dtype=np.uint16)
    expected = np.array([0, 0, 1, 128, 255], dtype=np.uint8)
    png = _png_bytes(Image.fromarray(vals))
    assert Image.open(io.BytesIO(png)).mode == "I;16"
    big_endian = Image.frombytes("I;16B", (5, 1), vals.astype(">u2").tobytes())
    mode_i = Image.fromarray(vals.astype(np.int32))
    assert mode_i.mode == "I"
    for src in (png, big_endian, mode_i):
        out = np.asarray(load_image(src))
        np.testing.assert_array_equal(out[0, :, 0], expected)
        np.testing.assert_array_equal(out[..., 0], out[..., 2])


@pytest.mark.parametrize("mode", ["L", "LA", "P", "PA", "RGBA", "CMYK", "1", "F", "YCbCr"])
def test_load_image_modes_match_pil_convert_like_hf(mode):
    """Everything but 16-bit converts exactly like HF's convert_to_rgb (image.convert("RGB"))."""
    base = Image.fromarray(_rng_image(24, 18, channels=4), mode="RGBA")
    img = Image.fromarray(np.asarray(base.convert("L"), dtype=np.float32) * 1.3, mode="F") if mode == "F" \
        else base.convert(mode)
    out = load_image(img)
    assert out.mode == "RGB" and out.size == (18, 24)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(img.convert("RGB")))


def test_load_image_animated_gif_first_frame():
    frames = [Image.new("RGB", (12, 10), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert Image.open(io.BytesIO(buf.getvalue())).n_frames == 3
    out = np.asarray(load_image(buf.getvalue()))
    assert out.shape == (10, 12, 3)
    assert (out == (255, 0, 0)).all()


# ---------------------------------------------------------------------------------------- decode errors
def _check_error(exc_info) -> None:
    assert isinstance(exc_info.value, ValueError)  # ImageDecodeError is also a ValueError
    assert exc_info.value.__cause__ is None and exc_info.value.__suppress_context__


def test_error_missing_file(tmp_path):
    path = tmp_path / "nope.jpg"
    with pytest.raises(ImageDecodeError, match=r"nope\.jpg.*not found") as ei:
        load_image(path)
    _check_error(ei)


def test_error_directory(tmp_path):
    with pytest.raises(ImageDecodeError, match="directory"):
        load_image(tmp_path)


def test_error_zero_byte_file(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    with pytest.raises(ImageDecodeError, match=r"empty\.png.*empty file \(0 bytes\)"):
        load_image(path)
    with pytest.raises(ImageDecodeError, match=r"bytes input \(0 bytes\).*empty"):
        load_image(b"")


def test_error_not_an_image(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("hello, I am not a picture\n" * 10)
    with pytest.raises(ImageDecodeError, match=r"notes\.jpg.*not an image") as ei:
        load_image(path)
    _check_error(ei)
    with pytest.raises(ImageDecodeError, match=r"bytes input \(11 bytes\).*not an image"):
        load_image(b"hello world")
    with pytest.raises(ImageDecodeError, match=r"^upload-7: .*not an image"):
        load_image(b"hello world", name="upload-7")


@pytest.mark.parametrize("fmt", ["jpeg", "png"])
def test_error_truncated(fmt, tmp_path):
    img = Image.fromarray(skdata.astronaut())
    data = _jpeg_bytes(img) if fmt == "jpeg" else _png_bytes(img)
    path = tmp_path / f"cut.{fmt}"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageDecodeError, match=rf"cut\.{fmt}.*truncated") as ei:
        load_image(path)
    _check_error(ei)
    n = len(data) // 2
    with pytest.raises(ImageDecodeError, match=rf"bytes input \({n} bytes\).*truncated"):
        load_image(data[:n])


def test_error_too_many_pixels(tmp_path):
    arr = _rng_image(40, 50)
    path = tmp_path / "big.png"
    path.write_bytes(_png_bytes(Image.fromarray(arr)))
    pattern = r"too many pixels: 50x40 = 2000 > max_pixels=1999"
    for item in (path, path.read_bytes(), Image.open(path), arr):
        with pytest.raises(ImageDecodeError, match=pattern):
            load_image(item, max_pixels=1999)
    with pytest.raises(ImageDecodeError, match=r"big\.png.*too many pixels"):
        load_image(path, max_pixels=1999)
    assert load_image(path, max_pixels=2000).size == (50, 40)


@pytest.mark.parametrize("arr, pattern", [
    (np.zeros((8, 8, 3), np.float32), r"numpy array of shape \(8, 8, 3\) dtype float32.*dtype float32"),
    (np.zeros((8, 8, 3), np.uint16), r"unsupported array dtype uint16"),
    (np.zeros((8, 8, 2), np.uint8), r"unsupported array shape \(8, 8, 2\)"),
    (np.zeros((2, 8, 8, 3), np.uint8), r"unsupported array shape \(2, 8, 8, 3\)"),
    (np.zeros((0, 8, 3), np.uint8), r"zero size"),
])
def test_error_unsupported_arrays(arr, pattern):
    with pytest.raises(ImageDecodeError, match=pattern):
        load_image(arr)


@pytest.mark.parametrize("item, tname", [(42, "int"), (None, "NoneType"), ([1, 2, 3], "list")])
def test_error_unsupported_type(item, tname):
    with pytest.raises(ImageDecodeError, match=rf"unsupported input type {tname}") as ei:
        load_image(item)
    assert isinstance(ei.value, ValueError)


def test_path_objects_are_named_in_errors(tmp_path):
    p = pathlib.Path(tmp_path) / "sub dir" / "x.webp"
    with pytest.raises(ImageDecodeError) as ei:
        load_image(p)
    assert str(p) in str(ei.value)


def test_module_imports_no_torch_or_transformers():
    """The shared preprocessing must stay numpy + PIL only (backends run without torch/transformers)."""
    import ast

    import imgembed.preprocess as mod

    tree = ast.parse(pathlib.Path(mod.__file__).read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not imported & {"torch", "transformers", "torchvision", "cv2"}, imported
