"""One dispatcher from a loaded model to its engine: Florence-2 (decode engine or generate), YOLOv8 or no-op."""

from __future__ import annotations

import logging

from .inference import Engine
from .loader import LoadedModel

log = logging.getLogger(__name__)


def create_engine(loaded: LoadedModel, engine: str = "auto", batch_size: int = 8, compile: bool = False) -> Engine:
    """engine: auto (the decode engine for native Florence-2), decode, or generate (transformers' generate)."""
    if loaded.kind == "yolo":
        from .yolo import YoloEngine

        return YoloEngine(loaded)
    if loaded.kind == "noop":
        from .noop import NoopEngine

        return NoopEngine(loaded)
    if engine == "decode" and loaded.kind != "native":
        raise ValueError(f"--engine decode needs a native Florence-2 model; this one is {loaded.kind}")
    if engine in ("auto", "decode") and loaded.kind == "native":
        from .decoding.engine import DecodeEngine, DecodeOptions

        # compile is off unless asked for: the compiled CUDA path (static shapes, CUDA graphs) has not yet run
        # on a GPU here (tests/test_gpu.py holds its check); it is to become the CUDA default once that passes.
        # Rows for batch_size requests of 3 beams (the engine adds room for the widest beam search).
        return DecodeEngine(loaded, DecodeOptions(rows=3 * batch_size, compile=compile))
    from .engine import Florence2Engine

    return Florence2Engine(loaded)
