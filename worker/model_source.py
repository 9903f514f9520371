"""Where a `--model` argument points: a local directory, or a Hugging Face hub id (and whether the
hub can be reached at all), decided before anything slow happens.

A path that looks local and does not exist is one clear error at once (not 24 s of hub retries); a
hub id with the hub unreachable is looked up in the local cache only (`local_files_only`), and a
miss there is one message.
"""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?")


class SourceError(ValueError):
    """The argument is neither an existing local checkpoint nor a hub id; the message says which it looked like."""


@dataclass(frozen=True)
class ModelSource:
    path_or_id: str
    local: bool
    offline: bool = False  # hub id, hub unreachable: the local cache only


def looks_local(value: str) -> bool:
    """A path rather than `org/name`: absolute, ./ ../ ~, more than one '/', a backslash, a trailing
    '/', or a first component that is an existing local directory (models/tinyy when models/ exists)."""
    if value.startswith(("/", "./", "../", "~")) or "\\" in value or value.endswith("/") or value.count("/") > 1:
        return True
    first = value.split("/", 1)[0]
    return "/" in value and Path(first).is_dir()


def hub_reachable(endpoint: str = "https://huggingface.co", timeout_s: float = 2.0) -> bool:
    parsed = urlparse(endpoint)
    try:
        with socket.create_connection((parsed.hostname or "huggingface.co", parsed.port or 443), timeout=timeout_s):
            return True
    except OSError:
        return False


def resolve_source(value: str, *, offline_env: bool = False, endpoint: str = "https://huggingface.co") -> ModelSource:
    path = Path(value).expanduser()
    if path.exists():
        return ModelSource(str(path), local=True)
    if looks_local(value):
        raise SourceError(f"no such model directory: {value} (a local path; hub ids look like org/name)")
    if not HUB_ID.fullmatch(value):
        raise SourceError(f"{value!r} is neither a local directory nor a Hugging Face hub id (org/name)")
    return ModelSource(value, local=False, offline=offline_env or not hub_reachable(endpoint))


def hub_offline_env() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub read it."""
    try:
        from huggingface_hub import constants
    except ImportError:
        return False
    return bool(constants.HF_HUB_OFFLINE)
