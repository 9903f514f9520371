"""A backend that does no inference: for measuring the service around the model (tests, benchmarks).

`florence2 worker --model NAME=noop --kind noop` serves every task with an empty result that
carries the image size, at once. Its workers are reported as random-weights models in
ListModels, so nobody mistakes one for a real model.
"""

from __future__ import annotations

import time

from florence2_serve.common.results import TaskResult

from .inference import InferenceOutcome, InferenceRequest

MODEL_ID = "noop"


class NoopEngine:
    kind = "noop"

    def __init__(self, loaded=None):
        self.loaded = loaded
        self.generate_calls = 0

    def run_batch(self, requests: list[InferenceRequest]) -> list[InferenceOutcome]:
        self.generate_calls += 1
        outcomes = []
        for request in requests:
            outcome = InferenceOutcome(request)
            if request.should_stop and request.should_stop():
                outcome.cancelled = True
            else:
                width, height = request.image.size
                outcome.result = TaskResult(task=request.task.value, image_width=width, image_height=height,
                                            model_id=MODEL_ID, model_revision=MODEL_ID, batch_size=len(requests))
            outcomes.append(outcome)
        return outcomes


def load_noop():
    from .loader import LoadedModel

    started = time.perf_counter()
    return LoadedModel(model=None, processor=None, kind="noop", model_id=MODEL_ID, revision=MODEL_ID,
                       device="cpu", dtype=None, attention="-", random_weights=True,
                       load_seconds=time.perf_counter() - started)
