"""The decode engine: the same tokens as transformers' generate, with requests joining and leaving
the decoding batch at any step, compiled or not, and one vision encoding per image."""

from __future__ import annotations

import pytest
import torch

from florence2_serve.common.generation import GenerationSettings
from florence2_serve.common.tasks import Task
from florence2_serve.worker.decoding.engine import DecodeEngine, DecodeOptions
from florence2_serve.worker.decoding.logits import banned_ngrams
from florence2_serve.worker.engine import Florence2Engine
from florence2_serve.worker.inference import InferenceRequest
from florence2_serve.worker.loader import LoadOptions, load_model
from florence2_serve.worker.model_builder import lesson_images

TASKS = [Task.OD, Task.CAPTION, Task.OCR, Task.OCR_WITH_REGION]


def _requests(settings_list, tasks=TASKS):
    images = lesson_images()
    return [InferenceRequest(image, task, generation=settings)
            for settings in settings_list for image in images for task in tasks]


def _texts(outcomes):
    assert all(o.error is None and not o.cancelled for o in outcomes), [o.error for o in outcomes]
    return [(o.result.raw_text, o.result.generated_tokens) for o in outcomes]


def _copy(requests):
    return [InferenceRequest(r.image, r.task, r.text, r.region, r.generation, image_key=r.image_key)
            for r in requests]


@pytest.fixture(scope="module")
def engines(tiny_loaded):
    return Florence2Engine(tiny_loaded), DecodeEngine(tiny_loaded, DecodeOptions(rows=24))


@pytest.fixture(scope="module")
def microsoft_engines(remote_code_dir, tmp_path_factory):
    """The converted Microsoft-format fixture: no_repeat_ngram_size 3, forced EOS, early stopping."""
    loaded = load_model(str(remote_code_dir), LoadOptions(device="cpu",
                                                          convert_cache=str(tmp_path_factory.mktemp("cache"))))
    return Florence2Engine(loaded), DecodeEngine(loaded, DecodeOptions(rows=24))


SETTINGS = [GenerationSettings(num_beams=1, max_new_tokens=40), GenerationSettings(num_beams=3, max_new_tokens=40)]


@pytest.mark.parametrize("which", ["engines", "microsoft_engines"])
@pytest.mark.parametrize("settings", SETTINGS, ids=["greedy", "beams3"])
def test_same_tokens_as_generate_one_at_a_time_and_in_batches_of_8(which, settings, request):
    plain, fast = request.getfixturevalue(which)
    requests = _requests([settings])
    alone = [_texts(plain.run_batch([r]))[0] for r in _copy(requests)]
    assert [_texts(fast.run_batch([r]))[0] for r in _copy(requests)] == alone
    batched = _texts(plain.run_batch(_copy(requests[:8])))
    assert _texts(fast.run_batch(_copy(requests[:8]))) == batched == alone[:8]
    assert len(set(alone)) > 3  # input-dependent outputs, not one constant sequence


@pytest.mark.parametrize("settings", [
    GenerationSettings(num_beams=1, max_new_tokens=24, repetition_penalty=1.7),
    GenerationSettings(num_beams=3, max_new_tokens=24, repetition_penalty=0.6),
    GenerationSettings(num_beams=2, max_new_tokens=30, min_new_tokens=30),
    GenerationSettings(num_beams=1, max_new_tokens=3),
], ids=["greedy-penalty", "beams-penalty", "min-new-tokens", "short"])
def test_same_tokens_with_every_generation_option(microsoft_engines, settings):
    plain, fast = microsoft_engines
    requests = _requests([settings], tasks=[Task.OD, Task.CAPTION])
    assert _texts(fast.run_batch(_copy(requests))) == _texts(plain.run_batch(_copy(requests)))


def test_requests_join_and_leave_mid_decoding_with_unchanged_outputs(engines):
    """Mixed lengths and searches arrive one every two steps; each ends with its own output the moment it
    is done, while the others keep decoding."""
    plain, fast = engines
    mixed = [GenerationSettings(num_beams=1, max_new_tokens=6), GenerationSettings(num_beams=3, max_new_tokens=40),
             GenerationSettings(num_beams=1, max_new_tokens=40), GenerationSettings(num_beams=2, max_new_tokens=10)]
    requests = _requests(mixed, tasks=[Task.OD, Task.CAPTION])
    expected = {id(r): _texts(plain.run_batch([c]))[0] for r, c in zip(requests, _copy(requests))}
    waiting = list(requests)
    ended, calls = [], {"n": 0}

    def pull(free_rows, block):
        calls["n"] += 1
        if waiting and calls["n"] % 2 == 0 and waiting[0].generation.num_beams <= free_rows:
            return [waiting.pop(0)]
        return [] if waiting or fast.active else None

    fast.serve(pull, lambda outcome: ended.append((outcome, len(fast.active))))
    assert len(ended) == len(requests)
    for outcome, _ in ended:
        assert _texts([outcome])[0] == expected[id(outcome.request)]
    # Short requests finished while longer ones were still decoding.
    assert any(still_active > 0 and outcome.request.generation.max_new_tokens == 6 for outcome, still_active in ended)


def test_beam_requests_of_several_widths_and_lengths_search_together_with_unchanged_outputs(engines):
    """Beam searches of one width step as one group: members of different lengths join while others
    decode, leave when done, and each gets the tokens it gets alone."""
    plain, fast = engines
    mixed = [GenerationSettings(num_beams=3, max_new_tokens=40), GenerationSettings(num_beams=3, max_new_tokens=12),
             GenerationSettings(num_beams=2, max_new_tokens=25), GenerationSettings(num_beams=4, max_new_tokens=8),
             GenerationSettings(num_beams=3, max_new_tokens=30, repetition_penalty=1.3)]
    requests = _requests(mixed, tasks=[Task.OD, Task.CAPTION])
    expected = {id(r): _texts(plain.run_batch([c]))[0] for r, c in zip(requests, _copy(requests))}
    waiting = list(requests)
    ended, widest = [], {"members": 0}

    def pull(free_rows, block):
        widest["members"] = max([widest["members"], *(len(g.members) for g in fast.beam_groups.values())])
        if waiting and waiting[0].generation.num_beams <= free_rows:
            return [waiting.pop(0)]
        return [] if waiting or fast.active else None

    fast.serve(pull, ended.append)
    assert len(ended) == len(requests)
    for outcome in ended:
        assert _texts([outcome])[0] == expected[id(outcome.request)]
    assert widest["members"] >= 3  # several requests really did share a group's step
    assert all(not group.members for group in fast.beam_groups.values())


def test_a_cancelled_request_leaves_at_once_and_frees_its_rows(engines):
    _, fast = engines
    flag = {"stop": False}
    settings = GenerationSettings(num_beams=3, max_new_tokens=60, min_new_tokens=60)
    stopped = InferenceRequest(lesson_images()[0], Task.OD, generation=settings, should_stop=lambda: flag["stop"])
    other = InferenceRequest(lesson_images()[1], Task.CAPTION, generation=GenerationSettings(num_beams=1, max_new_tokens=20))
    steps = {"n": 0}
    original = fast._step

    def counting_step(done):
        steps["n"] += 1
        if steps["n"] == 5:
            flag["stop"] = True
        original(done)

    fast._step = counting_step
    try:
        first, second = fast.run_batch([stopped, other])
    finally:
        del fast._step
    assert first.cancelled and second.result is not None and len(fast.free) == fast.decoder.rows


def test_tasks_on_one_image_share_one_vision_encoding(engines):
    _, fast = engines
    image = lesson_images()[0]
    before = fast.image_encodings
    requests = [InferenceRequest(image, task, generation=GenerationSettings(num_beams=1, max_new_tokens=8),
                                 image_key="digest-of-the-car") for task in (Task.OD, Task.CAPTION, Task.OCR)]
    outcomes = fast.run_batch(requests)
    assert all(o.result is not None for o in outcomes)
    assert fast.image_encodings - before == 1
    fast.run_batch(_copy(requests[:1]))  # the same image again, later: still cached
    assert fast.image_encodings - before == 1


@pytest.mark.parametrize("which", ["engines", "microsoft_engines"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_prompts_are_tokenized_once_and_padded_as_the_tokenizer_pads_a_batch(which, side, request, monkeypatch):
    """The model thread tokenizes a prompt only the first time, and without the image tokens; the batch it
    builds is the tokenizer's own on the whole text, whichever side it pads."""
    _, fast = request.getfixturevalue(which)
    processor = fast.loaded.processor
    tokenizer = processor.tokenizer
    monkeypatch.setattr(tokenizer, "padding_side", side)
    monkeypatch.setattr(fast, "prompt_tokens", type(fast.prompt_tokens)())
    prompts = ["What does the image describe?", "Locate the phrases in the caption: a red car parked by a tall "
               "building", "What does the image describe?", "OCR", " leading space, <loc_12> and  doubled  spaces "]
    texts = [processor.image_token * fast.image_tokens + tokenizer.bos_token + p + tokenizer.eos_token
             for p in prompts]
    expected = tokenizer(texts, add_special_tokens=False, return_tensors="pt", padding=True)
    before = fast.prompts_tokenized
    input_ids, mask, ends = fast._tokens(prompts)
    assert torch.equal(input_ids, expected["input_ids"]) and torch.equal(mask, expected["attention_mask"])
    assert ends == [int(row.nonzero().max()) + 1 for row in expected["attention_mask"]]
    assert fast.prompts_tokenized - before == 4
    again_ids, _, _ = fast._tokens(prompts[::-1])
    assert torch.equal(again_ids, expected["input_ids"].flip(0)) and fast.prompts_tokenized - before == 4


def test_no_repeat_ngrams_match_transformers():
    from transformers.generation.logits_process import NoRepeatNGramLogitsProcessor

    generator = torch.Generator().manual_seed(3)
    vocab, total = 7, 24
    sequences = torch.randint(0, 4, (6, total), generator=generator)
    lengths = torch.tensor([1, 2, 3, 9, 17, 24])
    for n in (2, 3, 4):
        mine = banned_ngrams(sequences, lengths, n, vocab)
        for row, length in enumerate(lengths.tolist()):
            scores = torch.zeros(1, vocab)
            theirs = NoRepeatNGramLogitsProcessor(n)(sequences[row:row + 1, :length], scores)
            assert torch.equal(mine[row], theirs[0].isinf()), (n, row)


def test_no_repeat_ngrams_over_the_live_columns_ignore_rows_longer_than_them():
    """The step passes only the live columns (through the longest active row); a free row below an active
    one still holds its last request's longer length. Its bans are never read, but must not fail the step."""
    generator = torch.Generator().manual_seed(5)
    sequences = torch.randint(0, 4, (3, 40), generator=generator)
    live = 9
    lengths = torch.tensor([37, 9, 4])  # row 0: free, its last request ran to 37 tokens
    full = banned_ngrams(sequences, torch.tensor([37, 9, 4]), 3, 7)
    cut = banned_ngrams(sequences[:, :live], lengths, 3, 7)
    assert torch.equal(cut[1:], full[1:])


@pytest.mark.slow
def test_compiled_decoding_gives_the_same_tokens(tiny_loaded):
    """torch.compile'd step (static shapes; CUDA graphs on a GPU): greedy and beams 3, batch 1 and 8."""
    plain = Florence2Engine(tiny_loaded)
    fast = DecodeEngine(tiny_loaded, DecodeOptions(rows=24, compile=True))
    fast.warm_up((1,))
    for settings in SETTINGS:
        requests = _requests([settings])
        assert _texts(fast.run_batch(_copy(requests[:1]))) == _texts(plain.run_batch(_copy(requests[:1])))
        assert _texts(fast.run_batch(_copy(requests[:8]))) == _texts(plain.run_batch(_copy(requests[:8])))


# -- several tasks on one image through the service ----------------------------------------------------

def test_several_tasks_on_one_image_one_submit_one_encoding(service):
    """JobSpec.more_tasks: one Submit, a job per task, each result equal to the task run alone (the one
    encoding per image is counted in test_tasks_on_one_image_share_one_vision_encoding)."""
    from florence2_serve.client.core import job_spec

    client = service.client
    tasks = [Task.OD, Task.CAPTION, (Task.CAPTION_TO_PHRASE_GROUNDING, "a red car")]
    together = client.detect_tasks(service.car_jpeg, "tiny", tasks, num_beams=3)
    alone = [client.detect(service.car_jpeg, "tiny", Task.OD), client.detect(service.car_jpeg, "tiny", Task.CAPTION),
             client.detect(service.car_jpeg, "tiny", Task.CAPTION_TO_PHRASE_GROUNDING, text="a red car")]
    assert [r.raw_text for r in together] == [r.raw_text for r in alone]
    assert together[0].boxes and together[1].text
    spec = job_spec(service.car_jpeg, "tiny", Task.OD, request_id="three-tasks", more_tasks=[Task.CAPTION, Task.OCR])
    first = client.submit(spec)
    again = client.submit(spec)  # AIP-155: the same jobs
    assert len(first.more_job_ids) == 2 and (again.job_id, list(again.more_job_ids)) == (
        first.job_id, list(first.more_job_ids))
    assert client.get_job(request_id="three-tasks.t2").job_id == first.more_job_ids[1]


def test_a_bad_further_task_is_refused_before_any_job_exists(service):
    import grpc

    from florence2_serve.client.core import job_spec
    from florence2_serve.client.errors import RpcError

    client = service.client
    spec = job_spec(service.car_jpeg, "tiny", Task.OD, request_id="bad-more",
                    more_tasks=[Task.CAPTION, (Task.REGION_TO_DESCRIPTION, "", None)])
    with pytest.raises(RpcError) as error:
        client.submit(spec)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.value.violations and error.value.violations[0][0].startswith("job.more_tasks[1].")
    with pytest.raises(RpcError) as missing:
        client.get_job(request_id="bad-more")
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(RpcError) as run:
        list(client.run(job_spec(service.car_jpeg, "tiny", Task.OD, more_tasks=[Task.CAPTION])))
    assert run.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_asyncio_client_runs_several_tasks_on_one_image(service):
    import asyncio

    from florence2_serve.client import AsyncFlorence2Client

    async def run():
        async with AsyncFlorence2Client(service.address, timeout=120) as client:
            return await client.detect_tasks(service.car_jpeg, "tiny", ["OD", "CAPTION"])

    od, caption = asyncio.run(run())
    assert od.boxes and caption.text and od.raw_text != caption.raw_text


@pytest.mark.slow
def test_a_compiling_worker_warms_up_before_it_registers(valkey, worker_factory, tiny_model_dir):
    """--compile: the step is compiled and run for the worker's batch sizes before it registers, so no
    job pays for the compilation."""
    worker = worker_factory(valkey.connection_url, f"tiny={tiny_model_dir}", "--compile", "--batch-size", "2",
                            worker_id="compiling-w")
    log = worker.log_path.read_text()
    warmed = log.index("decode step compiled and warmed up")
    assert warmed < log.index("serving model tiny") and "DecodeEngine engine" in log


def test_a_failing_step_fails_its_jobs_and_the_engine_goes_on(engines):
    _, fast = engines
    settings = GenerationSettings(num_beams=1, max_new_tokens=8)
    original = fast.step_fn

    def broken(*args, **kwargs):
        fast.step_fn = original
        raise RuntimeError("CUDA out of memory (simulated)")

    fast.step_fn = broken
    first = fast.run_batch([InferenceRequest(lesson_images()[0], Task.OD, generation=settings)])[0]
    assert first.error.reason == "INFERENCE_FAILED" and not fast.active and len(fast.free) == fast.decoder.rows
    again = fast.run_batch([InferenceRequest(lesson_images()[0], Task.OD, generation=settings)])[0]
    assert again.error is None and again.result.generated_tokens > 0


def test_a_failed_compilation_falls_back_to_the_eager_step(tiny_loaded):
    fast = DecodeEngine(tiny_loaded, DecodeOptions(rows=8, compile=True))

    def broken(*args, **kwargs):
        raise RuntimeError("inductor: C++ compile error (simulated)")

    fast.step_fn = broken
    with pytest.raises(RuntimeError, match="warm-up batch failed"):
        fast.warm_up((1,))
    fast.use_eager()
    outcome = fast.run_batch([InferenceRequest(lesson_images()[0], Task.OD,
                                               generation=GenerationSettings(num_beams=1, max_new_tokens=8))])[0]
    assert outcome.error is None and outcome.result.generated_tokens > 0


def test_decode_steps_are_counted_once_per_step_and_exported(engines):
    """Two requests decoding side by side share their steps: 12 forced tokens take 12 steps, not 24; the
    worker exports the engine's count as florence2_decode_steps_total."""
    from prometheus_client import CollectorRegistry, generate_latest

    from florence2_serve.worker.metrics import DecodeSteps

    _, fast = engines
    settings = GenerationSettings(num_beams=1, max_new_tokens=12, min_new_tokens=12)
    before = fast.steps_run
    outcomes = fast.run_batch([InferenceRequest(image, Task.OD, generation=settings) for image in lesson_images()[:2]])
    assert [o.result.generated_tokens for o in outcomes] == [12, 12]
    assert fast.steps_run - before == 12
    registry, steps = CollectorRegistry(), DecodeSteps()
    registry.register(steps)
    steps.engines["tiny"] = fast
    assert f'florence2_decode_steps_total{{model="tiny"}} {float(fast.steps_run)}' in generate_latest(registry).decode()
