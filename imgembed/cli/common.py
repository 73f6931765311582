"""What every imgembed sub-command shares: the consoles, typed errors as exit codes, the step spinner.

Exit codes: 0 success; 1 a typed imgembed error (message on stderr, no traceback); 2 usage error or a
failed parity gate; 3 ``embed`` finished but some inputs could not be read (the good ones are written).
"""
from __future__ import annotations

import contextlib
import sys
from typing import Iterator

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from imgembed.errors import ImgembedError, ParityError
from imgembed.jobs import printable

# Wide consoles when piped, so tables are not truncated to 80 columns in logs and CI.
out_console = Console(width=None if sys.stdout.isatty() else 160)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 160)


@contextlib.contextmanager
def errors() -> Iterator[None]:
    """Turn typed errors into a one-line message and an exit code instead of a traceback."""
    try:
        yield
    except ParityError as e:
        err_console.print(f"[bold red]parity gate failed[/]: {safe_text(str(e))}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    except ImgembedError as e:
        err_console.print(f"[bold red]error[/] ({type(e).__name__}): {safe_text(str(e))}", highlight=False,
                          soft_wrap=True)
        raise typer.Exit(1) from None


def safe_text(text: str) -> str:
    """``text`` for a Rich console: markup escaped and terminal control characters written as ``\\xNN``, line
    by line (messages name files and values of unknown origin: a path holding ``[/x]`` or an ESC sequence
    must print as it is, not be interpreted)."""
    return "\n".join(escape(printable(line)) for line in text.split("\n"))


@contextlib.contextmanager
def steps(title: str) -> Iterator:
    """A spinner that shows the current step of a long operation."""
    with Progress(SpinnerColumn(), TextColumn("[bold]{task.description}"), TimeElapsedColumn(),
                  console=err_console, transient=True) as progress:
        task = progress.add_task(title, total=None)

        def step(text: str) -> None:
            progress.update(task, description=text)
            err_console.print(f"  [dim]·[/] {text}", highlight=False)

        yield step
