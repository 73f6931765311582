"""Families: one record per family, the SigLIP / SigLIP 2 / DINOv3 / DINOv2-with-registers entries, loading
(local save_pretrained directories, full image-text checkpoints), rebuilding originals from manifest source
records, export surgery and the FP32 parity gate on tiny and (marker ``slow``) full-size architectures."""
from __future__ import annotations

import re
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from imgembed.artifact import MODEL_FILE
from imgembed.errors import RegistryError, WeightsError
from imgembed.export.onnx_export import op_counts
from imgembed.models.families import FAMILIES, family_of, load_original, original_from_source, source_record
from imgembed.models.registry import get_spec, parse_registry, registry

from .helpers import manifest_json

REPO = Path(__file__).resolve().parents[1]
NEW_TINY = ("test-siglip-tiny", "test-dinov3-tiny", "test-dinov2-reg-tiny")
NEW_FULL = {  # name -> (hub repo, family, embedding dim)
    "siglip-b16": ("google/siglip-base-patch16-224", "siglip", 768),
    "siglip-so400m-p14-384": ("google/siglip-so400m-patch14-384", "siglip", 1152),
    "siglip2-b16": ("google/siglip2-base-patch16-224", "siglip", 768),
    "dinov3-vits16": ("facebook/dinov3-vits16-pretrain-lvd1689m", "dinov3", 384),
    "dinov3-vitb16": ("facebook/dinov3-vitb16-pretrain-lvd1689m", "dinov3", 768),
    "dinov2-small-reg": ("facebook/dinov2-with-registers-small", "dinov2-reg", 384),
    "dinov2-base-reg": ("facebook/dinov2-with-registers-base", "dinov2-reg", 768),
}


def _pixels(spec, n: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).standard_normal((n, 3, *spec.input_hw), dtype=np.float32))


def _embed(head, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return head(x).numpy()


# ------------------------------------------------------------------------------------------ records
def test_every_registry_entry_names_a_family_record():
    assert {s.family for s in registry().values()} <= {n for n, f in FAMILIES.items() if f.in_registry}
    for name, fam in FAMILIES.items():
        assert fam.name == name
        if fam.in_registry:  # the module family (users' own nn.Modules) has no transformers classes
            assert hasattr(transformers, fam.config_class) and hasattr(transformers, fam.model_class)


def test_unknown_family_is_rejected_listing_the_records():
    doc = textwrap.dedent("""
        models:
          x:
            family: siglip3
            source: null
            arch: {}
            embedding: {output: pooler_output, pooling: none, normalize: false, dim: 8}
            preprocess: {processor: SiglipImageProcessor, size: {height: 32, width: 32}, resample: bicubic,
                         image_mean: [0.5, 0.5, 0.5], image_std: [0.5, 0.5, 0.5]}
    """)
    with pytest.raises(RegistryError, match=r"family 'siglip3' is not one of \[.*'dinov3'.*'siglip'"):
        parse_registry(doc, "user.yaml")


def test_registry_and_core_import_without_torch():
    code = ("import sys, imgembed, imgembed.models.registry, imgembed.models.families, imgembed.preprocess; "
            "print(sorted(m for m in ('torch', 'onnxruntime', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]"


def test_no_code_branches_on_family_names():
    """Family names appear in the records (families.py) and the registry data, nowhere else in the package."""
    names = "|".join(map(re.escape, FAMILIES))
    pattern = re.compile(rf"""(family\s*(==|!=|in)|FAMILIES\[)\s*\(?["']({names})["']""")
    offenders = [str(p.relative_to(REPO)) for p in (REPO / "imgembed").rglob("*.py")
                 if p.name != "families.py" and pattern.search(p.read_text(encoding="utf-8"))]
    assert offenders == []


def test_fusion_types_and_surgery_per_family():
    assert {n: f.ort_model_type for n, f in FAMILIES.items()} == {
        "clip": "clip", "vit": "vit", "dinov2": "vit", "dinov2-reg": "vit", "dinov3": "vit", "siglip": "clip",
        "resnet": None, "module": None}
    assert [s.name for s in FAMILIES["dinov3"].surgery] == ["frozen-rope-tables"]
    assert [s.name for s in FAMILIES["dinov2-reg"].surgery] == ["frozen-position-embeddings", "folded-layer-scale"]


# ------------------------------------------------------------------------------------ new entries
@pytest.mark.parametrize("name", sorted(NEW_FULL))
def test_new_models_are_registered_with_hub_sources(name):
    hub, family, dim = NEW_FULL[name]
    spec = get_spec(name)
    assert (spec.source.hub, spec.family, spec.embedding.dim) == (hub, family, dim)
    assert (spec.embedding.output, spec.embedding.pooling) == ("pooler_output", "none")
    assert not spec.is_test


def test_new_architectures_carry_the_hub_config_values():
    so400m = get_spec("siglip-so400m-p14-384")
    assert dict(so400m.arch) == {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27,
                                 "num_attention_heads": 16, "patch_size": 14, "image_size": 384}
    assert so400m.input_hw == (384, 384)
    s3, b3 = get_spec("dinov3-vits16").arch, get_spec("dinov3-vitb16").arch
    assert (s3["num_register_tokens"], s3["rope_theta"], s3["patch_size"], s3["key_bias"]) == (4, 100.0, 16, False)
    assert (s3["hidden_size"], s3["intermediate_size"], s3["num_attention_heads"]) == (384, 1536, 6)
    assert (b3["hidden_size"], b3["intermediate_size"], b3["num_attention_heads"]) == (768, 3072, 12)
    assert get_spec("dinov2-base-reg").arch["num_register_tokens"] == 4


def test_preprocessing_of_the_new_entries_mirrors_the_hub_configs():
    sig, sig2, dino3 = (get_spec(n).preprocess for n in ("siglip-b16", "siglip2-b16", "dinov3-vits16"))
    assert (sig.processor, sig.resample, sig.output_hw, sig.image_mean) == \
        ("SiglipImageProcessor", "bicubic", (224, 224), (0.5, 0.5, 0.5))
    assert (sig2.processor, sig2.resample) == ("SiglipImageProcessor", "bilinear")  # hub: resample 2
    assert (dino3.processor, dino3.resample, dino3.crop_size, dino3.image_std) == \
        ("DINOv3ViTImageProcessor", "bilinear", None, (0.229, 0.224, 0.225))
    assert get_spec("dinov2-small-reg").preprocess == get_spec("dinov2-small").preprocess


@pytest.mark.parametrize("name", NEW_TINY)
def test_tiny_models_embed_with_the_declared_dim(name):
    spec = get_spec(name)
    out = _embed(load_original(spec, random_init=True), _pixels(spec))
    assert out.shape == (3, spec.embedding.dim) and np.isfinite(out).all()
    if spec.embedding.normalize:
        np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-6)


def test_dinov3_and_registers_embedding_is_the_normed_cls_token():
    for name in ("test-dinov3-tiny", "test-dinov2-reg-tiny"):
        spec = get_spec(name)
        head = load_original(spec, random_init=True)
        x = _pixels(spec)
        with torch.no_grad():
            hidden = head.model(pixel_values=x).last_hidden_state
        np.testing.assert_array_equal(_embed(head, x), hidden[:, 0].numpy())


# ---------------------------------------------------------------------------------------- loading
@pytest.mark.parametrize("name", NEW_TINY)
def test_local_save_pretrained_dir_loads_the_same_model(tmp_path, name):
    spec = get_spec(name)
    head = load_original(spec, random_init=True, seed=3)
    head.model.save_pretrained(tmp_path)
    x = _pixels(spec)
    np.testing.assert_array_equal(_embed(load_original(spec, weights=tmp_path), x), _embed(head, x))


def test_full_siglip_checkpoint_yields_its_vision_tower(tmp_path):
    spec = get_spec("test-siglip-tiny")
    text = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=50)
    torch.manual_seed(1)
    full = transformers.SiglipModel(transformers.SiglipConfig(text_config=text, vision_config=dict(spec.arch))).eval()
    full.save_pretrained(tmp_path)
    x = _pixels(spec)
    with torch.no_grad():
        ref = torch.nn.functional.normalize(full.get_image_features(pixel_values=x), dim=-1).numpy()
    head = load_original(spec, weights=tmp_path)
    assert type(head.model).__name__ == "SiglipVisionModel"
    np.testing.assert_allclose(_embed(head, x), ref, atol=1e-6)


def test_missing_weights_dir_is_a_weights_error(tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        load_original(get_spec("test-dinov3-tiny"), weights=tmp_path / "nope")


# ------------------------------------------------------------------------- rebuilding from a manifest
def test_original_from_source_rebuilds_random_init_and_local(tmp_path):
    spec = get_spec("test-dinov3-tiny")
    x = _pixels(spec)
    head = load_original(spec, random_init=True, seed=7)
    rebuilt = original_from_source(spec, source_record(spec, None, True, seed=7))
    np.testing.assert_array_equal(_embed(rebuilt, x), _embed(head, x))
    head.model.save_pretrained(tmp_path / "w")
    local = source_record(spec, tmp_path / "w", False)
    assert local == {"kind": "local", "path": str((tmp_path / "w").resolve())}
    np.testing.assert_array_equal(_embed(original_from_source(spec, local), x), _embed(head, x))
    hub = {"kind": "hub", "repo": "facebook/dinov3-vits16-pretrain-lvd1689m", "revision": "main"}
    np.testing.assert_array_equal(_embed(original_from_source(spec, hub, weights_override=tmp_path / "w"), x),
                                  _embed(head, x))


def test_original_from_source_errors():
    spec = get_spec("test-siglip-tiny")
    with pytest.raises(WeightsError, match=r"unknown source kind 'ftp'.*'random-init', 'local', 'hub' or 'module'"):
        original_from_source(spec, {"kind": "ftp"})
    with pytest.raises(WeightsError, match="does not exist"):
        original_from_source(spec, {"kind": "local", "path": "/nonexistent/imgembed-weights"})


# ---------------------------------------------------------------------------------- export surgery
def test_dinov3_rope_tables_are_frozen_for_the_input_size():
    spec = get_spec("test-dinov3-tiny")
    head = load_original(spec, random_init=True)
    x = _pixels(spec)
    before = _embed(head, x)
    assert family_of(spec).prepare_export(head, spec, optimize=False) == ["frozen-rope-tables"]
    np.testing.assert_array_equal(_embed(head, x), before)
    with pytest.raises(ValueError, match=r"frozen for 64x64, got \(32, 32\)"):
        head.model.rope_embeddings(torch.zeros(1, 3, 32, 32))


def test_dinov2_registers_surgery_keeps_the_embedding():
    spec = get_spec("test-dinov2-reg-tiny")
    head = load_original(spec, random_init=True)
    x = _pixels(spec)
    before = _embed(head, x)
    applied = family_of(spec).prepare_export(head, spec, optimize=True)
    assert applied == ["frozen-position-embeddings", "folded-layer-scale"]
    np.testing.assert_allclose(_embed(head, x), before, atol=1e-5)


@pytest.mark.parametrize("name", NEW_TINY)
def test_tiny_fp32_export_passes_the_parity_gate(artifact_dir, name):
    path = artifact_dir(name, "fp32")
    m = manifest_json(path)
    assert m["status"] == "passed" and m["parity"]["passed"]
    assert m["parity"]["metrics"]["min_cosine"] >= 0.99999
    ops = op_counts(path / MODEL_FILE)
    assert not {"Resize", "Range", "Cos", "Sin"} & set(ops)  # position tables are constants


def test_tiny_registers_export_fuses_attention_in_every_layer(artifact_dir):
    m = manifest_json(artifact_dir("test-dinov2-reg-tiny", "fp32"))
    assert m["export"]["fused_ops"]["Attention"] == get_spec("test-dinov2-reg-tiny").arch["num_hidden_layers"]


# ---------------------------------------------------------------------------- full size (tier 1)
@pytest.mark.slow
@pytest.mark.parametrize("name", ["siglip-b16", "dinov3-vits16", "dinov2-small-reg"])
def test_full_size_fp32_export_passes_the_gate(tmp_path, name):
    from imgembed.export.pipeline import ExportOptions, export_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = export_model(name, tmp_path / name, ExportOptions(precision="fp32", random_init=True, speed_check=False,
                                                                  backend="onnxruntime"))
    m = manifest_json(res.path)
    assert m["status"] == "passed" and m["output"]["dim"] == get_spec(name).embedding.dim
    assert m["parity"]["metrics"]["min_cosine"] >= 0.99999, m["parity"]["metrics"]
