"""The Embedder and load(): input kinds, batching, error reporting, local weights, typed errors."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

import imgembed
from imgembed.artifact import MANIFEST, MODEL_FILE
from imgembed.errors import ArtifactError, ImageDecodeError, IntegrityError, UnknownModelError, WeightsError
from imgembed.gate.samples import parity_images
from imgembed.models.registry import get_spec


@pytest.fixture(scope="module")
def photos():
    return [img.convert("RGB") for _, img in parity_images()[:5]]


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_every_input_kind_gives_the_same_vector(artifact_dir, photos, tmp_path):
    emb = imgembed.load(artifact_dir("test-dinov2-tiny", "fp32"))
    img = photos[0]
    path = tmp_path / "a.png"
    img.save(path)
    vecs = emb.embed([str(path), path, img, np.asarray(img), _png_bytes(img)])
    assert vecs.shape == (5, 32) and vecs.dtype == np.float32
    for v in vecs[1:]:
        np.testing.assert_allclose(v, vecs[0], rtol=0, atol=1e-6)
    np.testing.assert_allclose(emb.embed(img)[0], vecs[0], atol=1e-6)  # a single image is a batch of one


def test_artifact_matches_original_through_the_same_preprocessing(artifact_dir, photos):
    art = imgembed.load(artifact_dir("test-vit-tiny", "fp32"))
    orig = imgembed.load("test-vit-tiny", random_init=True)
    assert (orig.runner.backend, art.runner.backend) == ("torch", "onnxruntime")
    np.testing.assert_allclose(art.embed(photos), orig.embed(photos), atol=1e-4)


def test_batch_size_and_order(artifact_dir, photos):
    emb = imgembed.load(artifact_dir("test-resnet-tiny", "fp32"), batch_size=2)
    a = emb.embed(photos)
    b = emb.embed(photos, batch_size=5)
    c = emb.embed(photos[::-1], batch_size=1)[::-1]
    np.testing.assert_allclose(a, b, atol=1e-5)
    np.testing.assert_allclose(a, c, atol=1e-5)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        emb.embed(photos, batch_size=0)


def test_bad_item_raises_naming_it_or_is_reported_without_losing_good_ones(artifact_dir, photos, tmp_path):
    emb = imgembed.load(artifact_dir("test-clip-tiny", "fp32"))  # FP32: INT8 dynamic ranges are per batch
    bad = tmp_path / "corrupt.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    items = [photos[0], str(bad), photos[1], b"junk", photos[2]]
    with pytest.raises(ImageDecodeError, match="corrupt.jpg"):
        emb.embed(items)
    res = emb.embed(items, on_error="report", batch_size=2)
    assert res.indices == [0, 2, 4] and res.vectors.shape == (3, 24)
    assert [i for i, _ in res.errors] == [1, 3]
    assert "corrupt.jpg" in res.errors[0][1] and "item 3" in res.errors[1][1]
    np.testing.assert_allclose(res.vectors, emb.embed([photos[0], photos[1], photos[2]]), atol=1e-6)
    with pytest.raises(ValueError, match="on_error='skip'; expected one of"):
        emb.embed(items, on_error="skip")


def test_missing_file_is_typed(artifact_dir, tmp_path):
    emb = imgembed.load(artifact_dir("test-clip-tiny", "fp32"))
    with pytest.raises(ImageDecodeError, match=r"nope\.jpg.*not found"):
        emb.embed([tmp_path / "nope.jpg"])


def test_tampered_artifact_is_refused(artifact_dir, tmp_path):
    import shutil

    src = artifact_dir("test-clip-tiny", "fp32")
    dst = tmp_path / "copy"
    shutil.copytree(src, dst)
    imgembed.load(dst)  # intact copy loads
    data = bytearray((dst / MODEL_FILE).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (dst / MODEL_FILE).write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=r"sha256 mismatch for \['model.onnx'\]"):
        imgembed.load(dst)
    manifest = json.loads((dst / MANIFEST).read_text())
    (dst / MANIFEST).write_text(json.dumps({k: v for k, v in manifest.items() if k != "files"}))
    with pytest.raises(ArtifactError, match="not an imgembed manifest"):
        imgembed.load(dst)


def test_load_errors_are_typed(tmp_path):
    with pytest.raises(UnknownModelError, match="Did you mean 'dinov2-small'"):
        imgembed.load("dinov2-smal")
    with pytest.raises(ArtifactError, match="artifact directory .*missing does not exist"):
        imgembed.load(str(tmp_path / "missing"))
    (tmp_path / "plain").mkdir()
    with pytest.raises(ArtifactError, match="not an imgembed artifact: no manifest.json"):
        imgembed.load(tmp_path / "plain")
    with pytest.raises(WeightsError, match="weights directory .*nowhere does not exist"):
        imgembed.load("test-vit-tiny", weights=tmp_path / "nowhere")
    with pytest.raises(WeightsError, match="has no weight source; pass --random-init or --weights"):
        imgembed.load("test-vit-tiny")
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsError, match="no config.json"):
        imgembed.load("test-vit-tiny", weights=tmp_path / "empty")


@pytest.mark.parametrize("name", ["test-vit-tiny", "test-dinov2-tiny", "test-resnet-tiny", "test-clip-tiny"])
def test_local_save_pretrained_directory_loads_through_the_same_path(name, tmp_path, photos):
    """Random weights saved with save_pretrained load back (as users' local checkpoints do) and give the
    same vectors as the in-memory original."""
    from imgembed.models.families import load_original

    head = load_original(get_spec(name), random_init=True, seed=7)
    head.model.save_pretrained(tmp_path / "ckpt")
    local = imgembed.load(name, weights=tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json", "model.safetensors"]
    import torch

    from imgembed.preprocess import preprocess_batch

    pixels = preprocess_batch(photos, get_spec(name).preprocess)
    with torch.inference_mode():
        expected = head(torch.from_numpy(pixels)).numpy()
    np.testing.assert_allclose(local.embed(photos), expected, atol=1e-5)


def test_full_clip_checkpoint_yields_its_vision_tower_with_projection(tmp_path, photos):
    """A full CLIPModel directory (text + vision, as on the hub) loads as the image encoder."""
    import torch
    import transformers

    spec = get_spec("test-clip-tiny")
    vision = dict(spec.arch)
    proj = vision.pop("projection_dim")
    cfg = transformers.CLIPConfig(text_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                                               "num_attention_heads": 2, "vocab_size": 99},
                                  vision_config=vision, projection_dim=proj)
    torch.manual_seed(3)
    full = transformers.CLIPModel(cfg).eval()
    full.save_pretrained(tmp_path / "clip")
    emb = imgembed.load("test-clip-tiny", weights=tmp_path / "clip")
    from imgembed.preprocess import preprocess_batch

    pixels = torch.from_numpy(preprocess_batch(photos, spec.preprocess))
    with torch.inference_mode():
        expected = torch.nn.functional.normalize(full.get_image_features(pixel_values=pixels), dim=-1).numpy()
    np.testing.assert_allclose(emb.embed(photos), expected, atol=1e-5)


def test_load_pipelines_decoding_by_default_with_the_same_vectors(artifact_dir):
    from imgembed.runtime.pipeline import default_workers

    photos = [img for _, img in parity_images()[:9]]
    default = imgembed.load(artifact_dir("test-clip-tiny", "int8"))
    assert default.workers == default_workers() >= 1
    inline = imgembed.load(artifact_dir("test-clip-tiny", "int8"), workers=0)
    assert inline.workers == 0
    np.testing.assert_array_equal(default.embed(photos, batch_size=4), inline.embed(photos, batch_size=4))
