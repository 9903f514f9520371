"""Job event streams for many watchers over one Redis connection.

Every event write also publishes the event on `f2s:notify` (common/rq_bridge.py). The hub holds
one subscription to it and hands each event to the watchers of that job, so an open Watch or Run
costs no Redis connection and no blocking read. A watcher reads the job's stream itself (one
XRANGE) when it starts and whenever the subscription was re-established, so it misses nothing;
events it has seen already (by stream id) are skipped.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time

import redis

from florence2_serve.common import redis_layout as layout

from .redis_pipe import Subscriber

log = logging.getLogger(__name__)

_EVENT_ID = re.compile(r"^([0-9]{1,20})(?:-([0-9]{1,20}))?$")  # ASCII digits: \d takes any script's
RESYNC = object()  # a watcher must re-read its stream: the subscription was (re)established


class BadEventId(ValueError):
    """`after_event_id` is not a Redis stream id (`<ms>-<seq>`)."""


def parse_event_id(event_id: str) -> tuple[int, int]:
    """'1764065436000-3' -> (1764065436000, 3); '' -> (0, 0); BadEventId otherwise."""
    if not event_id:
        return (0, 0)
    match = _EVENT_ID.match(event_id)
    if not match:
        shown = event_id if len(event_id) <= 40 else event_id[:40] + "…"
        raise BadEventId(f"after_event_id {shown!r} is not an event id (they look like 1764065436000-0)")
    return int(match.group(1)), int(match.group(2) or 0)


def format_event_id(parts: tuple[int, int]) -> str:
    return f"{parts[0]}-{parts[1]}"


class Watcher:
    __slots__ = ("job_id", "queue", "last_seen")

    def __init__(self, job_id: str):
        self.job_id = job_id
        self.queue: asyncio.Queue = asyncio.Queue()
        self.last_seen = time.monotonic()


class EventHub:
    """One subscription to `f2s:notify` per front end; events fan out to the watchers of each job."""

    def __init__(self, redis_url: str, check_s: float = 30.0):
        self.subscriber = Subscriber(redis_url, layout.NOTIFY_CHANNEL, self._dispatch)
        self.check_s = check_s
        self._watchers: dict[str, set[Watcher]] = {}
        self._tasks: list[asyncio.Task] = []
        self.connected = asyncio.Event()

    @property
    def watching(self) -> int:
        return sum(len(group) for group in self._watchers.values())

    def watch(self, job_id: str) -> Watcher:
        watcher = Watcher(job_id)
        self._watchers.setdefault(job_id, set()).add(watcher)
        return watcher

    def unwatch(self, watcher: Watcher) -> None:
        group = self._watchers.get(watcher.job_id)
        if group is not None:
            group.discard(watcher)
            if not group:
                del self._watchers[watcher.job_id]

    async def start(self) -> None:
        self._tasks = [asyncio.create_task(self._run(), name="florence2-event-hub"),
                       asyncio.create_task(self._sweep(), name="florence2-event-sweep")]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            # Python 3.11's wait_for can swallow a cancel that lands as its inner await completes (the
            # subscription being made just then): cancel again until the task has really stopped.
            while not (await asyncio.wait({task}, timeout=0.5))[0]:
                task.cancel()
            if not task.cancelled() and task.exception() is not None:
                log.debug("event hub task ended with %r", task.exception())

    async def _sweep(self) -> None:
        """A watcher quiet for check_s reads its stream itself (and learns if its job expired)."""
        while True:
            await asyncio.sleep(1.0)
            quiet_since = time.monotonic() - self.check_s
            for group in self._watchers.values():
                for watcher in group:
                    if watcher.last_seen < quiet_since:
                        watcher.last_seen = time.monotonic()
                        watcher.queue.put_nowait(RESYNC)

    def _subscribed(self) -> None:
        self.connected.set()
        self._broadcast(RESYNC)

    def _broadcast(self, item) -> None:
        for group in self._watchers.values():
            for watcher in group:
                watcher.queue.put_nowait(item)

    async def _run(self) -> None:
        delay = 0.1
        while True:
            try:
                await self.subscriber.run_once(self._subscribed)
            except (redis.RedisError, OSError) as exc:
                if self.connected.is_set():
                    log.warning("event subscription lost (%s); reconnecting", exc)
                    delay = 0.1
                self.connected.clear()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    def _dispatch(self, payload: bytes) -> None:
        watchers = self._watchers
        now = time.monotonic()
        for job_id, event in layout.notification_events(payload, watchers):
            for watcher in watchers.get(job_id, ()):
                watcher.last_seen = now
                watcher.queue.put_nowait(event)
