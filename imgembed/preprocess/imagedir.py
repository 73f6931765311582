"""A directory of the user's own images, decoded for a parity check (``imgembed parity --images DIR``).

Every non-hidden file under the directory is tried (by content, not by suffix); files that do not decode
are skipped and reported, never fatal. A directory without one readable image is an error.
"""
from __future__ import annotations

from pathlib import Path

from PIL import Image

from imgembed.errors import ImageDecodeError, ImageSetError
from imgembed.preprocess import load_image


def load_image_dir(directory: str | Path) -> tuple[list[tuple[str, Image.Image]], list[str]]:
    """((name relative to ``directory``, decoded image) pairs in name order, one message per skipped file)."""
    d = Path(directory)
    if not d.is_dir():
        raise ImageSetError(f"image directory {d} does not exist (expected a directory of images)")
    files = sorted(p for p in d.rglob("*") if p.is_file() and not any(
        part.startswith(".") for part in p.relative_to(d).parts))
    images, skipped = [], []
    for p in files:
        try:
            images.append((str(p.relative_to(d)), load_image(p)))
        except ImageDecodeError as e:
            skipped.append(str(e))
    if not images:
        what = f"{len(files)} file(s), none readable: " + "; ".join(skipped[:3]) if files else "no files"
        raise ImageSetError(f"image directory {d} holds no readable image ({what})")
    return images, skipped
