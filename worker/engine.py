"""Batched Florence-2 inference: N decoded requests in, N typed results out.

Requests with the same generation settings run as one `generate` call, whatever their tasks,
prompts and image sizes; others are split into compatible groups. Each request may carry a cancel
check that is consulted at every decoding step: once every request of a group is cancelled (or past
its deadline) the generate stops early. A failing group is retried one request at a time, so one
bad request never fails the others.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from typing import Callable

from florence2_serve.common.generation import GenerationSettings
from florence2_serve.common.postprocess import parse_generation
from florence2_serve.common.results import TaskResult
from florence2_serve.common.tasks import Task, build_prompt

from .inference import InferenceOutcome, InferenceRequest
from .loader import LoadedModel

log = logging.getLogger(__name__)


class _StopRequested:
    """A StoppingCriteria: per row, has this row's request been cancelled?"""

    def __init__(self, checks: list[Callable[[], bool] | None]):
        self.checks = checks
        self.steps = 0

    def __call__(self, input_ids, scores, **_kwargs):
        import torch

        self.steps += 1
        flags = [bool(check()) if check else False for check in self.checks]
        rows_per_request = max(1, input_ids.shape[0] // len(flags))
        stop = torch.tensor(flags, dtype=torch.bool).repeat_interleave(rows_per_request)
        return stop.to(input_ids.device)


class Florence2Engine:
    kind = "florence2"

    def __init__(self, loaded: LoadedModel):
        self.loaded = loaded
        self.generate_calls = 0
        self.last_decoding_steps = 0
        text_config = getattr(loaded.model.config, "text_config", None)
        positions = getattr(text_config, "max_position_embeddings", 0) or 0
        # BART's learned positions hold the decoder start token too.
        self.max_new_tokens_limit = max(0, positions - 2)

    def run_batch(self, requests: list[InferenceRequest]) -> list[InferenceOutcome]:
        outcomes = {id(r): InferenceOutcome(r) for r in requests}
        groups: dict[GenerationSettings, list[tuple[InferenceRequest, str]]] = defaultdict(list)
        for request in requests:
            if request.should_stop and request.should_stop():
                outcomes[id(request)].cancelled = True
                continue
            try:
                if request.task is Task.DETECT:
                    raise ValueError("task DETECT needs a YOLOv8 worker; this worker holds Florence-2")
                prompt = build_prompt(request.task, request.text, request.region, request.image.size)
                limit = self.max_new_tokens_limit
                if limit and request.generation.max_new_tokens > limit:
                    raise ValueError(
                        f"max_new_tokens {request.generation.max_new_tokens} exceeds this model's limit of {limit}"
                    )
            except ValueError as exc:
                outcomes[id(request)].error = str(exc)
                continue
            groups[request.generation].append((request, prompt))
        for settings, group in groups.items():
            self._run_group(settings, group, outcomes)
        return [outcomes[id(r)] for r in requests]

    def _run_group(self, settings, group, outcomes) -> None:
        try:
            results = self._generate(settings, group)
        except Exception as exc:  # noqa: BLE001 - isolate the failure to the request that causes it
            if len(group) == 1:
                log.exception("generate failed for request %s", group[0][0].request_id)
                outcomes[id(group[0][0])].error = f"inference failed: {type(exc).__name__}: {exc}"
                return
            log.warning("batched generate failed (%s); retrying %d requests one by one", exc, len(group))
            for item in group:
                self._run_group(settings, [item], outcomes)
            return
        for (request, _), result in zip(group, results, strict=True):
            outcome = outcomes[id(request)]
            if request.should_stop and request.should_stop():
                outcome.cancelled = True
            else:
                outcome.result = result

    def _generate(self, settings: GenerationSettings, group) -> list[TaskResult]:
        import torch

        loaded = self.loaded
        processor = loaded.processor
        started = time.perf_counter()
        inputs = processor(
            text=[prompt for _, prompt in group], images=[request.image for request, _ in group],
            return_tensors="pt", padding=True,
        )
        # Float inputs take the model's dtype: no "Input type (float) and bias type (c10::Half)".
        inputs = {
            key: value.to(loaded.device, loaded.dtype) if value.is_floating_point() else value.to(loaded.device)
            for key, value in inputs.items()
            if hasattr(value, "to")
        }
        preprocessed = time.perf_counter()
        stopper = _StopRequested([request.should_stop for request, _ in group])
        with torch.inference_mode():
            generated = loaded.model.generate(
                **inputs, **settings.generate_kwargs(), stopping_criteria=_criteria_list(stopper)
            )
        self.generate_calls += 1
        self.last_decoding_steps = stopper.steps
        generated_at = time.perf_counter()
        pad_id = processor.tokenizer.pad_token_id
        texts = processor.batch_decode(generated, skip_special_tokens=False)
        results = []
        for (request, _), row, text in zip(group, generated, texts, strict=True):
            post_started = time.perf_counter()
            raw_text = text.replace(processor.tokenizer.pad_token, "")
            result = parse_generation(request.task, raw_text, request.image.size)
            result.generated_tokens = int((row != pad_id).sum().item()) - 1  # minus the decoder start
            result.model_id = loaded.model_id
            result.model_revision = loaded.revision
            result.batch_size = len(group)
            result.timings.preprocess_ms = (preprocessed - started) * 1000
            result.timings.generate_ms = (generated_at - preprocessed) * 1000
            result.timings.postprocess_ms = (time.perf_counter() - post_started) * 1000
            results.append(result)
        return results


def _criteria_list(stopper):
    from transformers import StoppingCriteria, StoppingCriteriaList

    class _Criteria(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return stopper(input_ids, scores, **kwargs)

    return StoppingCriteriaList([_Criteria()])
