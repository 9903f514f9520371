"""Images become pixels before their jobs reach the model thread (worker/pixels.py), on the fetcher's thread or
in helper processes, with the processor's own numbers."""

from __future__ import annotations

import io
import os
import signal
import time

import pytest
import torch

from florence2_serve.common.generation import GenerationSettings
from florence2_serve.common.images import ImageError, decode_image
from florence2_serve.common.tasks import Task
from florence2_serve.worker.decoding.engine import DecodeEngine, DecodeOptions
from florence2_serve.worker.inference import InferenceRequest
from florence2_serve.worker.model_builder import lesson_images
from florence2_serve.worker.pixels import ImageSize, PixelPreparer, Prepared


def _jpeg(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _reference(processor, data: bytes) -> torch.Tensor:
    return processor([decode_image(data)], return_tensors="pt")["pixel_values"][0]


def _bomb() -> bytes:
    """A PNG whose header claims more pixels than the limit (the data never gets decoded)."""
    buffer = io.BytesIO()
    from PIL import Image

    Image.new("L", (8000, 8000)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_pixels_made_on_the_fetcher_thread_are_the_processors(tiny_loaded):
    processor = tiny_loaded.processor.image_processor
    data = _jpeg(lesson_images()[0])
    preparer = PixelPreparer(processor, workers=0)
    good, bad = preparer.prepare([data, b"not an image"])
    assert isinstance(good, Prepared) and good.image.size == (640, 480)
    assert torch.equal(torch.as_tensor(good.pixels), _reference(processor, data))
    assert isinstance(bad, ImageError) and "not a readable image" in str(bad)


def test_a_processor_failure_fails_that_image_alone(tiny_loaded):
    """An image the processor cannot take fails its own job (a clear reason); the others are made."""
    processor = tiny_loaded.processor.image_processor

    def picky(images, **kwargs):
        if images[0].size == (7, 7):
            raise ValueError("unsupported")
        return processor(images, **kwargs)

    from PIL import Image

    from florence2_serve.worker.pixels import PreparationFailed

    good, odd = PixelPreparer(picky, workers=0).prepare([_jpeg(lesson_images()[0]), _jpeg(Image.new("RGB", (7, 7)))])
    assert isinstance(good, Prepared)
    assert isinstance(odd, PreparationFailed) and not odd.died and "ValueError" in str(odd)


def test_a_worker_that_cannot_start_preparation_processes_prepares_on_its_fetcher_thread(tiny_loaded, monkeypatch,
                                                                                          caplog):
    import concurrent.futures

    def no_processes(*args, **kwargs):
        raise OSError(11, "Resource temporarily unavailable")

    monkeypatch.setattr(concurrent.futures, "ProcessPoolExecutor", no_processes)
    preparer = PixelPreparer(tiny_loaded.processor.image_processor, workers=2)
    assert preparer.pool is None and "cannot start image preparation processes" in caplog.text
    (made,) = preparer.prepare([_jpeg(lesson_images()[0])])
    assert isinstance(made, Prepared) and made.image.size == (640, 480)


def test_a_request_with_pixels_decodes_the_same_tokens(tiny_loaded):
    """The engine uses the pixels a request brings in place of running the processor: same tokens."""
    engine = DecodeEngine(tiny_loaded, DecodeOptions(rows=8))
    processor = engine.pixel_processor
    settings = GenerationSettings(num_beams=3, max_new_tokens=12)
    data = [_jpeg(image) for image in lesson_images()]
    plain = engine.run_batch([InferenceRequest(decode_image(d), Task.OD, generation=settings) for d in data])
    prepared = PixelPreparer(processor, workers=0).prepare(data)
    brought = engine.run_batch([InferenceRequest(ImageSize(p.image.size), Task.OD, generation=settings,
                                                 pixels=p.pixels) for p in prepared])
    assert [o.result.raw_text for o in brought] == [o.result.raw_text for o in plain]
    assert [(o.result.image_width, o.result.image_height) for o in brought] == [decode_image(d).size for d in data]


@pytest.mark.slow
def test_a_worker_with_preparation_processes_serves_and_leaves_none_behind_when_killed(
        valkey, front_end_factory, worker_factory, tiny_model_dir):
    """Jobs run with their pixels made in the worker's helper processes, and a worker SIGKILLed (no chance
    to stop its pool) leaves no helper process behind."""
    from florence2_serve.client import NO_RETRY, Florence2Client

    front = front_end_factory(valkey.connection_url)
    worker = worker_factory(valkey.connection_url, f"tiny={tiny_model_dir}", "--image-workers", "2",
                            "--no-canary", worker_id="pixels-w")
    with Florence2Client(f"127.0.0.1:{front.port}", timeout=60, retry=NO_RETRY) as client:
        car = lesson_images()[0]
        result = client.detect(_jpeg(car), "tiny", "CAPTION", max_new_tokens=4)
        assert (result.image_width, result.image_height) == car.size and result.worker_id == "pixels-w"
    children = _children(worker.process.pid)  # the two, and multiprocessing's resource tracker
    assert sum("spawn_main" in _command(pid) for pid in children) == 2, [_command(pid) for pid in children]
    worker.process.send_signal(signal.SIGKILL)
    worker.process.wait(10)
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in children) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(pid) for pid in children)


class _KillsItsProcessOnTinyImages:
    """An image processor that takes its preparation process down on a 5x5 image (picklable: it is sent there)."""

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, images, **kwargs):
        if images[0].size == (5, 5):
            os._exit(1)
        return self.processor(images, **kwargs)


@pytest.mark.slow
def test_preparation_processes_give_the_processors_pixels_and_are_replaced_when_they_die(tiny_loaded):
    from PIL import Image

    from florence2_serve.worker.pixels import PreparationFailed

    processor = tiny_loaded.processor.image_processor
    images = [_jpeg(image) for image in lesson_images()]
    preparer = PixelPreparer(_KillsItsProcessOnTinyImages(processor), workers=1)
    try:
        results = preparer.prepare([*images, b"\x89PNG broken", _bomb()])
        for data, result in zip(images, results):
            assert isinstance(result, Prepared) and isinstance(result.image, ImageSize)
            assert result.image.size == decode_image(data).size
            assert torch.equal(torch.as_tensor(result.pixels), _reference(processor, data))
        unreadable, too_large = results[len(images):]
        assert isinstance(unreadable, ImageError) and not unreadable.too_large
        assert isinstance(too_large, ImageError) and too_large.too_large  # the reason crosses the process

        (process,) = preparer.pool._processes.values()
        os.kill(process.pid, signal.SIGKILL)  # killed for memory, say, while idle
        process.join(10)
        (again,) = preparer.prepare(images[:1])
        assert isinstance(again, Prepared)
        (replacement,) = preparer.pool._processes.values()
        assert replacement.pid != process.pid

        # An image that takes its process down while others wait behind it: it fails alone.
        first, killer, last = preparer.prepare([images[0], _jpeg(Image.new("RGB", (5, 5))), images[0]])
        assert isinstance(first, Prepared) and isinstance(last, Prepared)
        assert isinstance(killer, PreparationFailed) and killer.died
        (after,) = preparer.prepare(images[:1])  # a new process serves the next jobs
        assert isinstance(after, Prepared)
    finally:
        preparer.close()


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = open(f"/proc/{entry}/stat").read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
    return found


def _command(pid: int) -> str:
    try:
        return open(f"/proc/{pid}/cmdline").read().replace("\0", " ")
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"
