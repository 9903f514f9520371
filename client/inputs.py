"""Expand the CLI's IMAGES|DIRS|GLOBS arguments into image files, each with the relative path its
outputs are named by."""

from __future__ import annotations

import glob
from dataclasses import dataclass
from pathlib import Path

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


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


def expand_inputs(items: list[str]) -> list[InputImage]:
    """Files as given, directories' images (recursively, sorted), globs expanded. Order kept, no duplicates."""
    found: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            found.extend(sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES))
        elif path.is_file():
            found.append(path)
        else:
            matches = sorted(glob.glob(item, recursive=True))
            if not matches:
                raise FileNotFoundError(f"no such file, directory or matching glob: {item}")
            found.extend(Path(m) for m in matches if Path(m).is_file())
    unique, seen = [], set()
    for path in found:
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(InputImage(path, _relative(path)))
    return unique
