"""``imgembed classify``: zero-shot labels for photos with an artifact's image and text towers.

Each label is put into a prompt template, embedded by the text tower, and scored against every photo as the
model defines it: CLIP a softmax over the labels, SigLIP an independent sigmoid per label. Unreadable photos
are reported and skipped (exit code 3); the others are labelled.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import numpy as np
import typer
from rich.table import Table

from imgembed.cli.common import err_console, errors, out_console


def parse_labels(labels: Optional[str], labels_file: Optional[Path]) -> list[str]:
    """Labels from ``--labels "cat,dog"`` or ``--labels-file`` (one per line); BadParameter when none or empty."""
    if (labels is None) == (labels_file is None):
        raise typer.BadParameter("give exactly one of --labels and --labels-file")
    if labels_file is not None:
        try:
            raw = labels_file.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise typer.BadParameter(f"--labels-file {labels_file}: cannot read it ({e})") from None
    else:
        raw = labels.split(",")
    out = [x.strip() for x in raw if x.strip()]
    if not out:
        raise typer.BadParameter("no labels given (expected e.g. --labels \"cat,dog,car\")")
    if len(set(out)) != len(out):
        dup = sorted({x for x in out if out.count(x) > 1})
        raise typer.BadParameter(f"duplicate labels {dup}")
    return out


def classify_cmd(
    artifact: Path = typer.Argument(..., help="Artifact directory exported with --text (CLIP or SigLIP)."),
    photos: List[str] = typer.Argument(..., help="Image files, directories (recursive) or glob patterns."),
    labels: Optional[str] = typer.Option(None, "--labels", help="Comma-separated labels, e.g. \"cat,dog,car\"."),
    labels_file: Optional[Path] = typer.Option(None, "--labels-file", help="A file with one label per line."),
    template: str = typer.Option("a photo of a {}.", "--template", help="Prompt; {} is replaced by the label."),
    top: int = typer.Option(1, "--top", min=1, help="Labels to print per photo, most probable first."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object per photo instead of a table."),
    backend: str = typer.Option("auto", "--backend", help="Engine backend (auto, onnxruntime, openvino)."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="CPU threads."),
) -> None:
    """Zero-shot classification: the most probable labels of each photo (CLIP softmax / SigLIP sigmoid)."""
    import imgembed
    from imgembed.jobs.folder import list_images

    names = parse_labels(labels, labels_file)
    if "{}" not in template:
        raise typer.BadParameter(f"--template {template!r} must contain {{}} where the label goes")
    files = list_images(photos)
    if not files:
        err_console.print(f"[bold red]error[/]: no image files found in {photos}")
        raise typer.Exit(2)
    with errors():
        emb = imgembed.load(artifact, backend=backend, threads=threads)
        result = emb.embed(files, on_error="report")
        probs = emb.classify(result.vectors, names, template) if len(result.vectors) else np.zeros((0, len(names)))
    kind = (emb.space or {}).get("scores")
    rows = []
    for row, i in enumerate(result.indices):
        order = np.argsort(-probs[row], kind="stable")[:top]
        best = [{"label": names[j], "probability": round(float(probs[row, j]), 6)} for j in order]
        rows.append({"path": str(files[i]), "labels": best})
    if as_json:
        for r in rows:
            print(json.dumps(r, ensure_ascii=False))
    else:
        scoring = "softmax over labels" if kind == "softmax" else "sigmoid per label"
        table = Table(title=f"{emb.name}: {len(names)} labels, {scoring}, template {template!r}")
        for col in ("photo", "label", "probability"):
            table.add_column(col)
        for r in rows:
            table.add_row(r["path"], ", ".join(x["label"] for x in r["labels"]),
                          ", ".join(f"{x['probability']:.3f}" for x in r["labels"]))
        out_console.print(table)
    for _i, msg in result.errors:
        err_console.print(f"[yellow]skipped[/]: {msg}", highlight=False)
    if result.errors:
        raise typer.Exit(3)


def register(app: typer.Typer) -> None:
    app.command("classify")(classify_cmd)
