"""Registry: models.yaml parses into frozen specs, bad entries are typed errors, user files add variants."""
from __future__ import annotations

import dataclasses
import textwrap

import pytest
import torch
import transformers
from torch.utils.flop_counter import FlopCounterMode

from imgembed.errors import RegistryError, UnknownModelError
from imgembed.models.families import FAMILIES, EmbeddingHead
from imgembed.models.registry import _load, get_spec, list_models, parse_registry, registry

REQUIRED = {"clip-vit-b32": 512, "clip-vit-b16": 512, "clip-vit-l14": 768, "vit-b16": 768, "dinov2-small": 384,
            "dinov2-base": 768, "dinov2-large": 1024, "resnet50": 2048, "resnet18": 512, "siglip-b16": 768,
            "siglip-so400m-p14-384": 1152, "siglip2-b16": 768, "dinov3-vits16": 384, "dinov3-vitb16": 768,
            "dinov2-small-reg": 384, "dinov2-base-reg": 768}


def test_required_models_are_registered_with_hub_sources():
    specs = registry()
    for name, dim in REQUIRED.items():
        spec = specs[name]
        assert spec.embedding.dim == dim
        assert spec.source is not None and "/" in spec.source.hub
    assert specs["clip-vit-b32"].source.hub == "openai/clip-vit-base-patch32"
    assert specs["vit-b16"].source.hub == "google/vit-base-patch16-224-in21k"
    assert specs["resnet50"].source.hub == "microsoft/resnet-50"
    assert specs["dinov2-small"].source.hub == "facebook/dinov2-small"


def test_specs_are_frozen():
    spec = get_spec("clip-vit-b32")
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.name = "x"  # type: ignore[misc]


def test_test_models_hidden_by_default():
    assert not any(s.is_test for s in list_models())
    assert {s.name for s in list_models(include_test=True) if s.is_test} >= {"test-clip-tiny", "test-resnet-tiny"}


def test_unknown_model_lists_close_matches():
    with pytest.raises(UnknownModelError, match=r"unknown model 'clip-vit-b23'.*Did you mean 'clip-vit-b32'"):
        get_spec("clip-vit-b23")
    with pytest.raises(UnknownModelError, match="Known models: clip-vit-b32"):
        get_spec("zzz")


@pytest.mark.parametrize("name", sorted(REQUIRED))
def test_arch_builds_real_architecture_with_declared_dim_and_flops(name):
    """Every full-size entry builds (on the meta device: no memory, no weights; on the CPU where a forward
    cannot run on meta, e.g. DINOv3's RoPE under torch.autocast) with the declared output dim, and its
    registry GFLOPs match torch's FLOP counter within 2%."""
    spec = get_spec(name)
    fam = FAMILIES[spec.family]
    extra = {"attn_implementation": "eager"} if fam.is_transformer else {}
    config = getattr(transformers, fam.config_class)(**spec.arch, **extra)
    for device in ("meta", "cpu"):
        try:
            with torch.device(device), torch.no_grad():
                head = EmbeddingHead(getattr(transformers, fam.model_class)(config).eval(), spec)
                with FlopCounterMode(display=False) as counter:
                    out = head(torch.zeros(1, 3, *spec.input_hw))
            break
        except RuntimeError:
            assert device == "meta"
    assert tuple(out.shape) == (1, spec.embedding.dim)
    assert counter.get_total_flops() / 1e9 == pytest.approx(spec.gflops, rel=0.02)


def _entry(**over) -> str:
    base = {
        "family": "vit", "source": "null",
        "arch": "{hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, num_attention_heads: 4, "
                "patch_size: 16, image_size: 64}",
        "embedding": "{output: last_hidden_state, pooling: cls, normalize: false, dim: 32}",
        "preprocess": "{processor: ViTImageProcessor, size: {height: 64, width: 64}, resample: bilinear, "
                      "crop_size: null, crop_pct: null, image_mean: [0.5, 0.5, 0.5], image_std: [0.5, 0.5, 0.5]}",
    }
    base.update(over)
    lines = "\n".join(f"    {k}: {v}" for k, v in base.items() if v is not None)
    return f"models:\n  my-model:\n{lines}\n"


@pytest.mark.parametrize("override, message", [
    ({"family": "swin"}, r"family 'swin' is not one of"),
    ({"embedding": "{output: x, pooling: max, normalize: false, dim: 32}"}, r"pooling 'max' is not one of"),
    ({"embedding": "{output: x, pooling: cls, normalize: false, dim: -3}"}, r"dim must be a positive integer"),
    ({"embedding": "{output: x, pooling: cls, normalize: false}"}, r"missing required key 'dim'"),
    ({"colour": "red"}, r"unknown key\(s\) \['colour'\]"),
    ({"parity": "{int4: {min_cosine: 0.9}}"}, r"unknown precision 'int4'"),
    ({"parity": "{int8: {cosine: 0.9}}"}, r"parity.int8: unknown key\(s\) \['cosine'\]"),
    ({"source": "{repo: x}"}, r"source must be null or a mapping with 'hub'"),
    ({"preprocess": "{processor: ViTImageProcessor}"}, r"model 'my-model'"),
])
def test_bad_entries_are_typed_errors_naming_the_field(override, message):
    with pytest.raises(RegistryError, match=message):
        parse_registry(_entry(**override), "user.yaml")


def test_not_yaml_and_missing_models_key():
    with pytest.raises(RegistryError, match="user.yaml: not valid YAML"):
        parse_registry("models: [unclosed", "user.yaml")
    with pytest.raises(RegistryError, match="expected a top-level 'models:' mapping"):
        parse_registry("foo: 1", "user.yaml")


def test_parity_overrides_merge_with_defaults():
    spec = parse_registry(_entry(parity="{int8: {min_cosine: 0.95}}"), "u.yaml")["my-model"]
    assert spec.thresholds("int8") == {"mean_cosine": 0.995, "min_cosine": 0.95, "knn_agreement": 0.9}
    assert spec.thresholds("fp32") == {"min_cosine": 0.99999}


def test_user_registry_file_adds_a_variant_with_yaml_only(tmp_path, monkeypatch):
    """A new variant of an existing family needs nothing but a YAML entry (IMGEMBED_MODELS)."""
    path = tmp_path / "extra.yaml"
    path.write_text(textwrap.dedent(_entry()))
    monkeypatch.setenv("IMGEMBED_MODELS", str(path))
    _load.cache_clear()
    try:
        spec = get_spec("my-model")
        assert spec.family == "vit" and spec.input_hw == (64, 64)
        import imgembed

        emb = imgembed.load("my-model", random_init=True)
        from imgembed.gate.samples import parity_images

        vecs = emb.embed([img for _, img in parity_images()[:3]])
        assert vecs.shape == (3, 32) and vecs.dtype == "float32"
    finally:
        monkeypatch.delenv("IMGEMBED_MODELS")
        _load.cache_clear()
    with pytest.raises(UnknownModelError):
        get_spec("my-model")


def test_missing_user_registry_file_is_a_typed_error(tmp_path, monkeypatch):
    monkeypatch.setenv("IMGEMBED_MODELS", str(tmp_path / "nope.yaml"))
    _load.cache_clear()
    try:
        with pytest.raises(RegistryError, match="cannot read registry file .*nope.yaml"):
            registry()
    finally:
        monkeypatch.delenv("IMGEMBED_MODELS")
        _load.cache_clear()
