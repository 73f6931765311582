"""The checkpoint owns its preprocessing (issue 14.1) and ``parity --images DIR`` (issue 14.5).

Each family is built tiny with random weights, saved with a *slow* HF image processor whose settings differ
from the registry's (mean/std, resample, size), exported with ``weights=DIR``, and the artifact's vectors are
compared with ``processor(images) -> model`` loaded from that directory. DINOv3 has only a Fast processor in
transformers (torchvision, unusable here), so its reference runs imgembed's implementation of its semantics
on an independently written spec.
"""
from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import imgembed
from imgembed.errors import ArtifactError, CheckpointPreprocessError, ImageSetError, WeightsError
from imgembed.gate.samples import parity_images
from imgembed.models.checkpoint import resolve_preprocess
from imgembed.models.families import family_of
from imgembed.models.registry import get_spec
from imgembed.preprocess import PreprocessSpec, preprocess_batch
from tests.helpers import cosine

# family -> (registry test entry, config overrides, HF slow processor class or None, processor kwargs)
MEAN, STD = [0.3, 0.4, 0.5], [0.2, 0.25, 0.3]
CASES = {
    "clip": ("test-clip-tiny", {}, "CLIPImageProcessor",
             dict(size={"shortest_edge": 80}, crop_size={"height": 64, "width": 64}, resample=2, image_mean=MEAN,
                  image_std=STD)),
    "vit": ("test-vit-tiny", {"image_size": 32}, "ViTImageProcessor",
            dict(size={"height": 32, "width": 32}, resample=3, image_mean=MEAN, image_std=STD)),
    "dinov2": ("test-dinov2-tiny", {}, "BitImageProcessor",
               dict(size={"shortest_edge": 70}, crop_size={"height": 42, "width": 42}, resample=2,
                    image_mean=[0.5] * 3, image_std=[0.5] * 3)),
    "resnet": ("test-resnet-tiny", {}, "ConvNextImageProcessor",
               dict(size={"shortest_edge": 48}, crop_pct=0.9, resample=2, image_mean=[0.5] * 3,
                    image_std=[0.5] * 3)),
    "siglip": ("test-siglip-tiny", {"image_size": 48}, "SiglipImageProcessor",
               dict(size={"height": 48, "width": 48}, resample=2, image_mean=MEAN, image_std=STD)),
    "dinov3": ("test-dinov3-tiny", {}, None,
               dict(size={"height": 48, "width": 48}, resample=3, image_mean=MEAN, image_std=STD)),
}
DIFFERS = {
    "clip": {"size", "resample", "image_mean", "image_std"},
    "vit": {"size", "resample", "image_mean", "image_std"},
    "dinov2": {"size", "crop_size", "resample", "image_mean", "image_std"},
    "resnet": {"size", "crop_pct", "resample", "image_mean", "image_std"},
    "siglip": {"size", "resample", "image_mean", "image_std"},
    "dinov3": {"size", "resample", "image_mean", "image_std"},
}
# Fast-only keys a DINOv3ViTImageProcessorFast writes into preprocessor_config.json
FAST_KEYS = {"data_format": "channels_first", "default_to_square": True, "device": None, "disable_grouping": None,
             "input_data_format": None, "return_tensors": None, "do_convert_rgb": None}


def _images() -> list[Image.Image]:
    """RGB photos of varied sizes (ConvNext's slow processor does not convert other modes)."""
    pick = ("astronaut", "coffee", "chelsea", "rocket", "astronaut-37x500", "coffee-small-60x90", "hubble-crop")
    return [im for name, im in parity_images() if name in pick]


def _save_checkpoint(family: str, directory: Path) -> None:
    """A tiny random-init model and its processor (slow HF class, or a Fast-style JSON for DINOv3)."""
    import torch
    import transformers

    name, overrides, proc_cls, kw = CASES[family]
    spec = get_spec(name)
    fam = family_of(spec)
    torch.manual_seed(0)
    model = getattr(transformers, fam.model_class)(getattr(transformers, fam.config_class)(**{**spec.arch,
                                                                                            **overrides}))
    model.save_pretrained(directory)
    if proc_cls is not None:
        getattr(transformers, proc_cls)(**kw).save_pretrained(directory)
        return
    cfg = {"image_processor_type": "DINOv3ViTImageProcessorFast", "do_resize": True, "do_rescale": True,
           "rescale_factor": 1 / 255, "do_normalize": True, **kw, **FAST_KEYS}
    (directory / "preprocessor_config.json").write_text(json.dumps(cfg))


def _hf_reference(family: str, directory: Path, images: list[Image.Image]) -> np.ndarray:
    """HF (slow) processor + model, both loaded from ``directory``; the embedding as the registry defines it."""
    import torch
    import transformers

    from imgembed.models.heads import EmbeddingHead

    name, _, proc_cls, kw = CASES[family]
    spec = get_spec(name)
    model = getattr(transformers, family_of(spec).model_class).from_pretrained(directory).eval()
    if proc_cls is not None:
        proc = getattr(transformers, proc_cls).from_pretrained(directory)
        pixels = proc(images=images, return_tensors="np")["pixel_values"]
    else:  # DINOv3: Fast-only in transformers; its semantics as imgembed implements them, spec written here
        ref = PreprocessSpec("DINOv3ViTImageProcessor", kw["size"], "bicubic", None, None, MEAN, STD)
        pixels = preprocess_batch(images, ref)
    with torch.no_grad():
        return EmbeddingHead(model, spec).eval()(torch.from_numpy(np.ascontiguousarray(pixels))).numpy()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """``checkpoint(family)`` -> (checkpoint dir, artifact dir), built and exported once per module."""
    from imgembed.export.pipeline import ExportOptions, export_model

    root = tmp_path_factory.mktemp("ckpt")
    cache: dict[str, tuple[Path, Path]] = {}

    def get(family: str) -> tuple[Path, Path]:
        if family not in cache:
            ckpt = root / f"{family}-ckpt"
            _save_checkpoint(family, ckpt)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                res = export_model(CASES[family][0], root / f"{family}-art",
                                   ExportOptions(weights=ckpt, speed_check=False, backend="onnxruntime"))
            cache[family] = (ckpt, res.path)
        return cache[family]

    return get


@pytest.mark.parametrize("family", list(CASES))
def test_artifact_matches_hf_processor_and_model_from_the_checkpoint(family, checkpoint):
    ckpt, art = checkpoint(family)
    images = _images()
    ref = _hf_reference(family, ckpt, images)
    with imgembed.load(art, workers=0) as emb:
        ours = emb.embed(images)
    cos = cosine(ours, ref)
    print(f"{family}: FP32 min cosine vs HF processor + model from the checkpoint {cos.min():.7f}")
    assert cos.min() >= 0.99999, (family, cos)


@pytest.mark.parametrize("family", list(CASES))
def test_manifest_records_the_checkpoint_file_and_differing_keys(family, checkpoint):
    ckpt, art = checkpoint(family)
    m = json.loads((art / "manifest.json").read_text())
    src = m["preprocess_source"]
    assert src["source"] == "checkpoint"
    assert src["file"] == f"{ckpt.resolve()}/preprocessor_config.json"
    assert set(src["differs_from_registry"]) == DIFFERS[family]
    assert src["differs_from_registry"]["image_mean"]["checkpoint"] == m["preprocess"]["image_mean"]
    assert m["model"]["preprocess"] == m["preprocess"]
    if family == "dinov3":
        assert src["processor_type"] == "DINOv3ViTImageProcessorFast"


def test_runtime_load_original_with_weights_uses_the_checkpoint_preprocessing(checkpoint):
    ckpt, art = checkpoint("resnet")
    with imgembed.load("test-resnet-tiny", weights=ckpt, workers=0) as emb:
        assert emb.preprocess.to_dict() == json.loads((art / "manifest.json").read_text())["preprocess"]
        ref = _hf_reference("resnet", ckpt, _images())
        assert cosine(emb.embed(_images()), ref).min() >= 0.99999


def test_registry_default_without_a_processor_config_and_for_random_init(tmp_path):
    spec = get_spec("test-vit-tiny")
    (tmp_path / "config.json").write_text("{}")
    pre, record = resolve_preprocess(spec, tmp_path)
    assert pre == spec.preprocess and record["source"] == "registry"
    assert "no preprocessor_config.json" in record["reason"]
    assert resolve_preprocess(spec, random_init=True) == (spec.preprocess, {"source": "registry",
                                                                            "reason": "random-init"})


def test_input_size_from_config_json_where_the_processor_has_none(tmp_path):
    spec = get_spec("test-clip-tiny")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "clip", "projection_dim": 24,
                                                      "vision_config": {"image_size": 96}}))
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"image_processor_type": "CLIPImageProcessor"}))
    pre, record = resolve_preprocess(spec, tmp_path)
    assert (pre.size, pre.crop_size) == ({"shortest_edge": 96}, {"height": 96, "width": 96})
    assert record["input_size_from"] == "config.json"


def _resolve(tmp_path: Path, name: str, cfg: dict) -> PreprocessSpec:
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(cfg))
    return resolve_preprocess(get_spec(name), tmp_path)[0]


@pytest.mark.parametrize("cfg,key", [
    ({"image_processor_type": "ViTImageProcessor", "resample": 5}, "resample"),
    ({"image_processor_type": "ViTImageProcessor", "do_resize": False}, "do_resize"),
    ({"image_processor_type": "ViTImageProcessor", "size": {"longest_edge": 64}}, "size"),
    ({"image_processor_type": "Siglip2ImageProcessor"}, "image_processor_type"),
    ({"image_processor_type": "DINOv3ViTImageProcessorFast", "do_center_crop": True}, "do_center_crop"),
])
def test_unsupported_settings_raise_a_typed_error_naming_the_key(tmp_path, cfg, key):
    with pytest.raises(CheckpointPreprocessError, match=key) as err:
        _resolve(tmp_path, "test-vit-tiny", cfg)
    assert err.value.key == key and "preprocessor_config.json" in str(err.value)


def test_do_rescale_and_do_normalize_false_match_the_slow_processor(tmp_path):
    import transformers

    kw = dict(size={"height": 40, "width": 40}, do_rescale=False, do_normalize=False)
    transformers.ViTImageProcessor(**kw).save_pretrained(tmp_path)
    pre = resolve_preprocess(get_spec("test-vit-tiny"), tmp_path)[0]
    assert (pre.rescale_factor, pre.image_mean, pre.image_std) == (1.0, (0.0,) * 3, (1.0,) * 3)
    ref = transformers.ViTImageProcessor.from_pretrained(tmp_path)(images=_images(), return_tensors="np")
    np.testing.assert_array_equal(preprocess_batch(_images(), pre), ref["pixel_values"])


@pytest.mark.parametrize("slow,name", [("CLIPImageProcessor", "test-clip-tiny"), ("ViTImageProcessor", "test-vit-tiny"),
                                       ("BitImageProcessor", "test-dinov2-tiny"),
                                       ("ConvNextImageProcessor", "test-resnet-tiny"),
                                       ("SiglipImageProcessor", "test-siglip-tiny")])
def test_fast_processor_names_map_to_their_slow_twins(tmp_path, slow, name):
    import transformers

    cfg = getattr(transformers, slow)(resample=0, image_mean=MEAN, image_std=STD).to_dict()
    slow_spec = _resolve(tmp_path, name, {**cfg, "image_processor_type": slow})
    fast_spec = _resolve(tmp_path, name, {**cfg, **FAST_KEYS, "image_processor_type": slow + "Fast"})
    assert fast_spec == slow_spec and slow_spec.resample == "nearest"


def test_hub_preprocessor_config_offline_is_a_clear_weights_error(monkeypatch):
    from dataclasses import replace

    from imgembed.models.registry import Source

    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    spec = replace(get_spec("test-vit-tiny"), source=Source("no-such-org/no-such-model", "main"))
    with pytest.raises(WeightsError, match=r"preprocessor_config.json of no-such-org/no-such-model@main.*--weights"):
        resolve_preprocess(spec)


def test_recheck_refuses_a_checkpoint_whose_preprocessing_changed(checkpoint, tmp_path):
    from imgembed.export.pipeline import recheck_artifact

    ckpt, art = checkpoint("resnet")
    moved = tmp_path / "moved"
    shutil.copytree(ckpt, moved)
    cfg = json.loads((moved / "preprocessor_config.json").read_text())
    (moved / "preprocessor_config.json").write_text(json.dumps({**cfg, "image_mean": [0.1, 0.2, 0.3]}))
    with pytest.raises(ArtifactError, match="image_mean"):
        recheck_artifact(art, weights=moved)


def test_parity_on_a_directory_of_user_images_skips_unreadable_files(checkpoint, tmp_path):
    from typer.testing import CliRunner

    from imgembed.cli import app

    _, art = checkpoint("resnet")
    photos = tmp_path / "photos"
    photos.mkdir()
    for i, im in enumerate(_images()[:4]):
        im.save(photos / f"p{i}.png")
    (photos / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    res = CliRunner().invoke(app, ["parity", str(art), "--images", str(photos), "--json"])
    assert res.exit_code == 0, res.output
    assert "broken.jpg" in res.output
    report = json.loads(res.stdout[res.stdout.index("{"):])
    assert report["images"] == [f"p{i}.png" for i in range(4)] and report["passed"]
    assert len(report["image_dir"]["skipped"]) == 1 and report["metrics"]["min_cosine"] >= 0.99999

    empty = tmp_path / "empty"
    empty.mkdir()
    res = CliRunner().invoke(app, ["parity", str(art), "--images", str(empty)])
    assert res.exit_code == 1 and "ImageSetError" in res.output and "no readable image" in res.output


def test_image_dir_with_only_unreadable_files_names_them(tmp_path):
    from imgembed.preprocess.imagedir import load_image_dir

    (tmp_path / "a.png").write_bytes(b"nope")
    with pytest.raises(ImageSetError, match=r"1 file\(s\), none readable.*a.png"):
        load_image_dir(tmp_path)
