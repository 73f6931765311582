"""The text tower of CLIP / SigLIP artifacts: original, tokenizer, parity set and engine race.

``imgembed export NAME --text`` adds the text side to the same artifact (``text/`` inside it):

* the original is the checkpoint's full image-text model (its text transformer and projection), so a text
  vector is exactly ``model.get_text_features(**tokenizer(texts))`` of transformers;
* the tokenizer is the checkpoint's fast tokenizer serialised as ``text/tokenizer.json``; at inference it runs
  through the ``tokenizers`` library (:mod:`imgembed.text.tokenizer`). The gate requires its ids to equal the
  transformers tokenizer's on every parity caption;
* the graph takes ``input_ids`` (int64, batch x tokens) and returns the (normalised) text embedding; the
  engines are raced exactly like the image tower's (:mod:`.engines`), gated on the parity captions
  (:func:`imgembed.gate.samples.parity_captions`) at batch sizes 1, 3 and 8, INT8 calibrated on other captions;
* the manifest's ``text`` entry records the tokenizer settings, the engines and the gate, and ``space`` the
  shared embedding space: dim, normalisation and how the model scores a (text, image) pair.
"""
from __future__ import annotations

import contextlib
import io
import json
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from imgembed.artifact import Manifest
from imgembed.errors import ExportError, WeightsError
from imgembed.export.onnx_export import DEFAULT_OPSET, OUTPUT_NAME, check_onnx
from imgembed.export.tower import Tower, gate_engine, race, selection
from imgembed.gate.samples import calibration_captions, parity_captions
from imgembed.models.families import (
    DEFAULT_SEED,
    TextTower,
    _from_pretrained,
    _transformers_attr,
    family_of,
    has_safetensors,
)
from imgembed.models.registry import EmbeddingSpec, ModelSpec, TextSpec
from imgembed.text.tokenizer import TextTokenizer, TokenBatches

TEXT_INPUT = "input_ids"
TEXT_DIR = "text"
Step = Callable[[str], None]


def text_tower(spec: ModelSpec) -> tuple[TextSpec, TextTower]:
    """The registry's text spec and the family's text record of ``spec``; ExportError if it has none."""
    record = family_of(spec).text
    if spec.text is None or record is None:
        raise ExportError(f"{spec.name} has no text tower (family {spec.family!r}); --text works for CLIP and "
                          "SigLIP models")
    return spec.text, record


def text_spec_view(spec: ModelSpec) -> ModelSpec:
    """A ModelSpec standing for the text tower in the engine race (name, dim, thresholds of ``spec``)."""
    text, _ = text_tower(spec)
    return replace(spec, name=f"{spec.name}-text", arch=dict(text.arch),
                   embedding=EmbeddingSpec("text_embeds", "none", spec.embedding.normalize, text.dim))


# ------------------------------------------------------------------------------------------ original
def _torch_module():
    import torch

    class TextHead(torch.nn.Module):
        """``forward(input_ids) -> (N, dim)``: the text tower's pooled output, projected (CLIP) and
        L2-normalised like the image embeddings, so both land in one space."""

        def __init__(self, text_model, projection, normalize: bool):
            super().__init__()
            self.text_model = text_model
            self.projection = projection
            self.normalize = normalize

        def forward(self, input_ids, attention_mask=None):
            pooled = self.text_model(input_ids=input_ids, attention_mask=attention_mask).pooler_output
            x = pooled if self.projection is None else self.projection(pooled)
            return torch.nn.functional.normalize(x, p=2.0, dim=-1) if self.normalize else x

    return TextHead


@dataclass
class TextOriginal:
    head: Any                  # TextHead (torch.nn.Module)
    logit_scale: float         # exp of the checkpoint's learned log-scale
    logit_bias: float | None   # SigLIP only


def load_text_original(spec: ModelSpec, weights: str | Path | None = None, random_init: bool = False,
                       seed: int = DEFAULT_SEED, special_ids: dict | None = None) -> TextOriginal:
    """The text tower of ``spec`` from a full image-text checkpoint (local directory, hub) or random init.

    ``special_ids`` (random init): the tokenizer's bos/eos/pad ids, written into the text config so CLIP pools
    at the tokenizer's end token.
    """
    import torch

    text, record = text_tower(spec)
    model_cls = _transformers_attr(record.model_class)
    if random_init:
        text_cfg = {**dict(text.arch), **(special_ids or {})}
        if record.projection is not None:
            text_cfg.setdefault("projection_dim", text.dim)
        cfg = _transformers_attr(record.config_class)(text_config=text_cfg, vision_config=dict(spec.arch),
                                                      **({"projection_dim": text.dim} if record.projection else {}))
        cfg._attn_implementation = "eager"
        torch.manual_seed(seed + 1)  # the image tower of the same seed is built separately
        full = model_cls(cfg)
    else:
        full = _load_full(spec, record, model_cls, weights)
    full.eval()
    projection = getattr(full, record.projection) if record.projection else None
    head = _torch_module()(full.text_model, projection, spec.embedding.normalize).eval()
    scale = float(full.logit_scale.detach().exp()) if hasattr(full, "logit_scale") else 1.0
    bias = float(full.logit_bias.detach().reshape(-1)[0]) if getattr(full, "logit_bias", None) is not None else None
    return TextOriginal(head, scale, bias)


def _load_full(spec: ModelSpec, record: TextTower, model_cls: Any, weights: str | Path | None) -> Any:
    if weights is not None:
        path = Path(weights)
        try:
            raw = json.loads((path / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise WeightsError(f"{path}: no readable config.json ({e})") from None
        if "text_config" not in raw:
            raise WeightsError(f"{path}: the checkpoint has no text tower (config.json has no text_config; "
                               f"model_type {raw.get('model_type')!r}); --text needs a full "
                               f"{record.model_class} checkpoint")
        try:
            return _from_pretrained(model_cls, str(path), use_safetensors=has_safetensors(path) or None,
                                    attn_implementation="eager")
        except (OSError, ValueError, RuntimeError) as e:
            raise WeightsError(f"{path}: cannot load the text tower ({type(e).__name__}: {e})") from None
    if spec.source is None:
        raise WeightsError(f"model {spec.name!r} has no weight source; pass --random-init or --weights DIR")
    try:
        return _from_pretrained(model_cls, spec.source.hub, revision=spec.source.revision,
                                attn_implementation="eager")
    except OSError as e:
        raise WeightsError(f"could not load {spec.source.hub}@{spec.source.revision} from the Hugging Face hub "
                           f"({e}). Offline? Pass --weights DIR (a save_pretrained directory).") from None


# ------------------------------------------------------------------------------------------ tokenizer
def reference_tokenizer(spec: ModelSpec, weights: str | Path | None, tokenizer: str | Path | None) -> Any:
    """The checkpoint's transformers *fast* tokenizer: from ``tokenizer`` (a directory or tokenizer.json)
    if given, else the weights directory, else the hub. Random-init exports need ``tokenizer``."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if tokenizer is not None:
        src = Path(tokenizer)
        if src.is_file():
            if src.suffix != ".json":
                raise ExportError(f"--tokenizer {src}: expected a tokenizer.json file or a directory with one")
            return _quiet_load(lambda: PreTrainedTokenizerFast(tokenizer_file=str(src)), src)
        if not src.is_dir():
            raise ExportError(f"--tokenizer {src} does not exist (expected a directory or a tokenizer.json)")
        where: Any = str(src)
        kwargs: dict = {}
    elif weights is not None:
        where, kwargs = str(weights), {}
    elif spec.source is not None:
        where, kwargs = spec.source.hub, {"revision": spec.source.revision}
    else:
        raise ExportError(f"{spec.name} has random weights and no vocabulary: pass --tokenizer DIR (a directory "
                          "with tokenizer.json, e.g. the checkpoint's) to export its text tower")
    tok = _quiet_load(lambda: AutoTokenizer.from_pretrained(where, use_fast=True, **kwargs), where)
    from imgembed.export.spm_tokenizer import convertible

    if not getattr(tok, "is_fast", False) and not convertible(tok):
        raise ExportError(f"{where}: the tokenizer ({type(tok).__name__}) has no tokenizer.json (fast) form, which "
                          "the text tower needs at inference; save one with a fast tokenizer "
                          "(tokenizer.save_pretrained) next to the weights or pass --tokenizer")
    return tok


def _quiet_load(fn: Callable[[], Any], where: Any) -> Any:
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fn()
    except ExportError:
        raise
    except Exception as e:  # transformers raises OSError/ValueError/KeyError for missing or broken files
        first = str(e).splitlines()[0] if str(e) else ""
        raise ExportError(f"{where}: cannot load its tokenizer ({type(e).__name__}: {first})") from None


def special_ids(tf_tok: Any) -> dict[str, int]:
    """The tokenizer's bos/eos/pad ids (those it defines), for the text config of a random-init tower."""
    return {k: getattr(tf_tok, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")
            if getattr(tf_tok, k, None) is not None}


def runtime_tokenizer(tf_tok: Any, text: TextSpec) -> tuple[str, dict]:
    """The JSON of the tokenizer.json the artifact carries, and its manifest record."""
    pad = tf_tok.pad_token_id if tf_tok.pad_token_id is not None else tf_tok.eos_token_id
    if pad is None:
        raise ExportError("the tokenizer defines neither a pad nor an end token, so batches cannot be padded")
    max_length = min(text.max_length, int(text.arch.get("max_position_embeddings", text.max_length)))
    record = {"file": f"{TEXT_DIR}/tokenizer.json", "max_length": max_length, "padding": text.padding,
              "pad_id": int(pad), "padding_side": str(getattr(tf_tok, "padding_side", "right") or "right"),
              "class": type(tf_tok).__name__}
    if getattr(tf_tok, "is_fast", False):
        return tf_tok.backend_tokenizer.to_str(), record
    from imgembed.export.spm_tokenizer import siglip_tokenizer_json

    return siglip_tokenizer_json(tf_tok), {**record, "converted_from": "SentencePiece model (spiece.model)"}


def check_token_ids(tf_tok: Any, tok: TextTokenizer, captions: Sequence[str], reference_mask: bool) -> dict:
    """Compare the artifact tokenizer's ids with the transformers tokenizer's on ``captions``; returns the
    manifest record of the check, or raises ExportError naming the first differing caption."""
    enc = reference_encoding(tf_tok, tok, captions, reference_mask)
    mine = tok(captions)
    theirs = enc["input_ids"].numpy()
    if mine.shape != theirs.shape or not np.array_equal(mine, theirs):
        for i, c in enumerate(captions):
            a, b = tok([c])[0].tolist(), tf_tok(c, truncation=True, max_length=tok.max_length)["input_ids"]
            if a[:len(b)] != b:
                raise ExportError(f"tokenizer mismatch on caption {i} {c!r}: tokenizers gives {a[:12]}..., "
                                  f"transformers {b[:12]}...; the text tower would embed other tokens than the "
                                  "original")
        raise ExportError(f"tokenizer padding mismatch: ids of shape {mine.shape} vs transformers {theirs.shape}")
    return {"captions": len(captions), "identical": True, "reference": type(tf_tok).__name__}


def reference_encoding(tf_tok: Any, tok: TextTokenizer, captions: Sequence[str], reference_mask: bool) -> dict:
    """The transformers tokenizer's tensors for ``captions`` as the reference model takes them."""
    padding = "max_length" if tok.padding == "max_length" else "longest"
    enc = tf_tok(list(captions), padding=padding, truncation=True, max_length=tok.max_length, return_tensors="pt")
    keep = ("input_ids", "attention_mask") if reference_mask else ("input_ids",)
    return {k: v for k, v in enc.items() if k in keep}


# ------------------------------------------------------------------------------------------ parity set
@dataclass(frozen=True)
class TextParitySet:
    """The parity captions, the artifact tokenizer, and the original's embeddings of the captions.

    ``inputs(runner)`` returns :class:`TokenBatches`: every batch the gate slices is tokenized and padded on
    its own, as the runtime does."""

    names: tuple[str, ...]
    tokenizer: TextTokenizer
    reference: np.ndarray

    def inputs(self, runner: Any = None) -> TokenBatches:
        return TokenBatches(self.tokenizer, self.names)


def text_reference(original: TextOriginal, tf_tok: Any, tok: TextTokenizer, captions: Sequence[str],
                   reference_mask: bool, threads: int | None = None, batch: int = 8) -> np.ndarray:
    """The original's embeddings of ``captions``: transformers tokenizer -> PyTorch text tower, in batches."""
    import torch

    if threads:
        torch.set_num_threads(int(threads))
    out = []
    with torch.inference_mode():
        for i in range(0, len(captions), batch):
            enc = reference_encoding(tf_tok, tok, captions[i:i + batch], reference_mask)
            out.append(original.head(**enc).float().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def text_parity_set(original: TextOriginal, tf_tok: Any, tok: TextTokenizer, reference_mask: bool,
                    threads: int | None = None, captions: Sequence[str] | None = None) -> TextParitySet:
    names = tuple(parity_captions() if captions is None else captions)
    return TextParitySet(names, tok, text_reference(original, tf_tok, tok, names, reference_mask, threads))


# ------------------------------------------------------------------------------------------ graph
def export_text_onnx(head: Any, tok: TextTokenizer, path: str | Path, opset: int = DEFAULT_OPSET) -> Path:
    """Export the text head with ``input_ids`` (batch x tokens; the token axis is dynamic for "longest"
    padding) as its one input."""
    import torch

    path = Path(path)
    length = tok.max_length if tok.padding == "max_length" else min(tok.max_length, 16)
    dummy = torch.from_numpy(tok(["a photo of a cat", "two dogs"])).long()
    if dummy.shape[1] < length:
        pad = torch.full((dummy.shape[0], length - dummy.shape[1]), tok.pad_id, dtype=torch.long)
        dummy = torch.cat([dummy, pad], dim=1)
    axes = {0: "batch"} if tok.padding == "max_length" else {0: "batch", 1: "tokens"}
    try:
        with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings(), \
                contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.onnx.export(head.eval(), (dummy,), str(path), dynamo=False, opset_version=opset,
                              input_names=[TEXT_INPUT], output_names=[OUTPUT_NAME],
                              dynamic_axes={TEXT_INPUT: axes, OUTPUT_NAME: {0: "batch"}}, do_constant_folding=True)
    except Exception as e:  # the exporter raises many internal types; surface one typed error
        raise ExportError(f"torch.onnx.export of the text tower failed: {type(e).__name__}: {e}") from e
    check_onnx(path)
    return path


def space_record(spec: ModelSpec, original: TextOriginal) -> dict:
    """The shared embedding space of the two towers, and how a (text, image) pair is scored."""
    _, record = text_tower(spec)
    return {"dim": spec.embedding.dim, "normalized": spec.embedding.normalize, "scores": record.scores,
            "logit_scale": round(original.logit_scale, 6),
            "logit_bias": None if original.logit_bias is None else round(original.logit_bias, 6)}


def calibration_tokens(tok: TextTokenizer) -> tuple[TokenBatches, None, dict]:
    """Static INT8 calibration input of a text tower (engines.Inputs.calibration's triple)."""
    captions = calibration_captions()
    return TokenBatches(tok, captions), None, {"source": "built-in captions", "captions": len(captions)}


# ------------------------------------------------------------------------------------------ the race
@dataclass
class TextExport:
    """What the text race produced: the manifest's ``text`` and ``space`` entries, the engines to keep, and the
    tokenizer.json to write beside them."""

    section: dict
    space: dict
    kept: list
    tokenizer_json: str


def export_text(spec: ModelSpec, opts: Any, work: Path, step: Step) -> TextExport:
    """Build, gate and race the text tower's engines at ``opts.precision`` (an ExportOptions).

    A tower whose every engine fails the gate raises ParityError (unless ``opts.keep_failed``: the closest
    engine is kept and the artifact is marked failed)."""
    from imgembed.export import engines, recipes

    text, record = text_tower(spec)
    step("loading the text tokenizer")
    tf_tok = reference_tokenizer(spec, opts.weights, opts.tokenizer)
    tok_json, tok_record = runtime_tokenizer(tf_tok, text)
    tok = TextTokenizer.from_str(tok_json, tok_record)
    captions = parity_captions()
    checked = captions if getattr(tf_tok, "is_fast", False) else captions + calibration_captions()
    step(f"checking tokenizer ids against transformers ({type(tf_tok).__name__}) on {len(checked)} captions")
    ids_check = check_token_ids(tf_tok, tok, checked, record.reference_mask)
    step(f"loading the text tower ({'random init' if opts.random_init else opts.weights or 'hub'})")
    original = load_text_original(spec, weights=None if opts.random_init else opts.weights,
                                  random_init=opts.random_init, seed=opts.seed, special_ids=special_ids(tf_tok))
    _check_vocab(original, tok_json, spec)
    step("computing PyTorch reference text embeddings")
    parity = text_parity_set(original, tf_tok, tok, record.reference_mask, opts.threads, captions)
    directory = work / TEXT_DIR
    directory.mkdir(parents=True, exist_ok=True)
    step("exporting the text tower to ONNX")
    graph = export_text_onnx(original.head, tok, directory / "exported.onnx", opts.opset)
    view = text_spec_view(spec)
    candidates = recipes.plan(opts.precision, kind="text", int8_preset=opts.int8_preset, backend=opts.backend)
    inputs = engines.Inputs(view, directory, graph, graph, "float32", parity, lambda: calibration_tokens(tok),
                            opts.threads, True, opset=opts.opset, input_name=TEXT_INPUT)
    raced = race(Tower(f"{spec.name} text tower", opts.precision, candidates, inputs,
                       view.thresholds(opts.precision)), _prefixed(step), speed_check=opts.speed_check,
                 keep_candidates=opts.keep_candidates, keep_failed=opts.keep_failed)
    winner = raced.winner
    if winner.candidate.precision != opts.precision:
        step(f"text: no {opts.precision} engine passed the gate; the text tower keeps its "
             f"{winner.candidate.precision} engine {winner.candidate.id}")
    section = {
        "status": "passed" if winner.report.passed else "failed",
        "dim": text.dim,
        "input": {"name": TEXT_INPUT, "dtype": "int64", "layout": "batch x tokens"},
        "tokenizer": tok_record,
        "tokenizer_check": ids_check,
        "source": {"tokenizer": None if opts.tokenizer is None
                   else str(Path(opts.tokenizer).resolve())},
        "reference": f"{record.model_class}.get_text_features(**tokenizer(texts, padding={text.padding!r}, "
                     f"truncation=True, max_length={tok_record['max_length']}))",
        "default_engine": winner.candidate.id,
        "batch_invariant": winner.candidate.batch_invariant,
        "selection": selection(raced, opts.threads, opts.backend),
        "quantization": winner.record or None,
        "parity": winner.report.to_dict(),  # its "images" are the parity captions
    }
    return TextExport(section, space_record(spec, original), raced.kept, tok_json)


def _prefixed(step: Step) -> Step:
    return lambda s: step(f"text: {s}")


def _check_vocab(original: TextOriginal, tok_json: str, spec: ModelSpec) -> None:
    """The tokenizer's largest id must exist in the text tower's embedding table."""
    vocab = json.loads(tok_json).get("model", {}).get("vocab") or {}
    ids = list(vocab.values()) if isinstance(vocab, dict) else list(range(len(vocab)))
    added = [t.get("id", 0) for t in json.loads(tok_json).get("added_tokens") or []]
    top = max(ids + added, default=0)
    rows = original.head.text_model.embeddings.token_embedding.num_embeddings
    if top >= rows:
        raise ExportError(f"{spec.name}: the tokenizer has ids up to {top} but the text tower embeds only {rows} "
                          "tokens; tokenizer and weights are not from one checkpoint")


# ------------------------------------------------------------------------------------------ re-check
def recheck_text(artifact: str | Path, manifest: Manifest, weights: str | Path | None = None,
                 threads: int | None = None,
                 backend: str = "auto", step: Step = lambda s: None):
    """Re-run the text gate of an artifact's text engine (the one ``backend`` selects here) against the text
    original rebuilt from the manifest's source, with the transformers tokenizer of that source."""
    from imgembed.artifact import ArtifactFiles
    from imgembed.runtime.backends import select_engine
    from imgembed.runtime.text import read_tokenizer
    from imgembed.runtime.text import text_tower as artifact_text_tower

    artifact = Path(artifact)
    tower = artifact_text_tower(manifest, str(artifact))
    engine, _ = select_engine(tower, backend, "cpu", where=f"{artifact} (text tower)")
    spec = manifest.model_spec()
    _, record = text_tower(spec)
    source = manifest.source_record()
    kind = source.get("kind")
    local = weights if weights is not None else (source.get("path") if kind == "local" else None)
    tokenizer = (tower.source or {}).get("tokenizer")
    step("loading the text tokenizer and the text original")
    tf_tok = reference_tokenizer(spec, local, tokenizer)
    tok = read_tokenizer(ArtifactFiles.of(artifact, manifest), tower.tokenizer)
    captions = tuple((tower.parity.images if tower.parity is not None else None) or parity_captions())
    check_token_ids(tf_tok, tok, captions, record.reference_mask)
    original = load_text_original(spec, weights=local, random_init=kind == "random-init",
                                  seed=int(source.get("seed", DEFAULT_SEED)), special_ids=special_ids(tf_tok))
    step("computing PyTorch reference text embeddings")
    parity = text_parity_set(original, tf_tok, tok, record.reference_mask, threads, captions)
    step(f"running text engine {engine.id} at batch sizes 1, 3, 8")
    return gate_engine(artifact, manifest, engine, parity, spec.thresholds(engine.precision), threads=threads,
                       dim=tower.dim, name=f"{manifest.name}-text")
