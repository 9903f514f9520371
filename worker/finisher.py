"""The finisher thread of a batching worker: writes what the model did to Redis, in order.

STARTED when a batch begins, then each job's end (events and rq's bookkeeping in one atomic step),
and requeues. Whatever is waiting goes out in one call (rq_bridge PROGRESS). A Redis outage only
delays it: every write is retried until Redis is back, and nothing is lost.
"""

from __future__ import annotations

import logging
import queue
import time

from florence2_serve.common import redis_layout as layout
from florence2_serve.common import rq_bridge
from florence2_serve.common.log_setup import record_fields
from florence2_serve.common.rq_bridge import Finished, TakenJob

from .outcomes import Batch, Requeue, batch_endings
from .presence import REDIS_ERRORS, OutageLog, name_os_thread
from .reporting import report_ended

log = logging.getLogger(__name__)


class FinishingLoop:
    """Mixed into BatchWorker: `_finish_loop` runs on the finisher thread."""

    def _finish_loop(self) -> None:
        name_os_thread("f2s-finisher")
        while True:
            if self._finish_next(self._finishing.get()):
                return

    def _finish_next(self, item) -> bool:
        """Write `item` and everything already waiting behind it in one round trip; True at the stop
        marker. A method of its own so that nothing of the batches stays referenced while the finisher
        waits for the next (an idle worker keeps no image or result alive)."""
        items = [item]
        while True:
            try:
                items.append(self._finishing.get_nowait())
            except queue.Empty:
                break
        ended: list[Finished] = []
        requeue: list[TakenJob] = []
        worked = 0.0
        for entry in items:
            if isinstance(entry, Batch):
                worked += batch_endings(entry, self.settings.worker_id, self._now.is_set(), ended, requeue)
            elif isinstance(entry, Requeue):
                requeue.extend(entry.jobs)
            elif entry:
                ended.extend(entry)
        self._write(ended, requeue, worked)
        return None in items

    def _write(self, ended: list[Finished], requeue: list[TakenJob], worked: float) -> None:
        settings = self.settings
        if ended:
            calls = self.engine.generate_calls - self._generate_calls_written
            # PROGRESS registers the worker as idle only if it then holds no job (none running, none ready).
            idle_registration = ((layout.idle_key(settings.model_name), settings.idle_registration_s)
                                 if self._accepting else ("", 0))
            self._retry_until_done("progress", lambda: rq_bridge.progress(
                self.connection, ended, ttl=settings.result_ttl_s, worker_name=settings.worker_id,
                worker_id=settings.worker_id, worked_s=worked, counters=(layout.worker_key(settings.worker_id), calls),
                idle=idle_registration))
            self._generate_calls_written += calls
            report_ended(self.settings.model_name, ended)
        if requeue:
            self._retry_until_done("requeue", lambda: rq_bridge.requeue(
                self.connection, requeue, model=settings.model_name, ttl=settings.result_ttl_s,
                worker_name=settings.worker_id))
            for job in requeue:
                log.info("job %s not finished here: back at the front of its queue", job.job_id,
                         extra=record_fields(job.record))
        with self._lock:
            for item in ended:
                if item.outcome != "started":
                    self._held.pop(item.job.job_id, None)
            for job in requeue:
                self._held.pop(job.job_id, None)

    def _retry_until_done(self, what: str, write):
        """Run a Redis write until it succeeds: a worker keeps its results through any outage."""
        outage = OutageLog(what)
        delay = 0.1
        while True:
            try:
                value = write()
                outage.ok()
                return value
            except REDIS_ERRORS as exc:
                outage.failed(exc)
                if self._now.is_set() and outage.since is not None and time.monotonic() - outage.since > 5:
                    log.error("%s: giving up on Redis to stop now; rq's maintenance re-runs the held jobs", what)
                    return set()
                time.sleep(delay)
                delay = min(delay * 2, 2.0)
