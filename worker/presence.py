"""A worker's background duties: being findable, keeping its jobs alive in rq, hearing cancels, maintenance.

Heartbeat (every `heartbeat_s`, on its own thread): writes the whole registration (so a
registration lost to a Redis outage or failover comes back by itself), rq's worker heartbeat
(re-registering with rq when its key is gone) and rq's heartbeat of every job the worker holds.
Cancel poll (every `cancel_poll_ms`, only while jobs are held): one MGET of their cancel flags.
Maintenance (`maintain()`, called every `maintenance_interval_s` by the worker's main thread): rq's
`clean_registries`, which finds jobs abandoned by dead workers and retries or fails them (rq's own
code, behind rq's lock), after worker/lost_jobs.py has told dead workers from starved ones. It must run on the main thread: rq bounds the failure callback it runs with
a SIGALRM timer. Every Redis error is logged once per outage and retried; none stops the worker.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from typing import Callable

import redis

from florence2_serve.common import redis_layout as layout
from florence2_serve.common import rq_bridge

from .lost_jobs import LostJobReview
from .settings import WorkerSettings

log = logging.getLogger(__name__)

REDIS_ERRORS = (redis.RedisError, OSError)


class OutageLog:
    """Log a Redis outage once when it starts and once when it ends."""

    def __init__(self, what: str):
        self.what = what
        self.since: float | None = None

    def failed(self, exc: BaseException) -> None:
        if self.since is None:
            self.since = time.monotonic()
            log.warning("%s: Redis unreachable (%s); retrying until it is back", self.what, _plain(exc))

    def ok(self) -> None:
        if self.since is not None:
            log.info("%s: Redis is back after %.1f s", self.what, time.monotonic() - self.since)
            self.since = None


def name_os_thread(name: str) -> None:
    """Give the calling thread `name` in the OS too (top -H, /proc): a worker's threads are told apart."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None).prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME


def _plain(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


class Presence:
    """Runs the heartbeat/cancel thread and the maintenance thread of one worker."""

    def __init__(self, connection: redis.Redis, settings: WorkerSettings, description: dict, rq_worker,
                 held_jobs: Callable[[], list], on_cancel: Callable[[str], None], state: Callable[[], str]):
        self.connection = connection
        self.settings = settings
        self.description = {k: str(v) for k, v in description.items()}
        self.rq_worker = rq_worker
        self.held_jobs = held_jobs  # -> [TakenJob]
        self.on_cancel = on_cancel
        self.state = state
        self.stopping = threading.Event()
        self._thread = threading.Thread(target=self._beat_loop, name="florence2-heartbeat", daemon=True)
        self.lost_jobs = LostJobReview(
            connection, model=settings.model_name, worker_id=settings.worker_id, heartbeat_s=settings.heartbeat_s,
            job_heartbeat_ttl_s=settings.job_heartbeat_ttl_s, silent_worker_limit_s=settings.silent_worker_limit_s)
        self._maintenance_outage = OutageLog("maintenance")

    # -- registration ---------------------------------------------------------------------------

    def register(self) -> None:
        """Register with this service and with rq (raises when Redis is unreachable)."""
        self._write_registration()

    def _write_registration(self) -> None:
        key = layout.worker_key(self.settings.worker_id)
        with self.connection.pipeline(transaction=False) as pipe:
            pipe.hset(key, mapping={**self.description, "state": self.state()})
            pipe.hsetnx(key, "jobs_done", 0)
            pipe.hsetnx(key, "generate_calls", 0)
            pipe.expire(key, self.settings.registration_ttl_s)
            pipe.sadd(layout.model_workers_key(self.settings.model_name), self.settings.worker_id)
            pipe.sadd(layout.MODELS_KEY, self.settings.model_name)
            pipe.exists(self.rq_worker.key)
            rq_registered = pipe.execute()[-1]
        if not rq_registered:
            self.rq_worker.register_birth()
        else:
            self.rq_worker.heartbeat()
        self.rq_worker.set_state(self.state())  # what `rq info` shows

    def unregister(self) -> None:
        try:
            with self.connection.pipeline() as pipe:
                pipe.delete(layout.worker_key(self.settings.worker_id))
                pipe.srem(layout.model_workers_key(self.settings.model_name), self.settings.worker_id)
                pipe.execute()
            self.rq_worker.register_death()
        except REDIS_ERRORS as exc:
            log.warning("could not unregister (%s); the registration expires by itself", _plain(exc))

    # -- threads --------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.stopping.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def _beat_loop(self) -> None:
        name_os_thread("f2s-heartbeat")
        outage = OutageLog("heartbeat")
        next_beat = 0.0
        poll_s = self.settings.cancel_poll_ms / 1000
        while not self.stopping.is_set():
            try:
                held = self.held_jobs()
                if held:
                    self._poll_cancels(held)
                if time.monotonic() >= next_beat:
                    self._write_registration()
                    rq_bridge.heartbeat(self.connection, held, ttl=self.settings.job_heartbeat_ttl_s)
                    next_beat = time.monotonic() + self.settings.heartbeat_s
                outage.ok()
            except REDIS_ERRORS as exc:
                outage.failed(exc)
                self.stopping.wait(0.5)
            self.stopping.wait(poll_s)

    def _poll_cancels(self, held: list) -> None:
        flags = self.connection.mget([layout.cancel_key(job.job_id) for job in held])
        for job, flag in zip(held, flags, strict=True):
            if flag is not None:
                self.on_cancel(job.job_id)

    def maintain(self) -> None:
        """One round of rq's registry maintenance (main thread only).

        First our own jobs are heartbeated (a worker whose threads were starved must not find its own
        jobs abandoned), then the late jobs of other workers are judged by their connections
        (worker/lost_jobs.py), then rq's cleanup retries what was found lost.
        """
        try:
            rq_bridge.heartbeat(self.connection, self.held_jobs(), ttl=self.settings.job_heartbeat_ttl_s)
            self.lost_jobs.review()
            self.rq_worker.clean_registries()
            self._maintenance_outage.ok()
        except REDIS_ERRORS as exc:
            self._maintenance_outage.failed(exc)
        except Exception:  # noqa: BLE001 - rq maintenance must never take the worker down
            log.exception("rq maintenance failed; trying again next interval")
