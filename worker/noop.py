"""A backend that does no inference: for measuring and testing the service around the model.

`florence2 worker --model NAME=noop --kind noop` serves every task with an empty result that
carries the image size. It "decodes" `min_new_tokens` steps of 1 ms each (0 by default: at once),
consulting each request's stop check at every step the way a real generate does, so a test or
benchmark can hold a job running for a chosen time without a model. Its workers are reported as
random-weights models in ListModels, so nobody mistakes one for a real model.
"""

from __future__ import annotations

import time

from florence2_serve.common.proto_enums import task_to_proto
from florence2_serve.common.tasks import Task
from florence2_serve.v1 import florence2_pb2 as pb

from .inference import InferenceOutcome, InferenceRequest

MODEL_ID = "noop"
STEP_S = 0.001


class NoopEngine:
    kind = "noop"
    tasks = list(Task)
    # Its "tokens" are 1 ms steps, so tests may hold a job for seconds; text is counted in UTF-8 bytes.
    max_new_tokens_limit = 4096
    max_text_tokens = 256

    def __init__(self, loaded=None):
        self.loaded = loaded
        self.generate_calls = 0

    def tokenizer_json(self) -> None:
        return None

    def run_batch(self, requests: list[InferenceRequest]) -> list[InferenceOutcome]:
        self.generate_calls += 1
        outcomes = [InferenceOutcome(request) for request in requests]
        steps = max((r.generation.min_new_tokens for r in requests), default=0)
        for step in range(steps + 1):
            live = 0
            for outcome in outcomes:
                request = outcome.request
                if outcome.cancelled or step > request.generation.min_new_tokens:
                    continue
                if request.should_stop and request.should_stop():
                    outcome.cancelled = True
                else:
                    live += 1
            if not live:
                break
            if step < steps:
                time.sleep(STEP_S)
        for outcome in outcomes:
            if not outcome.cancelled:
                width, height = outcome.request.image.size
                outcome.result = pb.Result(task=task_to_proto(outcome.request.task), image_width=width,
                                           image_height=height, model_id=MODEL_ID, model_revision=MODEL_ID,
                                           batch_size=len(requests),
                                           generated_tokens=outcome.request.generation.min_new_tokens)
        return outcomes


def load_noop():
    from .loader import LoadedModel

    started = time.perf_counter()
    return LoadedModel(model=None, processor=None, kind="noop", model_id=MODEL_ID, revision=MODEL_ID,
                       device="cpu", dtype=None, attention="-", random_weights=True,
                       load_seconds=time.perf_counter() - started, source_format="noop")
