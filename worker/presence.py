"""A worker's background thread: registration heartbeat, cancel flags, rq job heartbeats."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import redis
from rq.utils import now

from florence2_serve.common import redis_layout as layout

from .settings import WorkerSettings

log = logging.getLogger(__name__)


@dataclass
class InFlight:
    job: object  # rq Job
    execution: object  # rq Execution
    queue: object  # rq Queue
    cancel: threading.Event


class Presence(threading.Thread):
    def __init__(self, connection: redis.Redis, settings: WorkerSettings, description: dict):
        super().__init__(name="florence2-presence", daemon=True)
        self.connection = connection
        self.settings = settings
        self.description = {k: str(v) for k, v in description.items()}
        self.in_flight: dict[str, InFlight] = {}
        self.lock = threading.Lock()
        self.stopping = threading.Event()

    # -- registration -------------------------------------------------------------------------

    def register(self) -> None:
        key = layout.worker_key(self.settings.worker_id)
        with self.connection.pipeline() as pipe:
            pipe.hset(key, mapping={**self.description, "jobs_done": 0, "generate_calls": 0, "state": "idle"})
            pipe.expire(key, self.settings.registration_ttl_s)
            pipe.sadd(layout.model_workers_key(self.settings.model_name), self.settings.worker_id)
            pipe.sadd(layout.MODELS_KEY, self.settings.model_name)
            pipe.execute()

    def unregister(self) -> None:
        with self.connection.pipeline() as pipe:
            pipe.delete(layout.worker_key(self.settings.worker_id))
            pipe.srem(layout.model_workers_key(self.settings.model_name), self.settings.worker_id)
            pipe.execute()

    def record_batch(self, pipe, jobs: int) -> None:
        """Queue the batch counters on `pipe` (batching is observable through ListModels)."""
        key = layout.worker_key(self.settings.worker_id)
        pipe.hincrby(key, "jobs_done", jobs)
        pipe.hincrby(key, "generate_calls", 1)

    def set_state(self, pipe, state: str) -> None:
        pipe.hset(layout.worker_key(self.settings.worker_id), "state", state)

    # -- in-flight jobs -----------------------------------------------------------------------

    def track(self, job_id: str, entry: InFlight) -> None:
        with self.lock:
            self.in_flight[job_id] = entry

    def untrack(self, job_id: str) -> None:
        with self.lock:
            self.in_flight.pop(job_id, None)

    def _poll_cancels(self) -> None:
        with self.lock:
            entries = list(self.in_flight.items())
        if not entries:
            return
        with self.connection.pipeline(transaction=False) as pipe:
            for job_id, _ in entries:
                pipe.exists(layout.cancel_key(job_id))
            flags = pipe.execute()
        for (job_id, entry), flagged in zip(entries, flags):
            if flagged and not entry.cancel.is_set():
                log.info("job %s cancelled", job_id)
                entry.cancel.set()

    def _heartbeat(self) -> None:
        ttl = self.settings.registration_ttl_s
        with self.lock:
            entries = list(self.in_flight.values())
        with self.connection.pipeline(transaction=False) as pipe:
            pipe.expire(layout.worker_key(self.settings.worker_id), ttl)
            pipe.sadd(layout.model_workers_key(self.settings.model_name), self.settings.worker_id)
            job_ttl = self.settings.job_heartbeat_ttl_s
            for entry in entries:
                entry.job.heartbeat(now(), job_ttl, pipeline=pipe, xx=True)
                entry.execution.heartbeat(entry.queue.started_job_registry, job_ttl, pipe)
            pipe.execute()

    def run(self) -> None:
        next_heartbeat = 0.0
        while not self.stopping.is_set():
            try:
                self._poll_cancels()
                if time.monotonic() >= next_heartbeat:
                    self._heartbeat()
                    next_heartbeat = time.monotonic() + self.settings.heartbeat_s
            except (redis.RedisError, OSError) as exc:
                log.warning("presence: redis error (%s); retrying", exc)
                time.sleep(0.5)
            self.stopping.wait(self.settings.cancel_poll_ms / 1000)

    def stop(self) -> None:
        self.stopping.set()
        if self.is_alive():
            self.join(timeout=2)
