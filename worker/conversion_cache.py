"""Converted checkpoints on disk, keyed by the digest of the source checkpoint's files.

A worker given a Microsoft-format checkpoint converts it once: the native copy lands in
`<cache>/<digest>/` (written to a temporary directory, then renamed, so a crash leaves nothing
half-written behind that could be mistaken for a conversion), and every later start, or every other
worker on the machine, loads that copy. A file lock keeps two workers from converting the same
checkpoint at once. A changed file (a new fine-tune epoch saved over the old one) is a new digest.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from .conversion import (
    CONVERSION_RECORD, CONVERSION_VERSION, TOKENIZER_FILES, ConversionError, convert_checkpoint, weight_files,
)

log = logging.getLogger(__name__)

DEFAULT_CACHE = Path("~/.cache/florence2-serve/converted")
RECORD = CONVERSION_RECORD
DEFINING_FILES = ("config.json", "preprocessor_config.json", *TOKENIZER_FILES)
# What a hub download of a Microsoft-format checkpoint needs (its code is never fetched).
HUB_PATTERNS = ["*.json", "*.safetensors", "pytorch_model*.bin", "merges.txt", "vocab.json"]


@dataclass(frozen=True)
class CachedConversion:
    path: Path
    digest: str
    converted_now: bool
    seconds: float


def checkpoint_digest(directory: Path) -> str:
    """sha256 over the names and contents of the files that define the model: config, tokenizer,
    preprocessor and weights."""
    files = [directory / name for name in DEFINING_FILES if (directory / name).is_file()]
    files += weight_files(directory)
    index = sorted(directory.glob("*.index.json"))
    total = hashlib.sha256()
    for path in sorted(set(files + index)):
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 22), b""):
                digest.update(chunk)
        total.update(f"{path.name}\0{digest.hexdigest()}\n".encode())
    return total.hexdigest()


def cache_root(configured: str | None) -> Path:
    return Path(configured).expanduser() if configured else DEFAULT_CACHE.expanduser()


def ensure_converted(source_dir: Path, root: Path) -> CachedConversion:
    """The native copy of `source_dir` under `root`, converting it first if no worker has yet."""
    from filelock import FileLock

    started = time.perf_counter()
    digest = checkpoint_digest(source_dir)
    target = _entry(root, digest)
    if _complete(target):
        return CachedConversion(target, digest, False, time.perf_counter() - started)
    root.mkdir(parents=True, exist_ok=True)
    key = target.name
    with FileLock(str(root / f"{key}.lock")):
        if _complete(target):  # another worker finished it while we waited
            return CachedConversion(target, digest, False, time.perf_counter() - started)
        staging = root / f".{key}.{os.getpid()}.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        try:
            report = convert_checkpoint(source_dir, staging)
            record = {"digest": digest, "converted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                      **report.to_dict(), "destination": str(target)}
            (staging / RECORD).write_text(json.dumps(record, indent=2) + "\n")
            shutil.rmtree(target, ignore_errors=True)  # a stale directory without its record
            os.replace(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return CachedConversion(target, digest, True, time.perf_counter() - started)


def cached_conversion(source_dir: Path, root: Path) -> Path | None:
    """The existing native copy of `source_dir`, if any (nothing is converted)."""
    target = _entry(root, checkpoint_digest(source_dir))
    return target if _complete(target) else None


def _entry(root: Path, digest: str) -> Path:
    """Where this code's conversion of the checkpoint with this digest lives (another conversion version
    is another entry: what an older converter wrote is never served)."""
    return root / f"{digest[:32]}-v{CONVERSION_VERSION}"


def _complete(target: Path) -> bool:
    """A conversion is complete once its record is written (the last file, inside the renamed directory)
    by this conversion version."""
    try:
        record = json.loads((target / RECORD).read_text())
    except (OSError, ValueError):
        return False
    return record.get("version") == CONVERSION_VERSION


def checkpoint_dir(source, revision: str | None) -> Path:
    """A local directory with the checkpoint's config, tokenizer, preprocessor and weights: the directory
    itself, or a hub snapshot of those files (from the local cache only when the hub is unreachable)."""
    if source.local:
        return Path(source.path_or_id)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(source.path_or_id, revision=revision, allow_patterns=HUB_PATTERNS,
                                  local_files_only=source.offline))


def convert_source(source: str, destination: Path, revision: str | None = None):
    """`florence2 convert`: a local directory or hub id into `destination`; the ConversionReport."""
    from .model_source import SourceError, hub_offline_env, resolve_source

    try:
        resolved = resolve_source(source, offline_env=hub_offline_env())
    except SourceError as exc:
        raise ConversionError(str(exc)) from None
    try:
        directory = checkpoint_dir(resolved, revision)
    except Exception as exc:  # noqa: BLE001 - hub errors of every kind end here
        where = "the hub is unreachable and it is not in the local cache" if resolved.offline else str(exc)
        raise ConversionError(f"could not fetch {source} ({where})") from None
    if destination.exists():
        shutil.rmtree(destination)
    return convert_checkpoint(directory, destination)
