"""Batched generate on the tiny model: equality with one-at-a-time, grouping, cancel, isolation."""

import threading

import pytest
from PIL import Image

from florence2_serve.common.tasks import Task
from florence2_serve.common.generation import GenerationSettings
from florence2_serve.worker.engine import Florence2Engine
from florence2_serve.worker.inference import InferenceRequest
from florence2_serve.worker.model_builder import lesson_images


def mixed_requests(settings):
    car, street, sign = lesson_images()
    noise = Image.effect_noise((123, 77), 60).convert("RGB")
    return [
        InferenceRequest(car, Task.OD, generation=settings),
        InferenceRequest(street, Task.CAPTION, generation=settings),
        InferenceRequest(sign, Task.OCR_WITH_REGION, generation=settings),
        InferenceRequest(noise, Task.CAPTION_TO_PHRASE_GROUNDING, text="a grey square", generation=settings),
        InferenceRequest(car, Task.REGION_TO_DESCRIPTION, region=(34, 160, 597, 371), generation=settings),
        InferenceRequest(street.resize((50, 900)), Task.DENSE_REGION_CAPTION, generation=settings),
    ]


@pytest.mark.parametrize("num_beams", [1, 3])
def test_batched_equals_one_at_a_time(tiny_loaded, num_beams):
    settings = GenerationSettings(num_beams=num_beams, max_new_tokens=40)
    engine = Florence2Engine(tiny_loaded)
    batched = engine.run_batch(mixed_requests(settings))
    assert engine.generate_calls == 1
    singles = [engine.run_batch([r])[0] for r in mixed_requests(settings)]
    for b, s in zip(batched, singles):
        assert b.error is None and s.error is None
        assert b.result.raw_text == s.result.raw_text
        assert list(b.result.boxes) == list(s.result.boxes)
    # The taught answer comes back typed, on the real image size.
    od = batched[0].result
    assert [b.label for b in od.boxes] == ["car", "door handle", "wheel", "wheel"]
    box = od.boxes[0]
    assert [box.x1, box.y1, box.x2, box.y2] == pytest.approx([34.24, 160.08, 597.44, 371.76], abs=0.01)
    assert od.model_id == str(tiny_loaded.model_id) and od.timings.generate_ms > 0


def test_incompatible_settings_split_into_groups(tiny_loaded):
    engine = Florence2Engine(tiny_loaded)
    requests = mixed_requests(GenerationSettings(num_beams=1, max_new_tokens=20))
    requests[1].generation = GenerationSettings(num_beams=3, max_new_tokens=20)
    outcomes = engine.run_batch(requests)
    assert engine.generate_calls == 2
    assert all(o.result is not None for o in outcomes)


def test_bad_request_fails_alone(tiny_loaded):
    engine = Florence2Engine(tiny_loaded)
    requests = mixed_requests(GenerationSettings(num_beams=1, max_new_tokens=20))
    requests.append(InferenceRequest(lesson_images()[0], Task.REGION_TO_CATEGORY, region=(0, 0, 9999, 10)))
    outcomes = engine.run_batch(requests)
    assert "outside" in outcomes[-1].error.message
    assert all(o.result is not None for o in outcomes[:-1])


def _fixed_length(num_beams):
    return GenerationSettings(num_beams=num_beams, max_new_tokens=300, min_new_tokens=300)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_cancel_flag_stops_generate_early(tiny_loaded, num_beams):
    engine = Florence2Engine(tiny_loaded)
    car = lesson_images()[0]
    full = engine.run_batch([InferenceRequest(car, Task.OD, generation=_fixed_length(num_beams))])[0]
    assert full.result.generated_tokens >= 300

    cancel = threading.Event()
    steps = {"n": 0}

    def should_stop():
        steps["n"] += 1
        if steps["n"] == 5:
            cancel.set()
        return cancel.is_set()

    outcome = engine.run_batch([InferenceRequest(car, Task.OD, generation=_fixed_length(num_beams), should_stop=should_stop)])[0]
    assert outcome.cancelled and outcome.result is None
    assert engine.last_decoding_steps < 10  # stopped within a step of the flag, not after 300


def test_already_cancelled_request_never_runs(tiny_loaded):
    engine = Florence2Engine(tiny_loaded)
    outcome = engine.run_batch([InferenceRequest(lesson_images()[0], Task.OD, should_stop=lambda: True)])[0]
    assert outcome.cancelled and engine.generate_calls == 0


@pytest.mark.parametrize("value,message", [
    ({"num_beams": 0}, "num_beams"), ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"min_new_tokens": 50, "max_new_tokens": 10}, "min_new_tokens"),
])
def test_generation_settings_validated(value, message):
    with pytest.raises(ValueError, match=message):
        GenerationSettings(**value)


def test_reference_defaults():
    settings = GenerationSettings()
    assert settings.generate_kwargs() == {"num_beams": 3, "max_new_tokens": 1024, "do_sample": False}


def test_detect_task_is_refused_by_a_florence_worker(tiny_loaded):
    outcome = Florence2Engine(tiny_loaded).run_batch([InferenceRequest(lesson_images()[0], Task.DETECT)])[0]
    assert outcome.result is None and "YOLOv8" in outcome.error.message
    assert outcome.error.reason == "TASK_NOT_SUPPORTED"


def test_max_new_tokens_beyond_the_model_limit_fails_alone(tiny_loaded):
    engine = Florence2Engine(tiny_loaded)
    too_long = GenerationSettings(max_new_tokens=4000)
    outcomes = engine.run_batch([InferenceRequest(lesson_images()[0], Task.OD, generation=too_long),
                                 InferenceRequest(lesson_images()[0], Task.CAPTION,
                                                  generation=GenerationSettings(max_new_tokens=16))])
    assert "exceeds this model's limit" in outcomes[0].error.message and outcomes[1].result is not None
    assert outcomes[0].error.reason == "TOKEN_LIMIT" and outcomes[0].error.metadata == {"limit": "1088"}


def test_the_token_limit_is_the_decoder_positions(tiny_loaded):
    # N new tokens feed decoder positions 0..N-1: the tiny model's 1088 positions generate 1088 tokens.
    assert Florence2Engine(tiny_loaded).max_new_tokens_limit == tiny_loaded.model.config.text_config.max_position_embeddings


def test_text_over_the_token_budget_fails_alone_and_the_budget_leaves_room(tiny_loaded):
    engine = Florence2Engine(tiny_loaded)
    # The positions less the image tokens (5 for the tiny model's 64-px input) and the longest prompt.
    assert 1088 - 5 - 20 < engine.max_text_tokens < 1088 - 5
    long_text = "car " * (engine.max_text_tokens + 10)
    outcomes = engine.run_batch([
        InferenceRequest(lesson_images()[0], Task.CAPTION_TO_PHRASE_GROUNDING, text=long_text,
                         generation=GenerationSettings(num_beams=1, max_new_tokens=8)),
        InferenceRequest(lesson_images()[0], Task.CAPTION_TO_PHRASE_GROUNDING, text="car " * (engine.max_text_tokens // 2 - 2),
                         generation=GenerationSettings(num_beams=1, max_new_tokens=8))])
    assert outcomes[0].error.reason == "TOKEN_LIMIT" and outcomes[1].error is None, outcomes[1]
