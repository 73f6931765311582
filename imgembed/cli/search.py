"""``imgembed search``: the photos of a Parquet index nearest to a text or an image (:mod:`imgembed.jobs.search`)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from imgembed.jobs import printable
from imgembed.jobs.parquet import Limits
from imgembed.jobs.search import search


def search_cmd(
    index: Path = typer.Argument(..., help="Parquet index written by `imgembed embed ... --out X.parquet`."),
    query: str = typer.Argument(..., help="A text, or an image file (an existing path is an image query)."),
    k: int = typer.Option(10, "-k", "--top", min=1, help="Results to print."),
    artifact: Optional[Path] = typer.Option(None, "--artifact", help="The artifact that embedded the index (the "
                                            "index records its sha256, not its path); exported with --text for "
                                            "text queries. Not needed for an image query that is in the index."),
    image: bool = typer.Option(False, "--image", help="The query is an image file."),
    text: bool = typer.Option(False, "--text", help="The query is a text, even if a file has that name."),
    use_faiss: Optional[bool] = typer.Option(None, "--faiss/--numpy", help="Search with FAISS or numpy "
                                             "(default: FAISS when it is installed, else numpy)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object per result instead of a table."),
    backend: str = typer.Option("auto", "--backend", help="Engine backend (auto, onnxruntime, openvino)."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="CPU threads."),
    max_rows: int = typer.Option(Limits.rows, "--max-rows", min=1, help="Refuse an index declaring more rows."),
    max_bytes: int = typer.Option(Limits.bytes, "--max-bytes", min=1, help="Refuse an index declaring more "
                                  "decoded bytes (vectors, paths, errors)."),
) -> None:
    """The photos of INDEX nearest to QUERY (a text or an image), by cosine similarity."""
    from rich.markup import escape
    from rich.table import Table

    from imgembed.cli.common import err_console, errors, out_console

    if image and text:
        raise typer.BadParameter("give at most one of --image and --text")
    force = "image" if image else "text" if text else None
    with errors():
        hits, kind, found = search(index, query, k=k, artifact=artifact, kind=force, use_faiss=use_faiss,
                                   backend=backend, threads=threads, limits=Limits(rows=max_rows, bytes=max_bytes))
    meta = found.metadata
    summary = escape(printable(f"{kind} query {query!r}: {len(found.vectors)} vectors of {meta.get('model')} "
                               f"({meta.get('precision')})" + (f", {len(found.errors)} failed rows skipped"
                                                               if found.errors else "")))
    err_console.print(summary, highlight=False)
    if as_json:
        for h in hits:
            print(json.dumps({"rank": h.rank, "score": h.score, "path": h.path}, ensure_ascii=False))
        return
    table = Table()
    for col in ("rank", "score", "path"):
        table.add_column(col)
    for h in hits:
        table.add_row(str(h.rank), f"{h.score:.4f}", escape(printable(h.path)))
    out_console.print(table)


def register(app: typer.Typer) -> None:
    """Add ``search`` to the imgembed CLI."""
    app.command("search")(search_cmd)
