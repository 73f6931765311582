"""Listing the images of a job: files, directories (recursive) and glob patterns, without ever looping.

Every directory is entered at most once per pattern position, keyed by its ``(st_dev, st_ino)``, so a
``self -> .`` link or two links pointing at each other end the walk instead of multiplying rows. A symbolic
link to a directory met *inside* the walk is skipped with a note unless ``follow_symlinks`` (then it is
followed once; a folder already walked is not walked again). A directory named on the command line is always
walked, link or not. Links to files are files. The notes of what was skipped come back with the paths.
"""
from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
MAGIC = set("*?[")


@dataclass
class Listing:
    """The image paths of a job's inputs (duplicates removed, order kept) and one note per skipped entry."""

    paths: list[str]
    skipped: list[str] = field(default_factory=list)


class _Walker:
    def __init__(self, follow_symlinks: bool):
        self.follow = follow_symlinks
        self.visited: set[tuple[int, int, int]] = set()
        self.skipped: list[str] = []

    def enter(self, directory: Path, state: int, named: bool = False) -> bool:
        """May ``directory`` be walked at pattern position ``state``? Notes why not when it may not."""
        try:
            st = os.stat(directory)
        except OSError as e:
            self.skipped.append(f"{directory}: not readable ({e.strerror})")
            return False
        if not named and directory.is_symlink() and not self.follow:
            self.skipped.append(f"{directory}: symbolic link to a folder, not followed (use --follow-symlinks)")
            return False
        key = (st.st_dev, st.st_ino, state)
        if key in self.visited:
            self.skipped.append(f"{directory}: folder already walked (a symbolic link loop or a second link)")
            return False
        self.visited.add(key)
        return True

    def entries(self, directory: Path) -> Iterator[tuple[Path, bool]]:
        """(path, is a directory) of the entries of ``directory``, sorted by name."""
        try:
            with os.scandir(directory) as it:
                found = sorted((e.name, e) for e in it)
        except OSError as e:
            self.skipped.append(f"{directory}: not readable ({e.strerror})")
            return
        for name, e in found:
            try:
                is_dir = e.is_dir()  # follows links; no extra stat for plain entries
                if not is_dir and e.is_symlink() and not os.path.exists(e.path):
                    self.skipped.append(f"{e.path}: broken symbolic link")
                    continue
            except OSError:
                continue
            yield directory / name, is_dir

    def images_in(self, directory: Path, named: bool = False) -> Iterator[str]:
        """The image files under ``directory`` (recursive, sorted by name at each level)."""
        if not self.enter(directory, -1, named):
            return
        stack = [self.entries(directory)]  # depth first without recursion: any depth of folders
        while stack:
            for path, is_dir in stack[-1]:
                if is_dir:
                    if self.enter(path, -1):
                        stack.append(self.entries(path))
                        break
                elif path.suffix.lower() in IMAGE_SUFFIXES:
                    yield str(path)
            else:
                stack.pop()

    def glob(self, directory: Path, parts: list[str], i: int, named: bool = False) -> Iterator[Path]:
        """Paths under ``directory`` matching ``parts[i:]`` (``**``: zero or more folders)."""
        if i == len(parts):
            yield directory
            return
        part = parts[i]
        if part == "**":
            if not self.enter(directory, i, named):
                return
            yield from self.glob(directory, parts, i + 1, named)
            for path, is_dir in self.entries(directory):  # a linked folder among them: see enter
                if is_dir and not path.name.startswith("."):
                    yield from self.glob(path, parts, i)
            return
        if not any(c in MAGIC for c in part):
            candidate = directory / part
            if os.path.lexists(candidate):
                yield from self._descend(candidate, parts, i, named=True)
            return
        for path, is_dir in self.entries(directory):
            if fnmatch.fnmatchcase(path.name, part) and (part.startswith(".") or not path.name.startswith(".")):
                if i + 1 == len(parts) or is_dir:
                    yield from self._descend(path, parts, i)

    def _descend(self, path: Path, parts: list[str], i: int, named: bool = False) -> Iterator[Path]:
        if i + 1 == len(parts):
            yield path
        elif path.is_dir() and (parts[i + 1] == "**" or self.enter(path, i + 1, named)):
            yield from self.glob(path, parts, i + 1, named)


def _split(pattern: str) -> tuple[Path, list[str]]:
    """(the folder before the first magic component, the components from there on)."""
    p = Path(pattern)
    parts = list(p.parts)
    k = next(i for i, part in enumerate(parts) if any(c in MAGIC for c in part))
    root = Path(*parts[:k]) if k else Path(".")
    return root, parts[k:]


def _from_glob(walker: _Walker, pattern: str) -> list[str]:
    root, parts = _split(pattern)
    if not root.is_dir():
        return []
    out: list[str] = []
    for m in walker.glob(root, parts, 0, named=True):  # the folder before the pattern is named
        if m.is_dir():
            out += walker.images_in(m, named=True)
        elif m.is_file():
            out.append(str(m))
    return sorted(out)


def walk_inputs(inputs: Iterable[str], *, follow_symlinks: bool = False) -> Listing:
    """Files as given; directories -> their image files (recursive, sorted); glob patterns (``*``, ``?``,
    ``[``, ``**``) -> matching files (sorted; directories among them expanded). Duplicates removed, order
    kept. A name that matches nothing is kept, so the job reports it as a failed row."""
    walker = _Walker(follow_symlinks)
    out: list[str] = []
    for s in inputs:
        p = Path(s)
        if p.is_dir():
            out += sorted(walker.images_in(p, named=True))
        elif not os.path.lexists(p) and any(c in s for c in MAGIC):
            out += _from_glob(walker, s)
        else:
            out.append(s)
    return Listing(list(dict.fromkeys(out)), list(dict.fromkeys(walker.skipped)))


def list_images(inputs: Iterable[str], *, follow_symlinks: bool = False) -> list[str]:
    """The paths of :func:`walk_inputs` (the notes of skipped entries dropped)."""
    return walk_inputs(inputs, follow_symlinks=follow_symlinks).paths
