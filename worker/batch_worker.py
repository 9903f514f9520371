"""The batching worker: keeps the model busy while jobs are fetched, decoded and finished beside it.

Three threads share the work of one model:

  fetcher   takes up to batch_size jobs in one atomic step (rq_bridge TAKE: popped from the model's
            priority queues and registered in rq's StartedJobRegistry together), decodes their images
            and puts them in `ready`. While the model runs a batch it fills the next one; under load
            it takes at most once per batch window (batch_wait_ms), so each take gathers everything
            that arrived meanwhile. With nothing to take it blocks on the model's wake list, which
            every enqueue rings.
  model     runs `ready` through the engine, batch after batch. A job cancelled or past its
            deadline before its batch starts is never run.
  finisher  writes what the model did, in order (worker/finisher.py).

Bookkeeping costs a constant number of Redis round trips per batch (take, started, ended; the last
two usually share one call).

Every job this worker takes is either finished by it or put back at the front of its queue:
`stop()` (first SIGTERM) stops taking and drains what is held; `stop(now=True)` (a second
signal) interrupts generation at the next step and requeues every unfinished job. If the process
dies instead, its Redis connections close and its jobs stop heartbeating in rq's StartedJobRegistry:
another worker's maintenance finds them lost (worker/lost_jobs.py), re-runs them (rq's retries) or
fails them, and takes them next itself.
"""

from __future__ import annotations

import collections
import itertools
import logging
import queue
import threading
import time
import uuid

import redis
from rq import Queue, SimpleWorker
from rq.serializers import JSONSerializer

from florence2_serve.common import redis_layout as layout
from florence2_serve.common import rq_bridge
from florence2_serve.common.log_setup import record_fields
from florence2_serve.common.images import release_image_memory
from florence2_serve.common.redis_layout import JobState
from florence2_serve.common.rq_bridge import Finished, TakenJob

from . import metrics
from .continuous import ContinuousModelLoop
from .finisher import FinishingLoop
from .inference import Engine, InferenceOutcome, check_batch
from .jobs import requeued_after_loss as lost_jobs_requeued
from .job_request import prepare_request
from .pixels import PixelPreparer, PreparationFailed, image_workers
from .outcomes import CANCELLED_BEFORE_RUN, EXPIRED_BEFORE_RUN, INFERENCE_FAILED, Batch, Held, Requeue
from .presence import REDIS_ERRORS, OutageLog, Presence, name_os_thread
from .reporting import report_closed
from .settings import WorkerSettings

log = logging.getLogger(__name__)

# How soon a fetcher that left queued jobs to idle workers looks again.
DEFERRED_LOOK_AGAIN_S = 0.02


class BatchWorker(ContinuousModelLoop, FinishingLoop):
    def __init__(self, connection: redis.Redis, settings: WorkerSettings, engine: Engine, description: dict):
        self.connection = connection
        self.settings = settings
        self.engine = engine
        self.queues = [Queue(name, connection=connection, serializer=JSONSerializer)
                       for name in layout.queue_names(settings.model_name)]
        self.rq_worker = SimpleWorker(
            self.queues, name=settings.worker_id, connection=connection, serializer=JSONSerializer,
            worker_ttl=settings.rq_worker_ttl_s, maintenance_interval=max(1, int(settings.maintenance_interval_s)))
        self.presence = Presence(connection, settings, description, self.rq_worker, held_jobs=self._held_jobs,
                                 on_cancel=self._cancelled, state=lambda: "busy" if self._busy else "idle")
        self._lock = threading.Lock()
        self._ready_changed = threading.Condition(self._lock)
        self._held: dict[str, Held] = {}
        self._ready: collections.deque[Held] = collections.deque()
        self._accepting = True
        self._now = threading.Event()  # stop now: interrupt generation, requeue
        self._fetch_done = threading.Event()
        self._finishing: queue.Queue = queue.Queue()
        self._busy = False
        self._last_batch_size = 1
        self._worked_since_idle = False
        self._generate_calls_written = 0
        self._executions = itertools.count(1)
        self._execution_prefix = uuid.uuid4().hex[:12]
        # Engines that take pixels get them made when their job is taken, never on the model thread.
        processor = getattr(engine, "pixel_processor", None)
        self.pixels = PixelPreparer(processor, image_workers(settings, engine)) if processor is not None else None

    # -- public -----------------------------------------------------------------------------------

    def register(self) -> None:
        self.presence.register()

    def work(self, burst: bool = False) -> None:
        """Run until stop() (or, with burst, until the queues are empty); the caller registered first.

        Call it on the main thread: it runs rq's maintenance there (and the process's signal
        handlers run there promptly, whatever the model is doing on its own thread).
        """
        threads = [threading.Thread(target=self._fetch_loop, args=(burst,), name="florence2-fetcher", daemon=True),
                   threading.Thread(target=self._continuous_loop if getattr(self.engine, "continuous", False)
                                    else self._model_loop, name="florence2-model", daemon=True),
                   threading.Thread(target=self._finish_loop, name="florence2-finisher", daemon=True)]
        self.presence.start()
        for thread in threads:
            thread.start()
        on_main = threading.current_thread() is threading.main_thread()
        try:
            next_maintenance = time.monotonic() + self.settings.maintenance_interval_s
            while threads[1].is_alive():
                threads[1].join(timeout=min(0.2, max(0.0, next_maintenance - time.monotonic())))
                if on_main and time.monotonic() >= next_maintenance:
                    self.presence.maintain()
                    self._take_lost_jobs()
                    next_maintenance = time.monotonic() + self.settings.maintenance_interval_s
        finally:
            self.stop()
            threads[1].join()
            threads[0].join()
            self._finishing.put(None)
            threads[2].join()
            self.presence.stop()
            self.presence.unregister()
            if self.pixels is not None:
                self.pixels.close()

    def stop(self, now: bool = False) -> None:
        """Stop taking jobs: the running batch finishes, jobs not started yet go back to the front of
        their queues. With now=True the running batch stops at its next step and is requeued too."""
        with self._lock:
            self._accepting = False
            if now:
                self._now.set()
            waiting = [held.job for held in self._ready]
            self._ready.clear()
            self._ready_changed.notify_all()
        if waiting:
            self._finishing.put(Requeue(waiting))

    @property
    def stopping(self) -> bool:
        return not self._accepting

    # -- fetcher ----------------------------------------------------------------------------------

    def _fetch_loop(self, burst: bool) -> None:
        name_os_thread("f2s-fetcher")
        outage = OutageLog("fetch")
        settings = self.settings
        pace_s = settings.batch_wait_ms / 1000
        last_take = 0.0
        try:
            while True:
                with self._ready_changed:
                    while self._accepting and len(self._ready) >= settings.batch_size:
                        self._ready_changed.wait(1.0)
                    if not self._accepting:
                        return
                    capacity = settings.batch_size - len(self._ready)
                    idle = not self._ready and not self._busy
                # Under load, one take per batch window gathers what arrived meanwhile in one round trip;
                # an idle worker with a lone client takes at once.
                if not idle or self._last_batch_size > 1:
                    wait = last_take + pace_s - time.monotonic()
                    if wait > 0:
                        time.sleep(wait)
                last_take = time.monotonic()
                closed: list[rq_bridge.ClosedJob] = []
                try:
                    taken = rq_bridge.take(
                        self.connection, settings.model_name, worker_name=settings.worker_id,
                        worker_id=settings.worker_id, max_jobs=capacity, heartbeat_ttl=settings.job_heartbeat_ttl_s,
                        result_ttl=settings.result_ttl_s, execution_prefix=self._next_execution_prefix(),
                        closed=closed, mode="idle" if idle else "busy", idle_ttl=settings.idle_registration_s,
                        leave_per_idle=settings.batch_size)
                    outage.ok()
                    report_closed(settings.model_name, closed)
                except REDIS_ERRORS as exc:
                    outage.failed(exc)
                    time.sleep(0.5)
                    continue
                if taken:
                    self._admit(taken)
                    if len(taken) == capacity:
                        continue  # there may be more: take again as soon as there is room
                if burst and not taken and not taken.deferred:
                    return
                deferred = taken.deferred
                taken = closed = None  # the images are the model's now: not kept alive by an idle fetcher
                if deferred:
                    # Other workers idle: the queued jobs are theirs. Look again shortly (or once our
                    # model is free) rather than block on the wake list, whose token they need.
                    with self._ready_changed:
                        self._ready_changed.wait(DEFERRED_LOOK_AGAIN_S)
                    continue
                if not burst:
                    self._wait_for_work()
        finally:
            with self._ready_changed:
                self._fetch_done.set()
                self._ready_changed.notify_all()
            self._leave_idle()

    def _leave_idle(self) -> None:
        """A worker that takes no more jobs is not idle for the others to wait on."""
        try:
            self.connection.zrem(layout.idle_key(self.settings.model_name), self.settings.worker_id)
        except REDIS_ERRORS:
            pass  # the registration lapses by itself

    def _take_lost_jobs(self) -> None:
        """Jobs our maintenance just put back at the front of their queues (their worker was lost) are
        taken now, over the batch limit if need be, and run next: ahead of the jobs this worker had
        already taken, which are newer than them. As many jobs are taken from the front of the queues
        as were put back: if another worker took some of them first, the next queued jobs come instead,
        the oldest ones waiting."""
        count = len(lost_jobs_requeued)
        if not count:
            return
        for _ in range(count):
            lost_jobs_requeued.popleft()
        if not self._accepting:
            return
        settings = self.settings
        try:
            taken = rq_bridge.take(
                self.connection, settings.model_name, worker_name=settings.worker_id, worker_id=settings.worker_id,
                max_jobs=count, heartbeat_ttl=settings.job_heartbeat_ttl_s, result_ttl=settings.result_ttl_s,
                execution_prefix=self._next_execution_prefix())
        except REDIS_ERRORS:
            return  # they wait at the front of the queue for whichever worker takes next
        if taken:
            for job in taken:
                log.info("job %s: its worker was lost; it runs here next", job.job_id, extra=record_fields(job.record))
            self._admit(taken, front=True)

    def _next_execution_prefix(self) -> str:
        return f"{self._execution_prefix}{next(self._executions)}x"

    def _wait_for_work(self) -> None:
        """Block on the model's wake list (rung by every enqueue) for at most wake_timeout_s."""
        try:
            token = self.connection.blpop([layout.wake_key(self.settings.model_name)],
                                          timeout=self.settings.wake_timeout_s)
            if token is None and self._worked_since_idle and not self._ready and not self._busy:
                self._worked_since_idle = False  # idle for a whole wake timeout: give image memory back
                release_image_memory()
            if token is not None and not self._accepting:
                self.connection.rpush(layout.wake_key(self.settings.model_name), 1)  # not ours to take: pass it on
        except REDIS_ERRORS:
            time.sleep(0.5)

    def _admit(self, taken: list[TakenJob], front: bool = False) -> None:
        """Held from now on: ready for the model (at the front of `ready` with front=True), or finished at
        once if they cannot run."""
        self._worked_since_idle = True
        taken_at = time.time()
        helds = [Held(job, taken_at=taken_at) for job in taken]
        with self._lock:  # heartbeated (and cancellable) from now on, while their images are prepared
            for held in helds:
                self._held[held.job.job_id] = held
        images = self._prepare_images(taken)
        ready: list[Held] = []
        not_run: list[Finished] = []
        for held, image in zip(helds, images):
            error = prepare_request(held, image, self._now)
            if error is None:
                ready.append(held)
            else:
                not_run.append(Finished(held.job, "failed", JobState.FAILED.value, error, started_at=taken_at))
        with self._ready_changed:
            accepting = self._accepting
            if accepting:
                if front:
                    self._ready.extendleft(reversed(ready))
                else:
                    self._ready.extend(ready)
            self._ready_changed.notify_all()
        if not_run:
            self._finishing.put(not_run)
        if not accepting and ready:  # taken while stopping: straight back to the queue
            self._finishing.put(Requeue([held.job for held in ready]))

    def _prepare_images(self, taken: list[TakenJob]) -> list:
        """Each job's image made into pixels (engines that take them), or None (the job decodes its own)."""
        if self.pixels is None:
            return [None] * len(taken)
        try:
            return self.pixels.prepare([job.image for job in taken])
        except Exception:  # noqa: BLE001 - e.g. no preparation process could start: these jobs fail, not the fetcher
            log.exception("preparing %d images failed", len(taken))
            return [PreparationFailed("the worker could not prepare this image")] * len(taken)

    # -- model ------------------------------------------------------------------------------------

    def _model_loop(self) -> None:
        name_os_thread("f2s-model")
        settings = self.settings
        while True:
            with self._ready_changed:
                while not self._ready and not self._fetch_done.is_set():
                    self._ready_changed.wait()
                if not self._ready:
                    return
                if (len(self._ready) < settings.batch_size and self._last_batch_size > 1
                        and settings.batch_wait_ms > 0 and self._accepting):
                    # Under load a fuller batch is worth a few ms; a lone client never waits.
                    until = time.monotonic() + settings.batch_wait_ms / 1000
                    while len(self._ready) < settings.batch_size and not self._fetch_done.is_set():
                        left = until - time.monotonic()
                        if left <= 0:
                            break
                        self._ready_changed.wait(left)
                batch = [self._ready.popleft() for _ in range(min(len(self._ready), settings.batch_size))]
                for held in batch:
                    held.running = True
                self._busy = True
                self._ready_changed.notify_all()
            self._last_batch_size = len(batch)
            runnable = self._start(batch)
            if runnable:
                running = metrics.RUNNING_JOBS.labels(settings.model_name)
                metrics.BATCH_SIZE.labels(settings.model_name).observe(len(runnable))
                running.set(len(runnable))
                self._finishing.put(Batch(runnable, self._run(runnable)))
                running.set(0)
            self._busy = False
            # Not held while waiting for the next batch: an idle worker keeps no decoded image alive.
            batch = runnable = held = None

    def _start(self, batch: list[Held]) -> list[Held]:
        """The jobs of `batch` the model runs now (STARTED is written for them); the others end here."""
        now = time.time()
        runnable, ended = [], []
        for held in batch:
            job = held.job
            if self._now.is_set():
                runnable.append(held)  # the engine stops them at once; the finisher requeues them
            elif held.cancel.is_set():
                ended.append(Finished(job, "stopped", JobState.CANCELLED.value, CANCELLED_BEFORE_RUN,
                                      started_at=held.taken_at))
            elif job.record.expired(now):
                ended.append(Finished(job, "failed", JobState.EXPIRED.value, EXPIRED_BEFORE_RUN,
                                      started_at=held.taken_at))
            else:
                held.started_at = now
                record = job.record
                limits = [t for t in (record.deadline, now + record.run_timeout_s if record.run_timeout_s else None)
                          if t is not None]
                held.stop.limit = min(limits) if limits else float("inf")
                runnable.append(held)
                ended.append(Finished(job, "started", started_at=held.taken_at))
        if ended:
            self._finishing.put(ended)
        return runnable

    def _run(self, batch: list[Held]) -> list[InferenceOutcome]:
        requests = [held.request for held in batch]
        if self._now.is_set():
            return [InferenceOutcome(r, cancelled=True) for r in requests]
        try:
            return check_batch(requests, self.engine.run_batch(requests))
        except Exception:  # noqa: BLE001 - engines isolate bad requests; this is the last resort
            log.exception("batch of %d failed", len(batch))
            return [InferenceOutcome(r, error=INFERENCE_FAILED) for r in requests]

    # -- presence callbacks -----------------------------------------------------------------------

    def _held_jobs(self) -> list[TakenJob]:
        with self._lock:
            return [held.job for held in self._held.values()]

    def _cancelled(self, job_id: str) -> None:
        """A held job was cancelled: one still waiting for the model ends now, a running one at its next step."""
        with self._lock:
            held = self._held.get(job_id)
            if held is None or held.cancel.is_set():
                return
            held.cancel.set()
            waiting = not held.running and held in self._ready
            if waiting:
                self._ready.remove(held)
                self._ready_changed.notify_all()
        log.info("job %s cancelled", job_id, extra=record_fields(held.job.record))
        if waiting:
            self._finishing.put([Finished(held.job, "stopped", JobState.CANCELLED.value, CANCELLED_BEFORE_RUN,
                                          started_at=held.taken_at)])
