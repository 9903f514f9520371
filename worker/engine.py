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
from florence2_serve.common.log_setup import job_fields
from florence2_serve.common.errors import JobError, Reason
from florence2_serve.common.postprocess import parse_generation
from florence2_serve.common.tasks import FLORENCE_TASKS, SPECS, Input, Task, build_prompt

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
        # N new tokens feed decoder positions 0..N-1 (the decoder start token at 0; the last token is
        # never fed back): measured on the tiny model, 1088 positions generate 1088 tokens, 1089 fail.
        self.max_new_tokens_limit = positions
        self.max_text_tokens = _text_budget(loaded.processor, positions)
        self.tasks = list(FLORENCE_TASKS)

    def tokenizer_json(self) -> str | None:
        """The tokenizer as `tokenizers` JSON (the front end counts text tokens with it), if it has one."""
        backend = getattr(getattr(self.loaded.processor, "tokenizer", None), "backend_tokenizer", None)
        return backend.to_str() if backend is not None else None

    def run_batch(self, requests: list[InferenceRequest]) -> list[InferenceOutcome]:
        outcomes = {id(r): InferenceOutcome(r) for r in requests}
        groups: dict[GenerationSettings, list[tuple[InferenceRequest, str]]] = defaultdict(list)
        for request in requests:
            if request.should_stop and request.should_stop():
                outcomes[id(request)].cancelled = True
                continue
            error, prompt = self._check(request)
            if error is not None:
                outcomes[id(request)].error = error
                continue
            groups[request.generation].append((request, prompt))
        for settings, group in groups.items():
            self._run_group(settings, group, outcomes)
        return [outcomes[id(r)] for r in requests]

    def _check(self, request: InferenceRequest) -> tuple[JobError | None, str]:
        """(why the request cannot run, or None; its prompt). The front end checks the same first."""
        if request.task is Task.DETECT:
            return JobError(Reason.TASK_NOT_SUPPORTED.value,
                            "task DETECT needs a YOLOv8 worker; this worker holds Florence-2"), ""
        try:
            prompt = build_prompt(request.task, request.text, request.region, request.image.size)
        except ValueError as exc:
            return JobError(Reason.INVALID_FIELD.value, str(exc)), ""
        limit = self.max_new_tokens_limit
        if limit and request.generation.max_new_tokens > limit:
            return JobError(Reason.TOKEN_LIMIT.value,
                            f"max_new_tokens {request.generation.max_new_tokens} exceeds this model's limit of {limit}",
                            {"limit": str(limit)}), ""
        placeholder = getattr(self.loaded.processor, "image_token", None)
        if request.text and placeholder and placeholder in request.text:
            return JobError(Reason.INVALID_FIELD.value,
                            f"text must not contain {placeholder}: this model reads it as the image's place"), ""
        if request.text and self.max_text_tokens:
            count = len(self.loaded.processor.tokenizer(request.text, add_special_tokens=False).input_ids)
            if count > self.max_text_tokens:
                return JobError(Reason.TOKEN_LIMIT.value,
                                f"text is {count} tokens, over this model's limit of {self.max_text_tokens}",
                                {"limit": str(self.max_text_tokens)}), ""
        return None, prompt

    def _run_group(self, settings, group, outcomes) -> None:
        try:
            results = self._generate(settings, group)
        except Exception as exc:  # noqa: BLE001 - isolate the failure to the request that causes it
            if len(group) == 1:
                request = group[0][0]
                log.exception("generate failed for job %s", request.request_id,
                              extra=job_fields(request.request_id, str(self.loaded.model_id), request.task.name))
                outcomes[id(group[0][0])].error = self._failure()
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

    def _generate(self, settings: GenerationSettings, group) -> list:
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
        preprocess_ms, generate_ms = (preprocessed - started) * 1000, (generated_at - preprocessed) * 1000
        return [self._result(request, row.tolist(), preprocess_ms, generate_ms, len(group))
                for (request, _), row in zip(group, generated, strict=True)]

    def _result(self, request: InferenceRequest, tokens: list[int], preprocess_ms: float, generate_ms: float,
                batch_size: int):
        """The typed result of one request's generated tokens (decoder start first, pads anywhere)."""
        post_started = time.perf_counter()
        loaded, tokenizer = self.loaded, self.loaded.processor.tokenizer
        pad_id = tokenizer.pad_token_id
        text = self.loaded.processor.batch_decode([tokens], skip_special_tokens=False)[0]
        result = parse_generation(request.task, text.replace(tokenizer.pad_token, ""), request.image.size)
        result.generated_tokens = sum(1 for token in tokens if token != pad_id) - 1  # minus the decoder start
        result.model_id = loaded.model_id
        result.model_revision = loaded.revision
        result.batch_size = batch_size
        result.timings.preprocess_ms = preprocess_ms
        result.timings.generate_ms = generate_ms
        result.timings.postprocess_ms = (time.perf_counter() - post_started) * 1000
        return result

    @staticmethod
    def _failure() -> JobError:
        return JobError(Reason.INFERENCE_FAILED.value, "inference failed on the worker (its log has the details)")


def _text_budget(processor, positions: int) -> int:
    """Most text tokens a prompt may carry: the encoder's positions hold the image tokens, the
    longest text-taking prompt template and its special tokens; 2 spare for merges at the seams."""
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is None or not positions:
        return 0
    image_tokens = (getattr(processor, "num_image_tokens", None)
                    or getattr(getattr(processor, "image_processor", None), "image_seq_length", None) or 0)
    template = max((len(tokenizer(spec.template.format(input="")).input_ids)
                    for spec in SPECS.values() if spec.input is Input.TEXT), default=0)
    return max(0, positions - int(image_tokens) - template - 2)


def _criteria_list(stopper):
    from transformers import StoppingCriteria, StoppingCriteriaList

    class _Criteria(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return stopper(input_ids, scores, **kwargs)

    return StoppingCriteriaList([_Criteria()])
