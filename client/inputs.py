"""Expand the CLI's IMAGES|DIRS|GLOBS arguments into image files, each with the relative path its
outputs are named by."""

from __future__ import annotations

import glob
import re
from dataclasses import dataclass
from pathlib import Path

from florence2_serve.common.tasks import Task

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
# `detect --draw`'s own outputs (client/draw.drawing_path): IMAGE.<task>.png, or IMAGE.<task>-N.png beside one.
DRAWING_NAME = re.compile(r"\.(" + "|".join(task.name.lower() for task in Task) + r")(-\d+)?\.png$")


@dataclass(frozen=True)
class InputImage:
    path: Path
    # Where outputs about it go below an output directory: its path relative to the working directory
    # (or, outside it, its absolute path without the root), so no two inputs share one.
    relative: Path

    def __str__(self) -> str:
        return str(self.path)

    def __fspath__(self) -> str:  # detect_many reads it as a path
        return str(self.path)


def _relative(path: Path) -> Path:
    resolved = path.resolve()
    try:
        return resolved.relative_to(Path.cwd().resolve())
    except ValueError:
        return resolved.relative_to(resolved.anchor)


def is_drawing(path: Path) -> bool:
    """Is this one of `detect --draw`'s own outputs (never an input of a later run)?"""
    return DRAWING_NAME.search(path.name) is not None


def expand_inputs(items: list[str], skip_dir: Path | None = None) -> list[InputImage]:
    """Files as given, directories' images (recursively, sorted), globs expanded. Order kept, no duplicates.

    Found in directories and globs, the tool's own drawings are skipped, and so is everything below
    `skip_dir` (the --draw directory, which may lie inside an input folder); a file named as such is kept."""
    skip = skip_dir.resolve() if skip_dir is not None else None

    def wanted(path: Path) -> bool:
        return (path.is_file() and not is_drawing(path)
                and (skip is None or not path.resolve().is_relative_to(skip)))

    found: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            found.extend(sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and wanted(p)))
        elif path.is_file():
            found.append(path)
        else:
            matches = sorted(glob.glob(item, recursive=True))
            if not matches:
                raise FileNotFoundError(f"no such file, directory or matching glob: {item}")
            found.extend(Path(m) for m in matches if wanted(Path(m)))
    unique, seen = [], set()
    for path in found:
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(InputImage(path, _relative(path)))
    return unique
