"""A tokenizer.json for SigLIP (v1) checkpoints, which ship only a SentencePiece model (``spiece.model``).

transformers has no fast SigLIP tokenizer; its ``SiglipTokenizer`` (needs ``sentencepiece``) lowercases,
prefixes ``▁``, removes ASCII punctuation, collapses whitespace, strips, runs the SentencePiece model (its
precompiled NFKC normaliser, then the Unigram vocabulary word by word) and appends ``</s>``. The same steps are
written here as a ``tokenizers`` pipeline over the model's own pieces and scores, so the artifact needs no
sentencepiece at inference. The export gate checks the result id-for-id against ``SiglipTokenizer`` on the
parity and calibration captions; the tests fuzz it further.

One known difference: a caption that itself contains a special token (``"a </s> b"``): the slow tokenizer
starts the text after it without a word boundary, this pipeline with one.
"""
from __future__ import annotations

import string
from typing import Any

from imgembed.errors import ExportError

SPIECE_UNDERLINE = "▁"
CONVERTIBLE = ("SiglipTokenizer",)


def convertible(tf_tok: Any) -> bool:
    """Whether :func:`siglip_tokenizer_json` can stand for this (slow) transformers tokenizer."""
    return type(tf_tok).__name__ in CONVERTIBLE and bool(getattr(tf_tok, "vocab_file", None))


def siglip_tokenizer_json(tf_tok: Any) -> str:
    """The tokenizer.json (JSON text) equivalent to a transformers ``SiglipTokenizer``."""
    from tokenizers import AddedToken, Regex, Tokenizer, models, normalizers, pre_tokenizers, processors

    try:
        from transformers.convert_slow_tokenizer import import_protobuf

        proto = import_protobuf().ModelProto()
        with open(tf_tok.vocab_file, "rb") as f:
            proto.ParseFromString(f.read())
    except (ImportError, OSError, ValueError) as e:
        raise ExportError(f"{tf_tok.vocab_file}: cannot read the SentencePiece model ({e}); pip install "
                          "sentencepiece protobuf") from None
    if proto.trainer_spec.model_type != 1:  # 1 = UNIGRAM
        raise ExportError(f"{tf_tok.vocab_file}: SentencePiece model type {proto.trainer_spec.model_type} is not "
                          "Unigram; only Unigram SigLIP vocabularies are converted")
    vocab = [(p.piece, p.score) for p in proto.pieces]
    tok = Tokenizer(models.Unigram(vocab, proto.trainer_spec.unk_id, byte_fallback=proto.trainer_spec.byte_fallback))
    # SiglipTokenizer: text.replace("▁", " "), lowercase, "▁" + text, canonicalize_text (punctuation out,
    # whitespace runs -> " ", strip), then SentencePiece on "<unk>" + text with the "<unk>" pieces dropped: its
    # charsmap turns the "▁" into a space that the "<unk>" prefix keeps from being stripped, so every non-empty
    # text starts a word. Here: canonicalize, normalise like SentencePiece, then prepend "▁" (Prepend skips
    # an empty text, as the slow tokenizer yields no piece for one).
    steps = [normalizers.Replace(SPIECE_UNDERLINE, " ")]
    if getattr(tf_tok, "do_lower_case", False):
        steps.append(normalizers.Lowercase())
    steps += [normalizers.Replace(ch, "") for ch in string.punctuation]
    steps += [normalizers.Replace(Regex(r"\s+"), " "), normalizers.Strip()]
    if proto.normalizer_spec.precompiled_charsmap:
        steps.append(normalizers.Precompiled(proto.normalizer_spec.precompiled_charsmap))
    if proto.normalizer_spec.remove_extra_whitespaces:
        steps += [normalizers.Replace(Regex(" {2,}"), " "), normalizers.Strip()]
    steps.append(normalizers.Prepend(SPIECE_UNDERLINE))
    tok.normalizer = normalizers.Sequence(steps)
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPIECE_UNDERLINE, prepend_scheme="never", split=True)
    specials = [t for t in (tf_tok.pad_token, tf_tok.eos_token, tf_tok.unk_token) if t]
    tok.add_special_tokens([AddedToken(t, special=True, lstrip=True, rstrip=True, normalized=False)
                            for t in dict.fromkeys(specials)])
    eos = tf_tok.eos_token
    tok.post_processor = processors.TemplateProcessing(single=f"$A {eos}", pair=f"$A {eos} $B {eos}",
                                                       special_tokens=[(eos, tf_tok.eos_token_id)])
    return tok.to_str()
