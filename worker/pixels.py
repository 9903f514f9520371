"""Images to model pixels before a job reaches the model thread (issue #23).

The decode engine's model thread should hold the interpreter only to step. Decoding a job's image and
running the model's image processor on it (resize, rescale, normalise: several ms of mostly Python per
image) happen here instead, when the fetcher takes the job:

- `workers=0`: on the fetcher's own thread. The model thread no longer waits for it, but the two share the
  GIL, so the processor's Python work can still delay a step.
- `workers>0`: in that many spawned processes. The worker process receives the pixels and the image's
  size, and never holds the decoded image. The processes die with the worker; one that dies (killed for
  memory, say) is replaced and its images are retried one by one, so an image that takes it down again
  fails its own job alone. A worker that cannot start them prepares on the fetcher thread instead.

Either way a request carries `pixels` (its processor's output for its image), which the engine uses in place
of running the processor itself; the numbers are the processor's own, so the tokens are unchanged.
"""

from __future__ import annotations

import concurrent.futures
import logging
import multiprocessing
import os
import signal
import threading
from dataclasses import dataclass
from typing import Any

from florence2_serve.common.images import ImageError, decode_image

from .os_hooks import die_with_parent
from .pixel_maker import PixelMaker

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImageSize:
    """Stands in for the decoded image where only its size is read (prompts and results use its size)."""

    size: tuple[int, int]


@dataclass
class Prepared:
    image: Any  # the decoded PIL image, or its ImageSize when prepared in another process
    pixels: Any  # numpy array [3, H, W] from the model's image processor


class PreparationFailed(RuntimeError):
    """The image decoded, but could not be made into pixels: the processor raised, or (`died`) a preparation
    process died (killed for memory, or crashed) while preparing it, twice."""

    def __init__(self, message: str, died: bool = False):
        super().__init__(message)
        self.died = died


_maker: PixelMaker | None = None  # in a preparation process: the model's pixels


def _start(maker: PixelMaker, parent: int) -> None:
    """A preparation process's start: it dies with the worker (even a SIGKILLed one) and leaves Ctrl-C to it."""
    global _maker
    _maker = maker
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the worker drains on Ctrl-C and stops us itself
    if not die_with_parent(signal.SIGKILL, parent):
        os._exit(1)


def _started() -> bool:
    return _maker is not None


def _make(maker: PixelMaker, data: bytes):
    """(decoded image, pixels), or the ImageError or PreparationFailed that says why not."""
    try:
        image = decode_image(data)
    except ImageError as exc:
        return exc
    try:
        return image, maker(image)
    except Exception as exc:  # noqa: BLE001 - one image's failure fails its job only
        log.exception("the image processor failed on a %dx%d image", *image.size)
        return PreparationFailed(f"the image could not be made into the model's pixels ({type(exc).__name__})")


def _prepare_in_process(data: bytes):
    """Runs in a preparation process: (size, pixels), or why not (the decoded image stays here)."""
    made = _make(_maker, data)
    return made if isinstance(made, Exception) else (made[0].size, made[1])


def image_workers(settings, engine) -> int:
    """--image-workers, or by default one process on a CUDA device and none on CPU."""
    if settings.image_workers is not None:
        return settings.image_workers
    return 1 if getattr(engine.loaded.device, "type", "") == "cuda" else 0


class PixelPreparer:
    """Prepares a batch of images: in order, each a Prepared, or the ImageError or PreparationFailed that says
    why not. Thread-safe (the fetcher and the main thread's lost-job pickup both prepare)."""

    def __init__(self, processor, workers: int = 0):
        self.maker, self.workers = PixelMaker(processor), workers
        self.pool: concurrent.futures.ProcessPoolExecutor | None = None
        self._lock = threading.Lock()
        if workers:
            self._start_pool()

    def _start_pool(self) -> None:
        """A pool whose processes have all started (imports done, processor loaded), so the first jobs wait for
        none of that; if none can start, the fetcher thread prepares the images from then on."""
        pool = None
        try:
            pool = concurrent.futures.ProcessPoolExecutor(
                self.workers, mp_context=multiprocessing.get_context("spawn"), initializer=_start,
                initargs=(self.maker, os.getpid()))
            started = [pool.submit(_started) for _ in range(self.workers)]
            if not all(future.result() for future in started):
                raise RuntimeError("an image preparation process did not start")
        except Exception:  # noqa: BLE001 - slower without them, but the worker goes on serving
            log.exception("cannot start image preparation processes; images are prepared on the fetcher thread")
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)
            pool = None
        self.pool = pool

    def prepare(self, images: list[bytes], retry: bool = True) -> list[Prepared | ImageError | PreparationFailed]:
        pool = self.pool
        if pool is None:
            return [self._prepare_here(data) for data in images]
        results = self._prepare_in_pool(pool, images)
        broken = [i for i, result in enumerate(results) if isinstance(result, PreparationFailed) and result.died]
        if broken and retry:  # once more, one by one on a new pool: an image that brings it down again fails alone
            log.warning("an image preparation process died; starting a new one and retrying %d images",
                        len(broken))
            if self._restart(pool):
                for index in broken:
                    if self.pool is not None:  # never in this process: the image may take it down too
                        (results[index],) = self.prepare([images[index]], retry=False)
        elif broken:
            self._restart(pool)
        return results

    def _prepare_here(self, data: bytes) -> Prepared | ImageError | PreparationFailed:
        made = _make(self.maker, data)
        return made if isinstance(made, Exception) else Prepared(*made)

    def _prepare_in_pool(self, pool, images: list[bytes]) -> list[Prepared | ImageError | PreparationFailed]:
        try:
            futures = [pool.submit(_prepare_in_process, data) for data in images]
        except (concurrent.futures.process.BrokenProcessPool, RuntimeError):  # died since the last batch
            log.warning("an image preparation process had died; starting a new one")
            if not self._restart(pool):
                return [self._prepare_here(data) for data in images]
            pool = self.pool
            futures = [pool.submit(_prepare_in_process, data) for data in images]
        results: list[Prepared | ImageError | PreparationFailed] = []
        for future in futures:
            try:
                outcome = future.result()
            except concurrent.futures.process.BrokenProcessPool:
                results.append(PreparationFailed("the image preparation process died preparing this image",
                                                 died=True))
                continue
            if isinstance(outcome, Exception):
                results.append(outcome)
            else:
                size, pixels = outcome
                results.append(Prepared(ImageSize(tuple(size)), pixels))
        return results

    def _restart(self, broken) -> bool:
        """Replace the pool `broken` (unless another thread already has); whether there is a pool now."""
        with self._lock:
            if self.pool is broken and broken is not None:
                broken.shutdown(wait=False, cancel_futures=True)
                self._start_pool()
            return self.pool is not None

    def close(self) -> None:
        with self._lock:
            pool, self.pool = self.pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
