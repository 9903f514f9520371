"""One dispatcher from a loaded model to its engine: Florence-2, YOLOv8 or the no-op backend."""

from __future__ import annotations

from .inference import Engine
from .loader import LoadedModel


def create_engine(loaded: LoadedModel) -> Engine:
    if loaded.kind == "yolo":
        from .yolo import YoloEngine

        return YoloEngine(loaded)
    if loaded.kind == "noop":
        from .noop import NoopEngine

        return NoopEngine(loaded)
    from .engine import Florence2Engine

    return Florence2Engine(loaded)
