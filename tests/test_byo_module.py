"""Bring your own encoder: a convolutional autoencoder's encoder and a siamese net's twin (tests/byo_models.py)
exported through the Python API and the CLI, gated on parity against themselves, loaded and re-checked; weights
from safetensors and torch.save files; typed errors for bad factories, bad weights and bad outputs."""
from __future__ import annotations

import json
import os
import shutil
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import imgembed
from imgembed.artifact import sha256_file
from imgembed.bench.suite import write_sample_files
from imgembed.bench.targets import source_tag
from imgembed.errors import ArtifactError, CheckpointPreprocessError, ExportError, RegistryError, WeightsError
from imgembed.export import recipes
from imgembed.export.module_export import resolve_preprocess
from imgembed.export.pipeline import recheck_artifact
from imgembed.gate.samples import parity_images
from imgembed.models.registry import parse_registry
from imgembed.models.user_module import FactoryMismatchWarning
from imgembed.preprocess import PreprocessSpec, load_image, preprocess
from imgembed.preprocess.presets import preset

from . import byo_models
from .helpers import cosine, manifest_json, run_cli

CONV = "tests.byo_models:conv_encoder"
TWIN = "tests.byo_models:siamese_twin"
SIZE = 64
ARTIFACT_SUFFIXES = {".onnx", ".json", ".xml", ".bin"}  # ONNX, manifest, OpenVINO IR: no pickle, no code
FAST = {"backend": "onnxruntime", "speed_check": False}


def _export(module, out: Path, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Int8SlowerWarning is expected on toy models
        return imgembed.export_module(module, out, **{"name": "enc", "input_size": SIZE, **FAST, **kw})


def _seeded(factory, seed: int = 0) -> torch.nn.Module:
    """What the export builds: the factory called under ``seed``."""
    torch.manual_seed(seed)
    return factory().eval()


def _embed(module: torch.nn.Module, pixels: np.ndarray, normalize: bool = True) -> np.ndarray:
    with torch.no_grad():
        out = module(torch.from_numpy(pixels)).float()
    return (torch.nn.functional.normalize(out, dim=-1) if normalize else out).numpy()


def _parity_pixels(spec: PreprocessSpec, n: int = 6) -> np.ndarray:
    return np.stack([preprocess(im, spec) for _, im in parity_images()[:n]])


def _trained_like(seed: int) -> torch.nn.Module:
    """A conv encoder with other weights and non-trivial BatchNorm statistics."""
    module = _seeded(byo_models.conv_encoder, seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return module


@pytest.fixture(scope="module")
def conv_fp32(tmp_path_factory):
    """The conv encoder exported through the Python API, every installed engine raced and kept."""
    out = tmp_path_factory.mktemp("byo") / "conv-fp32"
    _export(CONV, out, name="conv-encoder", backend=None, keep_candidates=True)
    return out


# ------------------------------------------------------------------------------------------ FP32
def test_python_api_exports_the_conv_encoder_on_every_engine(conv_fp32):
    from imgembed.runtime.backends import get_backend

    m = manifest_json(conv_fp32)
    assert m["status"] == "passed" and m["name"] == "conv-encoder" and m["model"]["family"] == "module"
    assert m["parity"]["metrics"]["min_cosine"] >= 0.99999
    assert m["output"] == {"name": "embedding", "dim": byo_models.DIM, "normalized": True, "dtype": "float32"}
    assert m["model"]["arch"] == {"factory": CONV, "class": "torch.nn.modules.container.Sequential",
                                  "transformer": False}
    src = m["source"]
    assert (src["kind"], src["factory"], src["weights"], src["seed"]) == ("module", CONV, None, 0)
    assert len(src["state_sha256"]) == 64 and source_tag(src) == f"module-{src['state_sha256'][:10]}"
    backends = ["onnxruntime"] + ([] if get_backend("openvino").unavailable("cpu") else ["openvino"])
    assert {e["backend"] for e in m["engines"]} == set(backends)
    files = [p for p in conv_fp32.rglob("*") if p.is_file()]
    assert files and {p.suffix for p in files} <= ARTIFACT_SUFFIXES
    pixels = _parity_pixels(PreprocessSpec.from_dict(m["preprocess"]))
    expected = _embed(_seeded(byo_models.conv_encoder), pixels)
    for backend in backends:
        got = imgembed.load(conv_fp32, backend=backend).embed(list(parity_images()[i][1] for i in range(6)))
        assert cosine(got, expected).min() >= 0.99999, backend


def test_artifact_matches_the_module_on_a_real_photo(conv_fp32, tmp_path):
    photo = next(p for p in write_sample_files(tmp_path) if p.name == "astronaut.jpg")
    m = manifest_json(conv_fp32)
    spec = PreprocessSpec.from_dict(m["preprocess"])
    assert spec == preset("imagenet", SIZE) and spec.size == {"shortest_edge": 73}   # floor(64 / 0.875)
    vec = imgembed.load(conv_fp32).embed([photo])
    ref = _embed(_seeded(byo_models.conv_encoder), preprocess(load_image(photo), spec)[None])
    assert vec.shape == (1, byo_models.DIM) and np.linalg.norm(vec) == pytest.approx(1.0, abs=1e-5)
    assert cosine(vec[0], ref[0]) >= 0.99999
    np.testing.assert_allclose(vec, ref, atol=1e-5)


def test_instance_export_without_normalization_restores_the_training_flag(tmp_path):
    module = _seeded(byo_models.siamese_twin, 3).train()
    res = _export(module, tmp_path / "twin", preprocess="clip", normalize=False)
    m = manifest_json(res)
    assert module.training is True
    assert m["output"]["normalized"] is False and m["source"]["factory"] is None
    assert m["model"]["arch"]["transformer"] is True   # nn.MultiheadAttention inside
    pixels = _parity_pixels(preset("clip", SIZE))
    got = imgembed.load(res.path).embed([im for _, im in parity_images()[:6]])
    np.testing.assert_allclose(got, _embed(module.eval(), pixels, normalize=False), atol=1e-4)
    assert not np.allclose(np.linalg.norm(got, axis=1), 1.0)
    with pytest.raises(ArtifactError, match=r"module instance .*name the factory that builds it: --module"):
        recheck_artifact(res.path)


# ------------------------------------------------------------------------------------------ INT8
def test_int8_conv_encoder_passes_its_gate_with_cnn_presets(tmp_path):
    m = manifest_json(_export(byo_models.conv_encoder, tmp_path / "conv-int8", precision="int8"))
    assert m["source"]["factory"] == CONV             # an importable callable is recorded by its path
    limits = {"mean_cosine": 0.995, "min_cosine": 0.99, "knn_agreement": 0.9}
    assert m["status"] == "passed" and m["precision"] == "int8" and m["batch_invariant"] is True
    assert all(m["parity"]["metrics"][k] >= v for k, v in limits.items())
    ids = [c["id"] for c in m["selection"]["candidates"]]
    assert ids[:2] == [recipes.ORT_INT8_STATIC_QOPERATOR.id, recipes.ORT_INT8_STATIC_QDQ.id]   # CNN presets
    assert recipes.ORT_INT8_CLE.id in ids  # the equalized fallback (built only if the presets fail)
    assert m["export"]["quantization"]["quantized_ops"]


# ------------------------------------------------------------------------------------------ weights
@pytest.mark.parametrize("fmt", ["safetensors", "torch-save"])
def test_weights_file_is_loaded_safely_and_rechecked(tmp_path, fmt):
    from safetensors.torch import save_file

    trained = _trained_like(7)
    state = {k: v.contiguous() for k, v in trained.state_dict().items()}
    path = tmp_path / ("enc.safetensors" if fmt == "safetensors" else "enc.pt")
    save_file(state, str(path)) if fmt == "safetensors" else torch.save(state, path)
    res = _export(CONV, tmp_path / "art", weights=path)
    src = manifest_json(res)["source"]
    assert src["weights"] == {"path": str(path.resolve()), "sha256": sha256_file(path)}
    pixels = _parity_pixels(preset("imagenet", SIZE))
    got = imgembed.load(res.path).embed([im for _, im in parity_images()[:6]])
    assert cosine(got, _embed(trained, pixels)).min() >= 0.99999
    assert cosine(got, _embed(_seeded(byo_models.conv_encoder), pixels)).min() < 0.99   # not the factory's init
    assert recheck_artifact(res.path, module=CONV).passed                                 # factory + weights again
    moved = tmp_path / f"moved{path.suffix}"
    shutil.move(path, moved)
    with pytest.raises(ArtifactError, match="weights file .* is missing; pass the file with --weights"):
        recheck_artifact(res.path, module=CONV)
    assert recheck_artifact(res.path, weights=moved, module=CONV).passed
    other = tmp_path / f"other{path.suffix}"
    save_file({k: v + 1 for k, v in state.items()}, str(other)) if fmt == "safetensors" else \
        torch.save({k: v + 1 for k, v in state.items()}, other)
    with pytest.raises(ArtifactError, match="has sha256 .*, the artifact was exported from"):
        recheck_artifact(res.path, weights=other, module=CONV)


class _Payload:
    """Pickles to a call of os.system: what a malicious checkpoint carries."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_with_code_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    bad = tmp_path / "evil.pt"
    torch.save({"0.weight": _Payload(marker)}, bad)
    with pytest.raises(WeightsError, match=r"evil.pt: refused by torch.load\(weights_only=True\) \(it would import"):
        _export(CONV, tmp_path / "art", weights=bad)
    assert not marker.exists() and not (tmp_path / "art").exists()


@pytest.mark.parametrize("content, message", [
    (["not", "tensors"], "holds list, not a state dict"),
    ({"step": 3}, r"holds dict with keys \['step'\], not a state dict"),
    ({"encoder.0.weight": torch.zeros(16, 3, 3, 3)}, "missing key"),
    ({"0.weight": torch.zeros(5, 3, 3, 3)}, "does not fit Sequential"),
])
def test_weights_that_do_not_fit_are_weights_errors(tmp_path, content, message):
    path = tmp_path / "w.pt"
    torch.save(content, path)
    with pytest.raises(WeightsError, match=message):
        _export(CONV, tmp_path / "art", weights=path)
    with pytest.raises(WeightsError, match="does not exist"):
        _export(CONV, tmp_path / "art", weights=tmp_path / "missing.safetensors")


# ------------------------------------------------------------------------------------------ bad factories
@pytest.mark.parametrize("factory, message", [
    ("tests.byo_models", "is not of the form 'pkg.module:factory'"),
    ("tests.no_such_module:make", "cannot import 'tests.no_such_module'"),
    ("tests.byo_models:nope", "'tests.byo_models' has no attribute 'nope'"),
    ("tests.byo_models:NOT_CALLABLE", "is a int, not callable"),
    ("tests.byo_models:raising_factory", "raised RuntimeError: no GPU here"),
    ("tests.byo_models:not_a_module", "returned dict; expected a torch.nn.Module"),
    ("tests.byo_models:feature_map_encoder", "to a float32 tensor of shape (2, 8, 32, 32); expected a 2-D float"),
    ("tests.byo_models:tuple_encoder", "returned tuple for a (2, 3, 64, 64) batch"),
])
def test_bad_factories_are_export_errors_naming_them(tmp_path, factory, message):
    with pytest.raises(ExportError) as info:
        _export(factory, tmp_path / "art")
    assert message in str(info.value) and factory in str(info.value)
    assert not (tmp_path / "art").exists()


def test_bad_options_are_typed_errors(tmp_path):
    with pytest.raises(ExportError, match="unknown option.*random_init"):
        imgembed.export_module(CONV, tmp_path / "a", name="x", random_init=True)
    with pytest.raises(ExportError, match="name 'a b' must start"):
        imgembed.export_module(CONV, tmp_path / "a", name="a b")
    with pytest.raises(ExportError, match="neither a preset"):
        imgembed.export_module(CONV, tmp_path / "a", name="x", preprocess="clipp")


# ------------------------------------------------------------------------------------------ preprocessing
def test_presets_are_the_standard_clip_and_imagenet_transforms():
    clip_hf = PreprocessSpec.from_hf_config({"image_processor_type": "CLIPImageProcessor"})
    assert preset("clip", 224) == clip_hf                     # CLIP's processor defaults
    imagenet = preset("imagenet", 224)                        # torchvision Resize(256) + CenterCrop(224)
    assert (imagenet.size, imagenet.crop_size, imagenet.resample) == (
        {"shortest_edge": 256}, {"height": 224, "width": 224}, "bilinear")
    assert imagenet.image_mean == (0.485, 0.456, 0.406) and imagenet.output_hw == (224, 224)


def test_preprocessor_config_file_goes_through_the_hf_path(tmp_path):
    cfg = {"image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": 72},
           "crop_size": {"height": 64, "width": 64}, "resample": 2, "image_mean": [0.5, 0.5, 0.5],
           "image_std": [0.25, 0.25, 0.25]}
    path = tmp_path / "preprocessor_config.json"
    path.write_text(json.dumps(cfg))
    pre, record = resolve_preprocess(str(path), None)
    assert pre == PreprocessSpec.from_hf_config(cfg) and pre.output_hw == (64, 64)
    assert record == {"source": "file", "file": str(path.resolve()), "processor_type": "CLIPImageProcessor"}
    assert resolve_preprocess(path, 64)[0] == pre
    with pytest.raises(ExportError, match="input size 224 disagrees with the preprocessing, whose output is 64x64"):
        resolve_preprocess(path, 224)
    path.write_text(json.dumps({**cfg, "resample": 4}))                      # box: not reproducible
    with pytest.raises(CheckpointPreprocessError, match="resample=4 is not supported") as info:
        resolve_preprocess(path, None)
    assert info.value.key == "resample"


def test_registry_entries_cannot_use_the_module_family():
    doc = textwrap.dedent("""
        models:
          mine:
            family: module
            source: null
            arch: {factory: "pkg.mod:make"}
            embedding: {output: forward, pooling: none, normalize: true, dim: 8}
            preprocess: {processor: ViTImageProcessor, size: {height: 32, width: 32}, resample: bilinear,
                         image_mean: [0.5, 0.5, 0.5], image_std: [0.5, 0.5, 0.5]}
    """)
    with pytest.raises(RegistryError, match="family 'module' is for your own torch modules"):
        parse_registry(doc, "user.yaml")


# ------------------------------------------------------------------------------------------ re-checks
def test_recheck_rebuilds_from_the_factory_the_caller_names(conv_fp32, recwarn):
    with pytest.raises(ArtifactError, match=f"pass --module '{CONV}' .* or --trust-manifest-factory"):
        recheck_artifact(conv_fp32)
    assert recheck_artifact(conv_fp32, module=CONV).passed
    assert recheck_artifact(conv_fp32, module=byo_models.conv_encoder).passed   # a callable, same path
    assert not [w for w in recwarn if issubclass(w.category, FactoryMismatchWarning)]
    with pytest.warns(FactoryMismatchWarning, match=f"records the factory '{CONV}'; rebuilding it with .*<lambda>"):
        assert recheck_artifact(conv_fp32, module=lambda: byo_models.conv_encoder()).passed
    with pytest.raises(ArtifactError, match="factory 'tests.byo_models:siamese_twin' builds a module whose state "
                                            "differs"), pytest.warns(FactoryMismatchWarning):
        recheck_artifact(conv_fp32, module=TWIN)


def test_trusting_the_manifest_factory_prints_the_module_first(conv_fp32, tmp_path, capfd):
    assert recheck_artifact(conv_fp32, trust_manifest_factory=True).passed
    assert (f"--trust-manifest-factory: importing module 'tests.byo_models' (factory '{CONV}') named by the "
            "manifest of module artifact 'conv-encoder'") in capfd.readouterr().err
    broken = tmp_path / "art"
    shutil.copytree(conv_fp32, broken)
    manifest = json.loads((broken / "manifest.json").read_text())
    manifest["source"]["factory"] = "tests.byo_models_gone:conv_encoder"
    (broken / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="needs its factory 'tests.byo_models_gone:conv_encoder' importable"):
        recheck_artifact(broken, trust_manifest_factory=True)
    manifest["source"]["factory"], manifest["source"]["seed"] = CONV, 1   # the factory now builds other weights
    (broken / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="state differs from the exported one"):
        recheck_artifact(broken, trust_manifest_factory=True)
    manifest["source"]["seed"] = "0"
    (broken / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=r"not a valid imgembed manifest \(format 2\): source.module.seed: Input "
                                            "should be a valid integer"):
        recheck_artifact(broken, module=CONV)


# ------------------------------------------------------------------------------------------ CLI
def test_cli_exports_the_siamese_twin_and_rechecks_it(tmp_path):
    out = tmp_path / "twin"
    res = run_cli("export", "--module", TWIN, "--name", "twin", "--preprocess", "clip", "--input-size", str(SIZE),
                  "--backend", "onnxruntime", "--no-speed-check", "--out", str(out))
    assert res.returncode == 0, res.stderr
    assert "parity (fp32) over 26 images at batch sizes 1, 3, 8: PASS" in res.stdout
    m = manifest_json(out)
    assert (m["name"], m["source"]["factory"], m["model"]["arch"]["transformer"]) == ("twin", TWIN, True)
    assert m["preprocess"] == preset("clip", SIZE).to_dict()
    assert {p.suffix for p in out.rglob("*") if p.is_file()} <= ARTIFACT_SUFFIXES
    res = run_cli("parity", str(out), "--json", "--module", TWIN)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["metrics"] == pytest.approx(m["parity"]["metrics"], abs=1e-6)


@pytest.mark.parametrize("args, code, message", [
    (("--module", "tests.byo_models:feature_map_encoder", "--name", "x", "--input-size", "64"), 1,
     "ExportError): tests.byo_models:feature_map_encoder: the module maps a (2, 3, 64, 64) batch"),
    (("--module", CONV), 2, "--module needs --name NAME"),
    (("test-vit-tiny", "--module", CONV, "--name", "x"), 2, "either a registry model NAME (test-vit-tiny) or --module"),
    (("test-vit-tiny", "--preprocess", "clip"), 2, "--preprocess: for --module exports only"),
    (("--module", CONV, "--name", "x", "--weights", "w"), 2, "give a module's weights file with --module-weights"),
])
def test_cli_module_errors_are_one_line(tmp_path, args, code, message):
    res = run_cli("export", *args, "--out", str(tmp_path / "o"), cwd=tmp_path)
    assert res.returncode == code, (res.stdout, res.stderr)
    assert message in res.stderr.replace("\n", " ")
    assert "Traceback" not in res.stderr and not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------ INT8 of ReLU6 CNNs
def test_cli_int8_of_a_depthwise_relu6_module_reports_every_recipe(tmp_path):
    """Depthwise-separable, ReLU6, explicit TF padding, an outlier channel: cross-layer equalization does not
    apply (ReLU6) and says so instead of losing its work file, every candidate is built or named with its
    reason, the mixed-precision last resort is built when no full-INT8 preset passes, and the export ends in
    one typed outcome (here the closest engine kept and marked failed: exit 2), never a traceback."""
    out = tmp_path / "dw"
    res = run_cli("export", "--module", "tests.byo_models:depthwise_separable", "--name", "dw", "--input-size",
                  str(SIZE), "--int8", "--backend", "onnxruntime", "--no-speed-check", "--keep-failed",
                  "--out", str(out))
    assert "Traceback" not in res.stderr and "FileNotFoundError" not in res.stderr
    assert res.returncode == 2, res.stderr
    manifest = manifest_json(out)
    rows = {r["id"]: r for r in manifest["selection"]["candidates"]}
    assert "cross-layer equalization does not apply" in rows[recipes.ORT_INT8_CLE.id]["why_not"]
    full = [r for i, r in rows.items() if i.startswith("onnxruntime-int8-static")]
    assert len(full) == 3 and not any(r["passed"] for r in full)
    assert rows[recipes.ORT_INT8_MIXED.id]["metrics"] is not None  # built: no full-INT8 candidate passed
    # static-qdq failed: its rounding fallback (GPTQ-style weights + bias correction) was built and gated, and
    # its weights are closer to the float function than the preset's round-to-nearest ones
    rounded, qdq = rows[recipes.ORT_INT8_ROUNDED.id], rows[recipes.ORT_INT8_STATIC_QDQ.id]
    assert rounded["metrics"]["mean_cosine"] > qdq["metrics"]["mean_cosine"], (rounded, qdq)
    assert manifest["status"] == "failed"
