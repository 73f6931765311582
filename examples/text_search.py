"""Text search and zero-shot labels with the Python API, on an artifact exported with --text (CLIP, SigLIP).

    imgembed export clip-vit-b32 --text --out artifacts/clip-b32-text     # or --weights DIR (a full CLIPModel)
    python examples/text_search.py artifacts/clip-b32-text                # the bundled sample photos, offline
    python examples/text_search.py artifacts/clip-b32-text --photos photos/ --query "a red bicycle" -k 3 \\
        --labels cat,dog,bicycle

The photos are embedded once; ``emb.rank`` and ``emb.classify`` take their vectors, so only the texts are
embedded again. The same search over a Parquet index, from the command line:

    imgembed embed artifacts/clip-b32-text photos/ --out photos.parquet
    imgembed search photos.parquet "a red bicycle" --artifact artifacts/clip-b32-text -k 5
"""
from __future__ import annotations

import argparse
import sys
import tempfile

import imgembed
from imgembed.bench.suite import write_sample_files
from imgembed.jobs.folder import list_images


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifact", help="artifact directory exported with --text")
    ap.add_argument("--photos", help="image files, a directory or a glob (default: the bundled sample photos)")
    ap.add_argument("--query", action="append", help="a text query (repeatable)")
    ap.add_argument("-k", type=int, default=3)
    ap.add_argument("--labels", default="person,cat,coffee,rocket,horse", help="comma-separated zero-shot labels")
    args = ap.parse_args(argv)

    emb = imgembed.load(args.artifact)
    if "text" not in emb.towers:
        print(f"{args.artifact} has no text tower: export it with `imgembed export {emb.name} --text`", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        photos = list_images([args.photos]) if args.photos else [str(p) for p in write_sample_files(tmp)]
        vectors = emb.embed(photos)                       # float32 (N, dim), in the shared image-text space

    queries = args.query or ["a photo of an astronaut", "a cup of coffee", "a cat"]
    ranking = emb.rank(vectors, queries, k=args.k)       # per query: photo indices best first, cosine scores
    for query, indices, scores in zip(queries, ranking.indices, ranking.scores, strict=True):
        print(f"{query!r}:")
        for i, score in zip(indices, scores, strict=True):
            print(f"  {score:.4f}  {photos[i]}")

    labels = [x.strip() for x in args.labels.split(",") if x.strip()]
    probs = emb.classify(vectors, labels, template="a photo of a {}.")  # CLIP softmax / SigLIP sigmoid per label
    kind = emb.space["scores"]
    print(f"zero-shot labels ({kind}):")
    for path, p in zip(photos, probs, strict=True):
        best = int(p.argmax())
        print(f"  {labels[best]:>10} {p[best]:.3f}  {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
