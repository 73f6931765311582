"""Text towers (``export --text``): tokenizer ids vs transformers, text parity vs the PyTorch original, the
runtime's embed_text / rank / classify vs transformers' own CLIP and SigLIP models, and the errors.

Checkpoints are full image-text models with random weights and tokenizers trained here in each family's
format (imgembed.testing.text), saved with save_pretrained and loaded through the same path as hub ones.
"""
from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pytest
import torch
import transformers

import imgembed
from imgembed.artifact import read_manifest
from imgembed.errors import ArtifactError, ExportError, IntegrityError
from imgembed.export import recipes
from imgembed.export.pipeline import ExportOptions, export_model
from imgembed.export.text_tower import reference_tokenizer
from imgembed.gate.samples import calibration_captions, parity_captions
from imgembed.text.tokenizer import TextTokenizer
from tests.helpers import run_cli, unbuildable_here

from .helpers import manifest_json

FAMILIES = ("test-clip-tiny", "test-siglip-tiny")
FULL = {"test-clip-tiny": transformers.CLIPModel, "test-siglip-tiny": transformers.SiglipModel}
EXTRA = ("another caption, never seen by the gate", "", "ÀÉÎÕÜ ñ ç ß", "tab\tand\nnewline", "x" * 3000,
         "a photo of a cat " * 40)


def _hf(name: str, checkpoint):
    model = FULL[name].from_pretrained(str(checkpoint), attn_implementation="eager").eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(checkpoint))
    return model, tok


def _hf_text(name: str, model, tok, texts, max_length: int) -> np.ndarray:
    """What a transformers user computes: tokenizer -> get_text_features, L2-normalised."""
    if name == "test-clip-tiny":
        enc = tok(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    else:
        enc = tok(list(texts), padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
        enc = {"input_ids": enc["input_ids"]}
    with torch.no_grad():
        out = model.get_text_features(**enc)
    return torch.nn.functional.normalize(out, dim=-1).numpy()


@pytest.mark.parametrize("name", FAMILIES)
def test_artifact_tokenizer_gives_the_transformers_ids(name, text_artifact, text_checkpoint):
    art = text_artifact(name)
    manifest = json.loads((art / "manifest.json").read_text())
    record = manifest["text"]["tokenizer"]
    tok = TextTokenizer(art / record["file"], record)
    ref = transformers.AutoTokenizer.from_pretrained(str(text_checkpoint(name)))
    texts = list(parity_captions() + calibration_captions() + EXTRA)
    padding = "max_length" if record["padding"] == "max_length" else "longest"
    theirs = ref(texts, padding=padding, truncation=True, max_length=record["max_length"])["input_ids"]
    assert tok(texts).tolist() == theirs
    assert manifest["text"]["tokenizer_check"] == {"captions": len(parity_captions()), "identical": True,
                                                   "reference": type(ref).__name__}
    long_ids = tok.ids(["word " * 500])[0]
    assert len(long_ids) == record["max_length"] and long_ids[-1] == ref.eos_token_id  # truncated, end kept


@pytest.mark.parametrize("name", FAMILIES)
def test_fp32_text_gate_and_space(name, text_artifact, text_checkpoint):
    art = text_artifact(name)
    m = json.loads((art / "manifest.json").read_text())
    assert m["towers"] == ["image", "text"] and m["status"] == "passed"
    text = m["text"]
    assert text["parity"]["passed"] and text["parity"]["metrics"]["min_cosine"] >= 0.99999
    assert text["parity"]["by_batch_size"].keys() == {"1", "3", "8"}
    assert text["parity"]["images"] == list(parity_captions())  # the gate ran on the caption set
    model, _ = _hf(name, text_checkpoint(name))
    space = m["space"]
    assert space["dim"] == m["output"]["dim"] == text["dim"]
    assert space["logit_scale"] == pytest.approx(float(model.logit_scale.detach().exp()), rel=1e-5)
    if name == "test-clip-tiny":
        assert space["scores"] == "softmax" and space["logit_bias"] is None
    else:
        assert space["scores"] == "sigmoid"
        assert space["logit_bias"] == pytest.approx(float(model.logit_bias.detach()), abs=1e-6)
    assert {f for f in m["files"] if f.startswith("text/")} >= {"text/tokenizer.json", "text/model.onnx"}


@pytest.mark.parametrize("name", FAMILIES)
def test_embed_text_equals_transformers_on_unseen_captions(name, text_artifact, text_checkpoint):
    art = text_artifact(name)
    model, tok = _hf(name, text_checkpoint(name))
    max_length = json.loads((art / "manifest.json").read_text())["text"]["tokenizer"]["max_length"]
    texts = list(EXTRA) + [f"a photo of {i} cats" for i in range(20)]
    ref = _hf_text(name, model, tok, texts, max_length)
    with imgembed.load(art) as emb:
        for bs in (1, 5, 32):
            got = emb.embed_text(texts, batch_size=bs)
            cos = (got * ref).sum(1)
            assert got.shape == ref.shape and cos.min() >= 0.99999, (bs, cos.min())
        one = emb.embed_text("a photo of 3 cats")
        assert np.allclose(one[0], emb.embed_text(texts)[texts.index("a photo of 3 cats")], atol=1e-6)
        assert emb.embed_text([]).shape == (0, emb.dim)


@pytest.mark.parametrize("name", FAMILIES)
def test_classify_and_rank_equal_transformers_scores(name, text_artifact, text_checkpoint, tmp_path):
    """Zero-shot probabilities from the artifact equal transformers' logits_per_image -> softmax (CLIP) or
    sigmoid (SigLIP) for the same photos and prompts."""
    from imgembed.bench.suite import write_sample_files
    from imgembed.preprocess import load_image

    files = sorted(write_sample_files(tmp_path / "photos"))[:6]
    labels = ["cat", "rocket", "cup of coffee"]
    prompts = [f"a photo of a {x}." for x in labels]
    ckpt = text_checkpoint(name)
    model, tok = _hf(name, ckpt)
    processor = transformers.AutoImageProcessor.from_pretrained(str(ckpt), use_fast=False)
    pixels = processor(images=[load_image(f) for f in files], return_tensors="pt")["pixel_values"]
    padding = True if name == "test-clip-tiny" else "max_length"
    enc = tok(prompts, padding=padding, truncation=True, return_tensors="pt",
              max_length=77 if name == "test-clip-tiny" else 64)
    if name != "test-clip-tiny":
        enc = {"input_ids": enc["input_ids"]}
    with torch.no_grad():
        logits = model(pixel_values=pixels, **enc).logits_per_image
    expected = (logits.softmax(-1) if name == "test-clip-tiny" else torch.sigmoid(logits)).numpy()
    with imgembed.load(text_artifact(name)) as emb:
        probs = emb.classify(files, labels)
        np.testing.assert_allclose(probs, expected, atol=2e-4)
        ranking = emb.rank(files, prompts, k=3)
        sims = imgembed.similarity(emb.embed_text(prompts), emb.embed(files))
        assert ranking.indices.shape == (3, 3)
        np.testing.assert_array_equal(ranking.indices, np.argsort(-sims, axis=1, kind="stable")[:, :3])
        with pytest.raises(ValueError, match="must contain"):
            emb.classify(files, labels, template="no placeholder")


def test_int8_text_race_passes_its_gate_batch_invariant(text_artifact):
    art = text_artifact("test-clip-tiny", "int8", backend=None)
    m = json.loads((art / "manifest.json").read_text())
    text = m["text"]
    rows = {r["id"]: r for r in text["selection"]["candidates"]}
    assert {recipes.ORT_INT8_STATIC_QDQ_MATMUL.id, recipes.ORT_INT8_STATIC_QDQ_MATMUL_7BIT.id} <= set(rows)
    # every row gated (passed, or failed with the metric that missed), not needed, or not buildable on this CPU
    for row in rows.values():
        assert (row["passed"] or "required" in row["why_not"] or row["why_not"].startswith("not needed")
                or row["why_not"] in unbuildable_here()), row
    assert rows[recipes.ORT_INT8_STATIC_QDQ_MATMUL_7BIT.id]["portable"]
    assert text["default_engine"] in {r["id"] for r in rows.values() if r["passed"]}
    assert any(e["backend"] == "onnxruntime" and not e["needs_vnni"] for e in text["engines"]) or \
        not rows[recipes.ORT_INT8_STATIC_QDQ_MATMUL_7BIT.id]["passed"]   # the portable engine is kept
    assert recipes.ORT_INT8_SMOOTHQUANT.id not in rows  # the image-only SmoothQuant re-export is not a text candidate
    metrics = text["parity"]["metrics"]
    assert metrics["mean_cosine"] >= 0.995 and metrics["min_cosine"] >= 0.99 and metrics["knn_agreement"] >= 0.9
    assert text["batch_invariant"] and metrics["batch_variation"] <= 1e-4
    assert text["default_engine"] in rows and rows[text["default_engine"]]["img_per_s"]
    from imgembed.runtime.text import open_text

    for backend in {e["backend"] for e in text["engines"]}:  # the text tower's own engines, whichever won
        enc = open_text(art, read_manifest(art), backend=backend)
        try:
            assert enc.engine.backend == backend
            v = enc.embed(["a photo of a cat", "a red bicycle at night"])
            assert v.shape == (2, m["output"]["dim"]) and np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-4)
        finally:
            enc.close()


def test_cli_export_text_prints_the_text_race_and_gate(text_checkpoint, tmp_path):
    out = tmp_path / "art"
    proc = run_cli("export", "test-siglip-tiny", "--weights", str(text_checkpoint("test-siglip-tiny")), "--text",
                   "--backend", "onnxruntime", "--no-speed-check", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "text tower (fp32" in proc.stdout and "ids identical to transformers" in proc.stdout
    assert "over 34 captions" in proc.stdout
    proc = run_cli("classify", str(out), str(tmp_path), "--labels", "cat,dog")
    assert proc.returncode == 2 and "no image files" in proc.stderr


def test_cli_classify_labels_good_photos_and_reports_bad_ones(text_artifact, tmp_path):
    from imgembed.bench.suite import write_sample_files

    files = sorted(write_sample_files(tmp_path / "photos"))[:3]
    bad = tmp_path / "photos" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 not a jpeg")
    art = text_artifact("test-clip-tiny")
    proc = run_cli("classify", str(art), *map(str, files), str(bad), "--labels", "cat, rocket ,coffee", "--top",
                   "2", "--json")
    assert proc.returncode == 3 and "broken.jpg" in proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["path"] for r in rows] == [str(f) for f in files]
    with imgembed.load(art) as emb:
        probs = emb.classify(files, ["cat", "rocket", "coffee"])
    for r, p in zip(rows, probs, strict=True):
        best = np.argsort(-p, kind="stable")[:2]
        assert [x["label"] for x in r["labels"]] == [["cat", "rocket", "coffee"][j] for j in best]
        assert r["labels"][0]["probability"] == pytest.approx(float(p[best[0]]), abs=1e-5)
    proc = run_cli("classify", str(art), str(files[0]), "--labels", " , ")
    assert proc.returncode == 2 and "no labels given" in proc.stderr
    proc = run_cli("classify", str(art), str(files[0]), "--labels", "cat,cat")
    assert proc.returncode == 2 and "duplicate labels" in proc.stderr


def test_text_errors_are_typed_and_name_the_problem(artifact_dir, text_artifact, text_checkpoint, tmp_path):
    with pytest.raises(ExportError, match="no text tower.*family 'vit'"):
        export_model("test-vit-tiny", tmp_path / "x", ExportOptions(random_init=True, text=True))
    with pytest.raises(ExportError, match="pass --tokenizer DIR"):
        export_model("test-clip-tiny", tmp_path / "x", ExportOptions(random_init=True, text=True))
    with pytest.raises(ExportError, match="--text and --uint8-input"):
        export_model("test-clip-tiny", tmp_path / "x", ExportOptions(random_init=True, text=True,
                                                                     input_format="uint8"))
    assert not (tmp_path / "x").exists()
    with imgembed.load(artifact_dir("test-clip-tiny")) as emb:
        assert emb.towers == ["image"] and emb.space is None
        with pytest.raises(ArtifactError, match="has no text tower; export it with .*--text"):
            emb.embed_text(["a cat"])
    with imgembed.load(text_artifact("test-clip-tiny")) as emb:
        with pytest.raises(TypeError, match=r"texts\[1\] must be a string, got int"):
            emb.embed_text(["a cat", 3])
        with pytest.raises(TypeError, match="got bytes"):
            emb.embed_text(b"a cat")
    with imgembed.load("test-clip-tiny", random_init=True) as emb:
        with pytest.raises(ArtifactError, match="need an artifact exported with --text"):
            emb.embed_text(["a cat"])
    # a tokenizer from another checkpoint: ids beyond the text tower's vocabulary
    big = tmp_path / "bigvocab"
    from imgembed.testing.text import write_clip_tokenizer

    bigger = transformers.CLIPTokenizerFast.from_pretrained(str(write_clip_tokenizer(big)))
    bigger.add_tokens([f"extra{i}" for i in range(600)])  # ids past the tiny tower's 1024 rows
    bigger.save_pretrained(str(big))
    with pytest.raises(ExportError, match="not from one checkpoint"):
        export_model("test-clip-tiny", tmp_path / "y", ExportOptions(weights=text_checkpoint("test-clip-tiny"),
                                                                     text=True, tokenizer=big, backend="onnxruntime"))
    with pytest.raises(ExportError, match="does not exist"):
        reference_tokenizer(imgembed.get_spec("test-clip-tiny"), None, tmp_path / "missing")


def test_tampered_tokenizer_is_refused(text_artifact, tmp_path):
    art = tmp_path / "art"
    shutil.copytree(text_artifact("test-clip-tiny"), art)
    path = art / "text" / "tokenizer.json"
    doc = json.loads(path.read_text())
    doc["normalizer"] = None  # no lowercasing: other ids for every capitalised caption
    path.write_text(json.dumps(doc))
    with pytest.raises(IntegrityError, match="sha256 mismatch.*text/tokenizer.json"):
        imgembed.load(art)


def test_random_init_text_tower_with_a_tokenizer_dir(text_checkpoint, tmp_path):
    ckpt = text_checkpoint("test-clip-tiny")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = export_model("test-clip-tiny", tmp_path / "art", ExportOptions(random_init=True, text=True,
                                                                            tokenizer=ckpt, backend="onnxruntime",
                                                                            speed_check=False))
    text = manifest_json(res)["text"]
    assert text["parity"]["metrics"]["min_cosine"] >= 0.99999
    assert text["tokenizer_check"]["identical"] and text["source"]["tokenizer"] == str(ckpt.resolve())
    from imgembed.export.text_tower import recheck_text

    again = recheck_text(res.path, res.manifest)  # rebuilt from the seed and the recorded tokenizer
    assert again.passed and again.metrics["min_cosine"] >= 0.99999


def test_parity_command_rechecks_the_text_tower(text_artifact):
    art = text_artifact("test-siglip-tiny")
    proc = run_cli("parity", str(art), "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["passed"] and report["text"]["passed"]
    assert report["text"]["metrics"]["min_cosine"] >= 0.99999 and report["text"]["images"] == list(parity_captions())


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_text_tower_at_the_other_precisions(precision, text_checkpoint, tmp_path):
    """BF16 (OpenVINO hint, CPUs with AVX512_BF16/AMX) and FP16 (ONNX Runtime) text towers: an engine at the
    requested precision passes its gate, or (BF16 on the tiny tower: min cosine 0.99986 < 0.9999) the portable
    FP32 engine is kept and says so."""
    from imgembed.runtime.host import missing_bf16_instructions

    if precision == "bf16" and missing_bf16_instructions():
        pytest.skip(missing_bf16_instructions())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = export_model("test-clip-tiny", tmp_path / "art", ExportOptions(
            precision=precision, weights=text_checkpoint("test-clip-tiny"), text=True, speed_check=False))
    text = manifest_json(res)["text"]
    rows = {r["id"]: r for r in text["selection"]["candidates"]}
    own = [r for r in rows.values() if r["precision"] == precision]
    assert own and all(r["metrics"] for r in own)  # built and gated
    engine = next(e for e in text["engines"] if e["id"] == text["default_engine"])
    assert text["parity"]["passed"] and text["parity"]["precision"] == engine["precision"]
    if not any(r["passed"] for r in own):
        assert engine["precision"] == "fp32" and engine["backend"] == "onnxruntime"
    else:
        assert engine["precision"] == precision
    with imgembed.load(res.path) as emb:
        v = emb.embed_text(["a photo of a cat", ""])
        assert v.shape == (2, emb.dim) and np.all(np.isfinite(v))


def test_siglip_v1_sentencepiece_checkpoint_is_converted_and_gated(tmp_path):
    """SigLIP (v1) ships only spiece.model (no fast tokenizer in transformers): the export converts it to a
    tokenizer.json that gives SiglipTokenizer's ids, on the gate's captions and on random strings."""
    pytest.importorskip("sentencepiece")
    import random
    import string

    from imgembed.testing.text import write_image_text_checkpoint

    ckpt = write_image_text_checkpoint("test-siglip-tiny", tmp_path / "ckpt", tokenizer="spiece")
    assert (ckpt / "spiece.model").exists() and not (ckpt / "tokenizer.json").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = export_model("test-siglip-tiny", tmp_path / "art", ExportOptions(
            weights=ckpt, text=True, backend="onnxruntime", speed_check=False))
    text = manifest_json(res)["text"]
    assert text["tokenizer"]["converted_from"].startswith("SentencePiece")
    assert text["tokenizer_check"] == {"captions": len(parity_captions() + calibration_captions()),
                                       "identical": True, "reference": "SiglipTokenizer"}
    assert text["parity"]["metrics"]["min_cosine"] >= 0.99999
    slow = transformers.AutoTokenizer.from_pretrained(str(ckpt))
    tok = TextTokenizer(res.path / text["tokenizer"]["file"], text["tokenizer"])
    rng = random.Random(0)
    alphabet = string.ascii_letters + string.digits + string.punctuation + "   \t\n▁éÉß日本語кошка🚲’“”—…　ＡＢ！"
    fuzz = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60))) for _ in range(300)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = slow(fuzz, padding="max_length", truncation=True, max_length=64)["input_ids"]
    assert tok(fuzz).tolist() == theirs


def test_left_padding_tokenizer_is_reproduced(text_checkpoint, tmp_path):
    """A checkpoint whose tokenizer pads on the left: the artifact pads the same way and the gate holds."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(text_checkpoint("test-siglip-tiny"), ckpt)
    config = json.loads((ckpt / "tokenizer_config.json").read_text())
    (ckpt / "tokenizer_config.json").write_text(json.dumps({**config, "padding_side": "left"}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = export_model("test-siglip-tiny", tmp_path / "art", ExportOptions(
            weights=ckpt, text=True, backend="onnxruntime", speed_check=False))
    record = manifest_json(res)["text"]["tokenizer"]
    assert record["padding_side"] == "left"
    ids = TextTokenizer(res.path / record["file"], record)(["a cat"])[0]
    assert ids[0] == record["pad_id"] and ids[-1] != record["pad_id"]
    assert res.manifest.text.parity.metrics["min_cosine"] >= 0.99999
