"""Offline image-text checkpoints for tests and benchmarks: real CLIP / SigLIP architectures with random
weights, and small byte-level BPE tokenizers trained here (a deterministic byte-pair trainer; the
``tokenizers`` library builds them) in each family's format, saved together with ``save_pretrained`` exactly
as a hub checkpoint directory is laid out.

* CLIP format: lowercase + whitespace normalisation, byte-level BPE with ``</w>`` word ends, vocab.json +
  merges.txt read by transformers' ``CLIPTokenizerFast`` (its own conversion writes tokenizer.json);
  ``<|startoftext|>`` / ``<|endoftext|>`` around every caption, padded with ``<|endoftext|>``.
* SigLIP format (SigLIP 2's Gemma-style tokenizer.json): SentencePiece-style ``▁`` word starts, BPE with byte
  fallback, ``</s>`` appended, padded with a separate ``<pad>`` token, loaded as ``PreTrainedTokenizerFast``.
* SigLIP (v1) format: only a SentencePiece Unigram ``spiece.model`` (trained here with ``sentencepiece``),
  read by transformers' slow ``SiglipTokenizer``; the export converts it (:mod:`imgembed.export.spm_tokenizer`).

The vocabularies are tiny (a few hundred tokens, from a fixed caption corpus), so the ids differ from the real
models'; what is tested is that the artifact's tokenizer reproduces the transformers tokenizer of the
checkpoint and that the towers match their originals.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

from imgembed.models.registry import ModelSpec, get_spec

_WORDS = ("a photo of the cat dog red blue green bicycle car night day beach snow city street table wooden "
          "astronaut rocket coffee cup moon clock tower brick wall coin page text colour wheel two people "
          "walking sunset microscope close up drawing blurry seen from above there is very long caption word "
          "and at in on an one two three four five six seven eight nine ten").split()


def _corpus() -> list[str]:
    lines = [" ".join(_WORDS[(i * 7 + j * 3) % len(_WORDS)] for j in range(3 + i % 6)) for i in range(400)]
    return lines + ["café naïve résumé", "猫の写真", "фотография кошки", "!!! ??? ... ;-)", "word0 word1 word12"] * 5


def _train_bpe(words: Counter, alphabet: Sequence[str], vocab_size: int) -> tuple[list[str], list[tuple[str, str]]]:
    """Byte-pair merges over ``words`` (symbol tuples -> count) until ``vocab_size`` tokens: the most frequent
    adjacent pair first, ties broken by the pair itself. Deterministic, unlike the ``tokenizers`` trainer,
    whose hash-map order changes tie-breaks (and so the vocabulary) from one process to the next."""
    vocab = list(dict.fromkeys([*alphabet, *(sym for word in words for sym in word)]))
    merges: list[tuple[str, str]] = []
    words = Counter(words)
    while len(vocab) < vocab_size:
        pairs: Counter = Counter()
        for word, n in words.items():
            for pair in zip(word, word[1:], strict=False):
                pairs[pair] += n
        if not pairs:
            break
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        if pairs[best] < 2:
            break
        merges.append(best)
        vocab.append(best[0] + best[1])
        merged: Counter = Counter()
        for word, n in words.items():
            out, i = [], 0
            while i < len(word):
                if word[i:i + 2] == best:
                    out.append(best[0] + best[1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += n
        words = merged
    return vocab, merges


def _pieces(pre_tokenizer: Any, normalizer: Any = None) -> list[str]:
    """The corpus split into pre-tokenized pieces, as the tokenizer under construction splits it."""
    out = []
    for line in _corpus():
        text = normalizer.normalize_str(line) if normalizer is not None else line
        out += [piece for piece, _ in pre_tokenizer.pre_tokenize_str(text)]
    return out


def write_clip_tokenizer(directory: str | Path, vocab_size: int = 500) -> Path:
    """A CLIP-format tokenizer (CLIPTokenizerFast: tokenizer.json, vocab.json, merges.txt) in ``directory``."""
    from tokenizers import normalizers, pre_tokenizers
    from transformers import CLIPTokenizerFast
    from transformers.models.clip.tokenization_clip import bytes_to_unicode

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    pre = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    words = Counter((*piece[:-1], piece[-1] + "</w>") for piece in _pieces(pre, normalizer))
    base = list(bytes_to_unicode().values())
    tokens, merges = _train_bpe(words, base, vocab_size)
    vocab = {t: i for i, t in enumerate(tokens)}
    for token in base + [b + "</w>" for b in base] + ["<|startoftext|>", "<|endoftext|>"]:
        vocab.setdefault(token, len(vocab))
    (directory / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (directory / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
                                          encoding="utf-8")
    fast = CLIPTokenizerFast(str(directory / "vocab.json"), str(directory / "merges.txt"))
    fast.save_pretrained(str(directory))
    return directory


def write_siglip_tokenizer(directory: str | Path, vocab_size: int = 400) -> Path:
    """A SigLIP-2-format tokenizer (Metaspace BPE with byte fallback, ``</s>`` appended, ``<pad>``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    specials = ["<pad>", "</s>", "<unk>"]
    pre = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    words = Counter(tuple(piece) for piece in _pieces(pre))
    tokens, merges = _train_bpe(words, specials, vocab_size)
    vocab = {t: i for i, t in enumerate(tokens)}
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    full = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True))
    full.pre_tokenizer = pre
    full.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    full.add_special_tokens(specials)
    full.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", vocab["</s>"])])
    fast = PreTrainedTokenizerFast(tokenizer_object=full, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(str(directory))
    return directory


def write_spiece_tokenizer(directory: str | Path, vocab_size: int = 120) -> Path:
    """A SigLIP (v1) tokenizer: a SentencePiece Unigram model (``spiece.model``, NFKC) read by transformers'
    slow ``SiglipTokenizer`` (needs the ``sentencepiece`` package), no tokenizer.json, as on the hub."""
    import io

    import sentencepiece as spm
    from transformers import SiglipTokenizer

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(_corpus()), model_writer=model, vocab_size=vocab_size,
                                   model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   normalization_rule_name="nmt_nfkc", character_coverage=1.0, minloglevel=2)
    (directory / "spiece.model").write_bytes(model.getvalue())
    SiglipTokenizer(str(directory / "spiece.model")).save_pretrained(str(directory))
    return directory


def write_image_text_checkpoint(name: str | ModelSpec, directory: str | Path, seed: int = 0,
                                tokenizer: str | None = None) -> Path:
    """A full image-text checkpoint directory for registry model ``name`` (its vision arch and text arch from
    models.yaml, random weights): config.json + model.safetensors + tokenizer + preprocessor_config.json,
    as ``save_pretrained`` writes them for a hub checkpoint. ``tokenizer``: the family's format by default;
    "spiece" writes a SigLIP (v1) SentencePiece model instead of a tokenizer.json."""
    import torch
    import transformers

    from imgembed.models.families import family_of

    spec = get_spec(name) if isinstance(name, str) else name
    record = family_of(spec).text
    if spec.text is None or record is None:
        raise ValueError(f"{spec.name}: no text tower in the registry (family {spec.family!r})")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    text = dict(spec.text.arch)
    fmt = tokenizer or record.tokenizer_format
    if fmt == "clip":
        tok = transformers.CLIPTokenizerFast.from_pretrained(str(write_clip_tokenizer(directory)))
        text.update(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    elif fmt == "spiece":
        write_spiece_tokenizer(directory)
    else:
        write_siglip_tokenizer(directory)
    extra = {"projection_dim": spec.embedding.dim} if record.projection else {}
    cfg = getattr(transformers, record.config_class)(text_config=text, vision_config=dict(spec.arch), **extra)
    torch.manual_seed(seed)
    model = getattr(transformers, record.model_class)(cfg).eval()
    model.save_pretrained(str(directory))
    processor = getattr(transformers, spec.preprocess.processor)(**_processor_kwargs(spec))
    processor.save_pretrained(str(directory))
    return directory


def _processor_kwargs(spec: ModelSpec) -> dict:
    """The image processor arguments that reproduce the registry's preprocessing."""
    pp = spec.preprocess.to_dict()
    kwargs = {"image_mean": pp["image_mean"], "image_std": pp["image_std"], "size": pp["size"]}
    if pp.get("crop_size"):
        kwargs["crop_size"] = pp["crop_size"]
    return kwargs
