"""The front end's Redis side: submit, look up, cancel and stream jobs. All of it on the event loop.

Every command goes through one pipelined connection (server/redis_pipe.py), so the Redis work of
concurrent RPCs travels together. Submitting and cancelling are single Redis function calls
(common/rq_bridge.py); streams come from the EventHub (one subscription for every watcher).
Redis errors propagate as redis exceptions; the servicer turns them into UNAVAILABLE.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass
from typing import AsyncIterator

import redis

from florence2_serve.common import redis_layout as layout
from florence2_serve.common import rq_bridge
from florence2_serve.common.redis_layout import Event, EventType, JobRecord, JobState
from florence2_serve.common.rq_bridge import Enqueued, JobOptions, JobTemplates
from florence2_serve.common.tasks import Task

from . import metrics
from .capabilities import ModelCapabilities, TokenCounter
from .events import RESYNC, EventHub, Watcher, format_event_id, parse_event_id
from .redis_pipe import PipelinedRedis
from .settings import ServerSettings

REDIS_ERRORS = (redis.RedisError, OSError)


class NoWorker(Exception):
    """No live worker serves the model; the message says what to do. `known`: workers once served it."""

    def __init__(self, message: str, known: bool):
        super().__init__(message)
        self.known = known


class UnknownJob(Exception):
    """No such job: never submitted, or expired `result_ttl_s` after its last change."""


class EventIdOutOfRange(Exception):
    """Watch's after_event_id is past the last event of a job that has not ended."""


@dataclass
class WorkerView:
    worker_id: str
    fields: dict


class JobStore:
    # How long a positive "model has live workers" answer is reused (keeps Redis off the hot path;
    # registrations live 10 s, so a worker gone for good is noticed within this much of expiring).
    LIVENESS_CACHE_S = 2.0

    def __init__(self, settings: ServerSettings):
        self.settings = settings
        self._live_until: dict[str, float] = {}
        self._capabilities: dict[str, ModelCapabilities] = {}
        self.redis = PipelinedRedis(settings.redis_url)
        self.hub = EventHub(settings.redis_url, check_s=settings.watch_check_s)
        self.templates = JobTemplates(JobOptions(
            timeout=settings.job_timeout_s, ttl=settings.result_ttl_s, max_retries=settings.max_retries))
        self.tokens = TokenCounter(lambda digest: self.redis.execute("GET", layout.tokenizer_key(digest)))

    async def start(self) -> None:
        await self.hub.start()

    async def close(self) -> None:
        await self.hub.close()
        await self.redis.close()

    async def ping(self) -> bool:
        try:
            return await asyncio.wait_for(self.redis.execute("PING"), timeout=1.0) == b"PONG"
        except (*REDIS_ERRORS, asyncio.TimeoutError):
            return False

    # -- workers and models -------------------------------------------------------------------

    async def live_workers(self, model: str) -> list[WorkerView]:
        ids = sorted(m.decode() for m in await self.redis.execute("SMEMBERS", layout.model_workers_key(model)))
        if not ids:
            return []
        replies = await asyncio.gather(*[self.redis.execute("HGETALL", layout.worker_key(w)) for w in ids])
        views, dead = [], []
        for worker_id, flat in zip(ids, replies, strict=True):
            if flat:
                views.append(WorkerView(worker_id, {k.decode(): v.decode() for k, v in zip(flat[::2], flat[1::2])}))
            else:
                dead.append(worker_id)
        if dead:  # registration expired: forget them (a live one re-adds itself at its next heartbeat)
            await self.redis.execute("SREM", layout.model_workers_key(model), *dead)
        return views

    async def models(self) -> list[str]:
        return sorted(m.decode() for m in await self.redis.execute("SMEMBERS", layout.MODELS_KEY))

    async def queue_depth(self, model: str) -> int:
        return sum(await asyncio.gather(*[self.redis.execute("LLEN", key) for key in layout.rq_queue_keys(model)]))

    async def check_model(self, model: str) -> ModelCapabilities:
        """What `model` can do, from its live workers; NoWorker when it has none."""
        if self._live_until.get(model, 0.0) <= time.monotonic():
            workers = await self.live_workers(model)
            if not workers:
                known = await self.models()
                if model not in known:
                    live = [name for name in known[:50] if await self.live_workers(name)]
                    shown = ", ".join(live[:20]) + (", …" if len(live) > 20 else "")
                    raise NoWorker(f"unknown model {model!r}; models with live workers: {shown or 'none'}",
                                   known=False)
                raise NoWorker(
                    f"no live worker for model {model!r}; start one with: florence2 worker --model {model}=PATH",
                    known=True)
            self._capabilities[model] = ModelCapabilities.of_workers([view.fields for view in workers])
            self._live_until[model] = time.monotonic() + self.LIVENESS_CACHE_S
        return self._capabilities[model]

    async def count_tokens(self, text: str, model: ModelCapabilities) -> int:
        return await self.tokens.count(text, model.tokenizer)

    async def find_request(self, request_id: str) -> tuple[str, str] | None:
        """(job id, payload fingerprint) of the job submitted with `request_id`, or None."""
        found = await self.redis.execute("GET", layout.request_key(request_id))
        if not found:
            return None
        job_id, _, fingerprint = found.decode().partition(" ")
        return job_id, fingerprint

    # -- jobs -----------------------------------------------------------------------------------

    def watch_new(self, job_id: str) -> Watcher:
        """Watch a job before it exists, so not even its first worker event can be missed."""
        return self.hub.watch(job_id)

    def unwatch(self, watcher: Watcher) -> None:
        self.hub.unwatch(watcher)

    async def submit(self, record: JobRecord, image: bytes, fingerprint: str, priority: int) -> Enqueued:
        """Store and enqueue in one atomic step; QueueFull when the model's queues are full.

        With `redis_wait_replicas`, the answer waits until that many replicas hold the write (WAIT): a job
        acknowledged then survives its primary's death and a Sentinel failover. Fewer in time: a Redis
        error (UNAVAILABLE with RetryInfo; a retry with the same request_id finds the job if it was kept)."""
        enqueued = await rq_bridge.enqueue(
            self.redis, record, image, fingerprint, ttl=self.settings.result_ttl_s,
            max_depth=self.settings.max_queue_depth, templates=self.templates, priority=priority)
        wanted = self.settings.redis_wait_replicas
        if wanted:
            acked = await self.redis.execute("WAIT", wanted, self.settings.redis_wait_timeout_ms)
            if acked < wanted:
                raise redis.exceptions.ConnectionError(
                    f"job {record.job_id} was written but reached {acked} of {wanted} Redis replica(s) within "
                    f"{self.settings.redis_wait_timeout_ms} ms; retry with the same request_id")
        return enqueued

    async def get(self, job_id: str) -> tuple[JobRecord, bytes | None]:
        flat = await self.redis.execute("HGETALL", layout.job_key(job_id))
        if not flat:
            raise UnknownJob(_unknown(job_id, self.settings.result_ttl_s))
        record = JobRecord.from_hash(job_id, dict(zip(flat[::2], flat[1::2])))
        result = await self.result_of(job_id) if record.state == JobState.SUCCEEDED.value else None
        return record, result

    async def result_of(self, job_id: str) -> bytes | None:
        """The serialized Result of a job that succeeded (None if it has none, or is gone)."""
        result = None
        for event in await self._read(job_id):
            if event.type is EventType.RESULT:
                result = event.result
        return result

    async def _read(self, job_id: str, after: str = "") -> list[Event]:
        """Events after id `after` (exclusive; '' = all): from the stream of a live job, or, once the job
        has ended and its stream was folded into its hash (in the same atomic step), from there."""
        start = f"({after}" if after else "-"
        entries = await self.redis.execute("XRANGE", layout.events_key(job_id), start, "+")
        if entries:
            return [Event.from_entry(entry_id, dict(zip(fields[::2], fields[1::2]))) for entry_id, fields in entries]
        folded = await self.redis.execute("HGET", layout.job_key(job_id), "events")
        return layout.folded_events(folded, after) if folded else []

    async def cancel(self, job_id: str, wait_s: float) -> tuple[JobState, bool]:
        """(state when this returns, whether this call cancelled the job).

        A job a worker has taken stops at its next decoding step: wait up to `wait_s` for that, so
        the reply is normally its final CANCELLED (or the state it ended in, had it finished first);
        otherwise the reply is its state at that moment, with the cancellation still pending.
        """
        watcher = self.hub.watch(job_id)
        try:
            state, acted = await rq_bridge.cancel(self.redis, job_id, ttl=self.settings.result_ttl_s)
            if not state:
                raise UnknownJob(_unknown(job_id, self.settings.result_ttl_s))
            if JobState(state).terminal or not acted:
                if acted:  # removed from its queue: ended here, not by a worker
                    await self._count_cancelled(job_id)
                return JobState(state), acted
            try:
                ended = await asyncio.wait_for(_terminal_event(watcher), timeout=wait_s)
                return ended.state, ended.state is JobState.CANCELLED
            except asyncio.TimeoutError:
                pass
            current = JobState((await self.redis.execute("HGET", layout.job_key(job_id), "state") or b"").decode()
                               or state)
            return current, current is JobState.CANCELLED or not current.terminal
        finally:
            self.hub.unwatch(watcher)

    async def _count_cancelled(self, job_id: str) -> None:
        flat = await self.redis.execute("HMGET", layout.job_key(job_id), "spec")
        spec = json.loads(flat[0]) if flat and flat[0] else {}
        task = Task(spec["task"]).name if "task" in spec else ""
        metrics.JOBS_ENDED.labels(spec.get("model", ""), task, "cancelled", "CANCELLED").inc()

    async def events(self, job_id: str, after: str = "", watcher: Watcher | None = None) -> AsyncIterator[Event]:
        """Events after `after` (exclusive; '' = from the first) until the terminal one.

        `watcher`, from watch_new(), belongs to a job created after it was registered: its events
        all arrive through the hub, so its stream is read back only after a resubscription.
        BadEventId for a malformed id, EventIdOutOfRange for one past the end of a running job,
        UnknownJob when the job is (or becomes) unknown.
        """
        last = parse_event_id(after)
        read_back = watcher is None or not self.hub.connected.is_set()
        watcher = watcher or self.hub.watch(job_id)
        try:
            while True:
                if read_back:
                    read_back = False
                    events = await self._read(job_id, format_event_id(last) if last != (0, 0) else "")
                    if not events and await self._nothing_more(job_id, last):
                        return
                    for event in events:
                        last = parse_event_id(event.event_id)
                        yield event
                        if event.type.terminal:
                            return
                item = await watcher.queue.get()
                if item is RESYNC:  # resubscribed, or quiet for a while: read the stream itself
                    read_back = True
                    continue
                event_id = parse_event_id(item.event_id)
                if event_id <= last:
                    continue
                last = event_id
                yield item
                if item.type.terminal:
                    return
        finally:
            self.hub.unwatch(watcher)

    async def _nothing_more(self, job_id: str, after: tuple[int, int]) -> bool:
        """No event after `after`: True if the job has ended (the stream is complete); raise if `after`
        lies past the job's last event or the job is unknown; False to wait for more."""
        state, newest = await asyncio.gather(
            self.redis.execute("HGET", layout.job_key(job_id), "state"),
            self.redis.execute("XREVRANGE", layout.events_key(job_id), "+", "-", "COUNT", 1))
        if state is None:
            raise UnknownJob(_unknown(job_id, self.settings.result_ttl_s))
        if JobState(state.decode()).terminal:
            return True
        newest_id = parse_event_id(newest[0][0].decode()) if newest else (0, 0)
        if after > newest_id:
            raise EventIdOutOfRange(
                f"after_event_id {format_event_id(after)} is past the job's last event ({format_event_id(newest_id)})")
        return False


async def _terminal_event(watcher: Watcher) -> Event:
    while True:
        item = await watcher.queue.get()
        if item is not RESYNC and item.type.terminal:
            return item


def _unknown(job_id: str, ttl: int) -> str:
    shown = job_id if len(job_id) <= 64 else job_id[:64] + "…"
    return f"no job {shown!r} (unknown, or expired {ttl} s after it last changed)"


def new_job_id() -> str:
    return uuid.uuid4().hex


def new_record(model: str, task: str, text: str, region, generation: dict, request_id: str,
               priority: int, deadline: float | None, run_timeout_s: float, job_id: str | None = None,
               detection: dict | None = None) -> JobRecord:
    return JobRecord(
        job_id=job_id or new_job_id(), model=model, task=task, text=text, region=region, generation=generation,
        request_id=request_id, priority=priority, created=time.time(), deadline=deadline,
        run_timeout_s=run_timeout_s, detection=detection or {},
    )
