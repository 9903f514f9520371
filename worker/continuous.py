"""The model thread of a worker whose engine batches at the iteration level (worker/decoding/).

Instead of taking a batch from `ready`, running it to the end and taking the next, the engine asks for
jobs whenever it has free decoding rows (at every step), and hands back each job's outcome the moment
that job ends. Meanwhile the fetcher keeps `ready` filled, so a job that arrives while others decode
joins them at the next step.
"""

from __future__ import annotations

import threading

from . import metrics
from .inference import InferenceOutcome, InferenceRequest
from .outcomes import Batch, Held
from .presence import name_os_thread


class ContinuousModelLoop:
    """Mixed into BatchWorker: `_continuous_loop` replaces `_model_loop` for continuous engines."""

    def _continuous_loop(self) -> None:
        name_os_thread("f2s-model")
        model_name = self.settings.model_name
        running = metrics.RUNNING_JOBS.labels(model_name)
        held_of: dict[int, Held] = {}
        lock = threading.Lock()

        def pull(free_rows: int, block: bool) -> list[InferenceRequest] | None:
            with lock:
                room = self.settings.batch_size - len(held_of)  # --batch-size: most jobs decoding at once
            with self._ready_changed:
                while block and not self._ready and not self._fetch_done.is_set():
                    self._ready_changed.wait()
                if block and not self._ready:
                    return None  # the fetcher has stopped and nothing is left
                joining: list[Held] = []
                while room > 0 and self._ready and self._ready[0].request.generation.num_beams <= free_rows:
                    room -= 1
                    held = self._ready.popleft()
                    free_rows -= held.request.generation.num_beams
                    held.running = True
                    joining.append(held)
                if joining:
                    self._ready_changed.notify_all()
            runnable = self._start(joining) if joining else []
            with lock:
                for held in runnable:
                    held_of[id(held.request)] = held
                active = len(held_of)
            self._busy = active > 0
            running.set(active)
            if runnable:
                self._last_batch_size = active
                metrics.BATCH_SIZE.labels(model_name).observe(len(runnable))
            return [held.request for held in runnable]

        def done(outcome: InferenceOutcome) -> None:
            with lock:
                held = held_of.pop(id(outcome.request))
                active = len(held_of)
            self._finishing.put(Batch([held], [outcome]))
            running.set(active)
            self._busy = active > 0

        self.engine.serve(pull, done)
        self._busy = False
