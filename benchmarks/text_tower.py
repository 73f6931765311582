"""The text tower of a CLIP / SigLIP artifact against transformers + PyTorch, in one run.

    python benchmarks/text_tower.py                          # clip-vit-b32, INT8, random weights, offline
    python benchmarks/text_tower.py --precision fp32 --threads 2 --json benchmarks/results/text.json
    python benchmarks/text_tower.py --checkpoint DIR          # a real CLIPModel/SiglipModel directory

Builds (once, cached in ``--cache``) a full-size image-text checkpoint with random weights and a tokenizer
trained here in the family's format (:mod:`imgembed.testing.text`; its vocabulary is small, so tokenizing is
cheaper than with the real 49k-token CLIP vocabulary: the end-to-end ratio is the model-bound case), exports
it with ``--text`` (engine race) and measures, in interleaved rounds:

  model-only   the artifact's default text engine vs PyTorch FP32 eager (transformers' default attention) on
               the same token ids, batch ``--batch`` (target: INT8 >= 2x at batch 32, 2 threads)
  end-to-end   ``emb.embed_text(captions)`` of ``--captions`` captions vs the transformers fast tokenizer +
               ``get_text_features`` in batches of ``--batch`` (target: >= 1.5x for 1,000 captions)

and the cosine of the artifact's text vectors to PyTorch's on the captions. CPU flags are printed with the
numbers; measure on an otherwise idle machine.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from pathlib import Path

import numpy as np

import imgembed
from imgembed.export.pipeline import ExportOptions, export_model
from imgembed.gate.samples import calibration_captions, parity_captions
from imgembed.runtime.host import cpu_summary


def captions(n: int) -> list[str]:
    """``n`` varied captions (the built-in sets with numbered variations)."""
    base = list(parity_captions()[2:] + calibration_captions())
    return [f"{base[i % len(base)]} number {i}" if i >= len(base) else base[i] for i in range(n)]


def build(name: str, precision: str, cache: Path, checkpoint: Path | None, threads: int) -> tuple[Path, Path]:
    from imgembed.testing.text import write_image_text_checkpoint

    ckpt = checkpoint or cache / f"{name}-checkpoint"
    if checkpoint is None and not (ckpt / "config.json").exists():
        print(f"writing a random-weight {name} checkpoint to {ckpt}", flush=True)
        write_image_text_checkpoint(name, ckpt)
    art = cache / f"{name}-{precision}-text"
    if not (art / "manifest.json").exists():
        print(f"exporting {art} (--text, {precision}, engine race)", flush=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            export_model(name, art, ExportOptions(precision=precision, weights=ckpt, text=True, threads=threads),
                         step=lambda s: print(f"  {s}", flush=True))
    return ckpt, art


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="clip-vit-b32")
    ap.add_argument("--precision", default="int8", choices=("fp32", "bf16", "int8"))
    ap.add_argument("--checkpoint", type=Path, default=None)
    ap.add_argument("--cache", type=Path, default=Path("benchmarks/results/cache"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--captions", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    import torch
    import transformers

    torch.set_num_threads(args.threads)
    args.cache.mkdir(parents=True, exist_ok=True)
    ckpt, art = build(args.model, args.precision, args.cache, args.checkpoint, args.threads)
    spec = imgembed.get_spec(args.model)
    full_cls = {"clip": transformers.CLIPModel, "siglip": transformers.SiglipModel}[spec.family]
    model = full_cls.from_pretrained(str(ckpt)).eval()          # transformers' default attention (sdpa)
    tok = transformers.AutoTokenizer.from_pretrained(str(ckpt))
    emb = imgembed.load(art, threads=args.threads)
    record = emb.manifest.model_dump(mode="json", by_alias=True)["text"]["tokenizer"]
    padding = "max_length" if record["padding"] == "max_length" else True
    texts = captions(args.captions)

    def torch_texts(batch: list[str]) -> np.ndarray:
        enc = tok(batch, padding=padding, truncation=True, max_length=record["max_length"], return_tensors="pt")
        if spec.family == "siglip":
            enc = {"input_ids": enc["input_ids"]}
        with torch.inference_mode():
            out = model.get_text_features(**enc)
        return torch.nn.functional.normalize(out, dim=-1).numpy()

    def torch_all() -> np.ndarray:
        return np.concatenate([torch_texts(texts[i:i + args.batch]) for i in range(0, len(texts), args.batch)])

    # model-only: the same padded ids (one batch of `batch` captions) through both
    ids = emb.text.tokenizer(texts[:args.batch])
    ids_t = torch.from_numpy(ids)
    mask = torch.from_numpy((np.arange(ids.shape[1])[None] < np.array(
        [len(r) for r in emb.text.tokenizer.ids(texts[:args.batch])])[:, None]).astype(np.int64))

    def torch_model() -> None:
        with torch.inference_mode():
            kw = {"attention_mask": mask} if spec.family == "clip" else {}
            model.get_text_features(input_ids=ids_t, **kw)

    def engine_model() -> None:
        emb.text.runner.infer(ids)

    def engine_all() -> np.ndarray:
        return emb.embed_text(texts, batch_size=args.batch)

    timings: dict[str, list[float]] = {k: [] for k in ("torch-model", "engine-model", "torch-e2e", "engine-e2e")}
    fns = {"torch-model": torch_model, "engine-model": engine_model, "torch-e2e": torch_all,
           "engine-e2e": engine_all}
    for fn in fns.values():  # warm-up
        fn()
    for _ in range(args.rounds):
        for key, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            timings[key].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in timings.items()}
    ref, got = torch_all(), engine_all()
    cos = (ref * got).sum(1)
    cpu = cpu_summary()
    result = {
        "model": args.model, "precision": args.precision, "default_text_engine": emb.text.engine["id"],
        "threads": args.threads, "batch": args.batch, "captions": len(texts), "tokens_in_model_batch": ids.shape[1],
        "cpu": cpu, "median_s": med,
        "model_only_speedup": med["torch-model"] / med["engine-model"],
        "end_to_end_speedup": med["torch-e2e"] / med["engine-e2e"],
        "captions_per_s": {"torch": len(texts) / med["torch-e2e"], "imgembed": len(texts) / med["engine-e2e"]},
        "cosine_vs_torch": {"min": float(cos.min()), "mean": float(cos.mean())},
        "text_gate": emb.manifest.model_dump(mode="json", by_alias=True)["text"]["parity"]["metrics"],
        "text_race": [{k: r[k] for k in ("id", "passed", "why_not", "img_per_s")}
                      for r in emb.manifest.model_dump(mode="json", by_alias=True)["text"]["selection"]["candidates"]],
    }
    print(f"CPU {cpu['model']}: {' '.join(cpu['flags'])}")
    print(f"{args.model} text tower, {args.precision} ({result['default_text_engine']}), {args.threads} threads")
    print(f"  model-only, batch {args.batch} ({ids.shape[1]} tokens): PyTorch FP32 {med['torch-model'] * 1e3:.1f} ms,"
          f" imgembed {med['engine-model'] * 1e3:.1f} ms -> {result['model_only_speedup']:.2f}x")
    print(f"  end-to-end, {len(texts)} captions: transformers+PyTorch {result['captions_per_s']['torch']:.0f}/s, "
          f"embed_text {result['captions_per_s']['imgembed']:.0f}/s -> {result['end_to_end_speedup']:.2f}x")
    print(f"  cosine to PyTorch over the captions: min {cos.min():.5f}, mean {cos.mean():.5f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
