"""What every inference backend shares (a leaf module: backends import it, it imports none of them).

A backend is an Engine: N decoded requests in, N outcomes out, in order. Each request may carry a
stop check consulted at every decoding step (cancelled, past its deadline or timeout, or the
worker must stop now); a stopped request's outcome is `cancelled`, and the worker decides why.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

from florence2_serve.common.generation import GenerationSettings
from florence2_serve.common.errors import JobError
from florence2_serve.common.tasks import Task
from florence2_serve.v1 import florence2_pb2 as pb


@dataclass
class InferenceRequest:
    image: object  # PIL.Image, RGB
    task: Task
    text: str = ""
    region: tuple[float, float, float, float] | None = None
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    should_stop: Callable[[], bool] | None = None
    request_id: str = ""
    # Names the image's bytes (its digest): requests with equal keys share one vision encoding.
    image_key: str = ""
    # DETECT only: the detector's confidence / iou / max_detections for this image (unset: its defaults).
    detection: dict = field(default_factory=dict)
    # The model's image processor's output for `image`, made before the request reached the model thread
    # (worker/pixels.py); None: the engine runs the processor itself.
    pixels: object = None


@dataclass
class InferenceOutcome:
    request: InferenceRequest
    result: pb.Result | None = None
    error: JobError | None = None
    cancelled: bool = False


class Engine(Protocol):
    kind: str
    generate_calls: int
    tasks: list[Task]  # what it serves
    max_new_tokens_limit: int  # 0: generates no tokens
    max_text_tokens: int  # 0: takes no text

    def tokenizer_json(self) -> str | None: ...

    def run_batch(self, requests: list[InferenceRequest]) -> list[InferenceOutcome]: ...


class BatchSizeError(RuntimeError):
    """An engine returned a different number of outcomes than it was given requests (a bug)."""


def check_batch(requests: list, outcomes: list) -> list:
    if len(outcomes) != len(requests):
        raise BatchSizeError(
            f"engine did not preserve the batch size: {len(requests)} requests in, {len(outcomes)} outcomes out")
    return outcomes
