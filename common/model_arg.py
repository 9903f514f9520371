"""The `--model` argument, read the same way by `worker`, `up` and `detect --embedded`."""

from __future__ import annotations

MAX_MODEL_NAME = 64


def parse_model_arg(value: str) -> tuple[str, str]:
    """'NAME=PATH_OR_ID' -> (name, path); a bare path names the model after its last component."""
    if "=" in value:
        name, path = value.split("=", 1)
    else:
        path = value
        name = path.rstrip("/").split("/")[-1]
    name, path = name.strip(), path.strip()
    if not name or not path:
        raise ValueError(f"--model must be NAME=PATH_OR_ID, got {value!r}")
    if len(name) > MAX_MODEL_NAME or not all(c.isascii() and (c.isalnum() or c in "-_.") for c in name):
        raise ValueError(f"model name {name[:MAX_MODEL_NAME]!r} must be 1 to {MAX_MODEL_NAME} letters, digits, "
                         "'-', '_' and '.'")
    return name, path
