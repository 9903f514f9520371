"""Job submission, lookup, cancellation and event streaming over Redis (front-end side)."""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass
from typing import AsyncIterator

import redis
import redis.asyncio as aioredis
from rq import Callback, Queue, Retry
from rq.exceptions import NoSuchJobError
from rq.job import Job
from rq.serializers import JSONSerializer

from florence2_serve.common import redis_layout as layout
from florence2_serve.common.redis_layout import Event, EventType, JobRecord, JobState

from .settings import ServerSettings


class QueueFull(Exception):
    pass


class NoWorker(Exception):
    pass


class UnknownJob(Exception):
    pass


@dataclass
class WorkerView:
    worker_id: str
    fields: dict


class JobStore:
    """All Redis access of the front end. Async for the event loop; rq enqueue runs in a thread."""

    # How long a positive "model has live workers" answer is reused (keeps Redis off the hot path).
    LIVENESS_CACHE_S = 0.5

    def __init__(self, settings: ServerSettings):
        self.settings = settings
        self._live_until: dict[str, float] = {}
        self._kinds: dict[str, set[str]] = {}
        self.redis = aioredis.Redis.from_url(settings.redis_url, max_connections=2048)
        self.sync_redis = redis.Redis.from_url(settings.redis_url)

    async def close(self) -> None:
        await self.redis.aclose()
        self.sync_redis.close()

    async def ping(self) -> bool:
        try:
            return bool(await asyncio.wait_for(self.redis.ping(), timeout=1.0))
        except (redis.RedisError, OSError, asyncio.TimeoutError):
            return False

    # -- workers and models -------------------------------------------------------------------

    async def live_workers(self, model: str) -> list[WorkerView]:
        ids = sorted(m.decode() for m in await self.redis.smembers(layout.model_workers_key(model)))
        if not ids:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for worker_id in ids:
            pipe.hgetall(layout.worker_key(worker_id))
        views, dead = [], []
        for worker_id, fields in zip(ids, await pipe.execute()):
            if fields:
                views.append(WorkerView(worker_id, {k.decode(): v.decode() for k, v in fields.items()}))
            else:
                dead.append(worker_id)
        if dead:  # heartbeat expired: forget them
            await self.redis.srem(layout.model_workers_key(model), *dead)
        return views

    async def models(self) -> list[str]:
        return sorted(m.decode() for m in await self.redis.smembers(layout.MODELS_KEY))

    async def queue_depth(self, model: str) -> int:
        return int(await self.redis.llen(layout.rq_queue_key(model)))

    async def check_model(self, model: str) -> set[str]:
        """Raise NoWorker unless `model` has a live worker; the kinds its workers serve."""
        if self._live_until.get(model, 0.0) <= time.monotonic():
            known = await self.models()
            if model not in known:
                raise NoWorker(f"unknown model {model!r}; models with workers: {', '.join(known) or 'none'}")
            workers = await self.live_workers(model)
            if not workers:
                raise NoWorker(
                    f"no live worker for model {model!r}; start one with: florence2 worker --model {model}=PATH"
                )
            self._kinds[model] = {view.fields.get("kind", "") for view in workers}
            self._live_until[model] = time.monotonic() + self.LIVENESS_CACHE_S
        return self._kinds.get(model, set())

    # -- jobs -----------------------------------------------------------------------------------

    async def submit(self, record: JobRecord, image: bytes, check=None) -> tuple[str, str]:
        """Check (`check()` raises on a bad image), store and enqueue, in one hop to a thread.

        Returns (job_id, queued_event_id); the event id is "" when record.request_id named an
        existing job (Submit is idempotent). Raises QueueFull when the model's queue is full.
        """
        return await asyncio.to_thread(self._submit_sync, record, image, check)

    def _submit_sync(self, record: JobRecord, image: bytes, check) -> tuple[str, str]:
        if check is not None:
            check()
        if self.sync_redis.llen(layout.rq_queue_key(record.model)) >= self.settings.max_queue_depth:
            raise QueueFull(f"queue of model {record.model!r} is full ({self.settings.max_queue_depth} jobs); "
                            "retry with backoff")
        key = layout.request_key(record.request_id) if record.request_id else None
        if key and not self.sync_redis.set(key, record.job_id, nx=True, ex=self.settings.result_ttl_s):
            existing = self.sync_redis.get(key)
            if existing:
                return existing.decode(), ""
        try:
            return record.job_id, self._store_and_enqueue(record, image)
        except BaseException:
            if key:  # release the claim: a retry with the same request_id must enqueue
                self.sync_redis.delete(key)
            raise

    def _store_and_enqueue(self, record: JobRecord, image: bytes) -> str:
        """One transaction; returns the id of the QUEUED event."""
        ttl = self.settings.result_ttl_s
        queue = Queue(layout.queue_name(record.model), connection=self.sync_redis, serializer=JSONSerializer)
        with self.sync_redis.pipeline() as pipe:
            # rq starts the MULTI itself, so it goes first; everything below lands in one transaction.
            queue.enqueue_call(
                layout.JOB_FUNCTION, args=(record.job_id,), job_id=record.job_id,
                timeout=self.settings.job_timeout_s, result_ttl=ttl, failure_ttl=ttl,
                at_front=record.priority > 0, pipeline=pipe,
                retry=Retry(max=self.settings.max_retries) if self.settings.max_retries else None,
                on_failure=Callback(layout.FAILURE_CALLBACK),
            )
            pipe.set(layout.image_key(record.job_id), image, ex=ttl)
            pipe.hset(layout.job_key(record.job_id), mapping=record.to_hash())
            queued = Event(EventType.QUEUED, JobState.QUEUED, time=record.created)
            layout.add_event(pipe, record.job_id, queued, ttl)
            replies = pipe.execute()
        return replies[-layout.ADD_EVENT_COMMANDS].decode()

    async def get(self, job_id: str) -> tuple[JobRecord, dict | None]:
        data = await self.redis.hgetall(layout.job_key(job_id))
        if not data:
            raise UnknownJob(f"no job {job_id!r} (unknown, or expired after {self.settings.result_ttl_s}s)")
        record = JobRecord.from_hash(data)
        result = None
        if record.state == JobState.SUCCEEDED.value:
            async for event in self.events(job_id, "", block=False):
                if event.type is EventType.RESULT:
                    result = event.result
        return record, result

    async def cancel(self, job_id: str) -> tuple[JobState, bool]:
        """(state after, whether this call stopped it)."""
        record, _ = await self.get(job_id)
        if JobState(record.state).terminal:
            return JobState(record.state), False
        ttl = self.settings.result_ttl_s
        await self.redis.set(layout.cancel_key(job_id), "1", ex=ttl)
        if record.state == JobState.QUEUED.value:
            removed = await asyncio.to_thread(self._remove_from_queue, record)
            if removed:
                pipe = self.redis.pipeline()
                layout.add_event(pipe, job_id, Event(EventType.CANCELLED, JobState.CANCELLED,
                                                     error="cancelled while queued"), ttl)
                await pipe.execute()
                return JobState.CANCELLED, True
        # Running (or just taken by a worker): the worker sees the flag at its next decoding step.
        return JobState.RUNNING, True

    def _remove_from_queue(self, record: JobRecord) -> bool:
        removed = self.sync_redis.lrem(layout.rq_queue_key(record.model), 0, record.job_id)
        if removed:
            try:
                Job.fetch(record.job_id, connection=self.sync_redis, serializer=JSONSerializer).cancel()
            except (NoSuchJobError, Exception):  # noqa: BLE001 - the queue entry is gone either way
                pass
        return bool(removed)

    async def events(self, job_id: str, after: str, block: bool = True) -> AsyncIterator[Event]:
        """Events after `after` (exclusive; '' = from the start) until a terminal one."""
        key = layout.events_key(job_id)
        last = after or "0-0"
        while True:
            entries = await self.redis.xread({key: last}, count=100, block=1000 if block else None)
            if not entries:
                if not block:
                    return
                if not await self.redis.exists(layout.job_key(job_id)):
                    raise UnknownJob(f"job {job_id!r} expired")
                continue
            for entry_id, fields in entries[0][1]:
                last = entry_id.decode()
                event = Event.from_entry(entry_id, fields)
                yield event
                if event.type.terminal:
                    return


def new_record(model: str, task: str, text: str, region, generation: dict, request_id: str,
               priority: int, deadline: float | None) -> JobRecord:
    return JobRecord(
        job_id=uuid.uuid4().hex, model=model, task=task, text=text, region=region, generation=generation,
        request_id=request_id, priority=priority, created=time.time(), deadline=deadline,
    )
