"""The start-up canary: the decode engine must give transformers' tokens on this very device.

The decode engine re-implements generate's search and logits processors (worker/decoding/). Its
identity with `generate` is tested on CPU in the suite, but a worker may run where the suite never
ran (a GPU, another dtype, another attention kernel). So before a worker registers, one small
request runs through both, greedy and with 3 beams, and their tokens are compared. On a mismatch,
or if the decode engine fails, the worker logs one error and serves with `generate`: slower, never
wrong. Which engine serves, and why, is in the worker's registration (ListModels' WorkerInfo.engine
and engine_note), its metrics (florence2_worker_info) and `florence2 doctor`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from florence2_serve.common.generation import GenerationSettings
from florence2_serve.common.tasks import Task

from .inference import InferenceRequest

log = logging.getLogger(__name__)

# Short enough to cost little (measured: bench/RESULTS.md), long enough for beams to diverge and reorder.
CANARY_TOKENS = 24
CANARY_SEARCHES = (("greedy", GenerationSettings(num_beams=1, max_new_tokens=CANARY_TOKENS)),
                   ("3 beams", GenerationSettings(num_beams=3, max_new_tokens=CANARY_TOKENS)))


@dataclass(frozen=True)
class CanaryReport:
    engine: str  # the engine that serves: "decode" or "generate"
    note: str  # why, when it is not the one asked for ("" otherwise)
    seconds: float


def canary_image():
    """A small image with structure (so the model's output depends on it), made without any file."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (160, 120), (235, 232, 220))
    draw = ImageDraw.Draw(image)
    draw.rectangle((20, 30, 90, 100), fill=(200, 40, 40))
    draw.ellipse((100, 20, 150, 70), fill=(30, 90, 200))
    draw.line((0, 110, 160, 60), fill=(20, 20, 20), width=3)
    return image


def _answer(engine, settings: GenerationSettings, image) -> tuple[str, int]:
    outcome = engine.run_batch([InferenceRequest(image, Task.OD, generation=settings, image_key="canary")])[0]
    if outcome.error is not None or outcome.result is None:
        raise RuntimeError(outcome.error.message if outcome.error else "no result")
    return outcome.result.raw_text, outcome.result.generated_tokens


def check_decode_engine(decode_engine, reference_engine) -> CanaryReport:
    """Compare the two engines on the canary; the report says which one to serve with."""
    started = time.perf_counter()
    image = canary_image()
    for name, settings in CANARY_SEARCHES:
        try:
            fast = _answer(decode_engine, settings, image)
        except Exception as exc:  # noqa: BLE001 - any failure of the fast path means: do not use it
            note = f"the decode engine failed the start-up canary ({name}): {type(exc).__name__}: {exc}"
            return _fall_back(note, started)
        expected = _answer(reference_engine, settings, image)
        if fast != expected:
            note = (f"the decode engine's tokens differ from transformers' generate on the start-up canary ({name}, "
                    f"{CANARY_TOKENS} tokens): {fast[1]} vs {expected[1]} tokens, texts "
                    f"{fast[0][:60]!r} vs {expected[0][:60]!r}")
            return _fall_back(note, started)
    seconds = time.perf_counter() - started
    log.info("start-up canary: the decode engine gives generate's tokens (greedy and 3 beams) in %.2f s", seconds)
    return CanaryReport("decode", "", seconds)


def _fall_back(note: str, started: float) -> CanaryReport:
    log.error("%s; serving with generate instead (slower, and what the decode engine must match)", note)
    return CanaryReport("generate", note, time.perf_counter() - started)
