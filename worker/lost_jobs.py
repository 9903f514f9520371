"""Which held jobs have really lost their worker: judged before rq's abandoned-job cleanup runs.

rq treats a job as abandoned when its worker has not heartbeated it for the heartbeat TTL. That is
fast for a dead worker but condemns a live one whose threads were starved of CPU (or paused) for a
few seconds: its jobs would run twice. A worker's Redis connections tell the two apart on one Redis:
every worker names its connections after itself (CLIENT SETNAME, as rq does), a dead process's
connections are closed by its kernel at once, and a starved or paused process keeps them open.

Every maintenance round, a worker looks at the started jobs of its model whose heartbeat is late by
more than `late_s` (1.5 heartbeats):

- its own jobs are alive by definition: they were heartbeated just before (Presence.maintain);
- a late job whose worker still has a connection is vouched for: heartbeated on its behalf, so rq
  leaves it alone, for at most `silent_worker_limit_s` (a hung process with open connections, or a
  machine that vanished without closing them, is then left to rq's TTL as before);
- a late job whose worker has had no connection for `absent_grace_s` (two looks, so a worker that is
  only reconnecting after a Redis restart is not condemned) is marked expired now, and rq's cleanup,
  which runs right after, retries it at the front of its queue.
"""

from __future__ import annotations

import logging
import time

import redis

from florence2_serve.common import redis_layout as layout
from florence2_serve.common import rq_bridge
from florence2_serve.common.rq_bridge import queue_key

log = logging.getLogger(__name__)


class LostJobReview:
    def __init__(self, connection: redis.Redis, *, model: str, worker_id: str, heartbeat_s: float,
                 job_heartbeat_ttl_s: int, silent_worker_limit_s: float, absent_grace_s: float = 1.0):
        self.connection = connection
        self.worker_id = worker_id
        self.ttl = job_heartbeat_ttl_s
        self.late_s = 1.5 * heartbeat_s
        self.silent_limit_s = silent_worker_limit_s
        self.absent_grace_s = absent_grace_s
        self.wip_keys = [f"rq:wip:{name}" for name in layout.queue_names(model)]
        self._silent_since: dict[str, float] = {}  # execution -> when first seen late with its worker connected
        self._absent_since: dict[str, float] = {}  # worker -> when first seen late and without a connection
        self._no_client_list = False

    def review(self, now: float | None = None) -> int:
        """Vouch for late jobs of live workers, expire those of dead ones; returns how many were expired."""
        now = time.time() if now is None else now
        late = self._late(now)
        if not late:
            self._silent_since.clear()
            self._absent_since.clear()
            return 0
        connected = self._connected_names()
        if connected is None:
            return 0
        vouched, expired = [], []
        absent_now: dict[str, float] = {}
        for wip_key, composite, worker in late:
            if worker == self.worker_id:
                continue
            if worker in connected:
                since = self._silent_since.setdefault(composite, now)
                if now - since < self.silent_limit_s:
                    vouched.append((wip_key, composite))
                elif now - since < self.silent_limit_s + 1:
                    log.warning("worker %s holds its connection but has been silent for %.0f s; leaving its "
                                "job %s to rq's heartbeat timeout", worker, now - since, composite.split(":")[0])
                continue
            absent = absent_now[worker] = self._absent_since.get(worker, now)
            if now - absent >= self.absent_grace_s:
                expired.append((wip_key, composite, worker))
        self._absent_since = absent_now
        live = {composite for _, composite, _ in late}
        self._silent_since = {c: t for c, t in self._silent_since.items() if c in live}
        if vouched:
            self._vouch(vouched)
        if expired:
            with self.connection.pipeline(transaction=False) as pipe:
                for wip_key, composite, _ in expired:
                    pipe.zadd(wip_key, {composite: 0}, xx=True)
                pipe.execute()
            for worker in sorted({worker for _, _, worker in expired}):
                log.warning("worker %s is gone (no Redis connection, no heartbeat): its jobs go back to the "
                            "front of their queues", worker or "(unknown)")
        return len(expired)

    def _late(self, now: float) -> list[tuple[str, str, str]]:
        """(wip key, "job:execution", worker name) of started jobs whose heartbeat is late."""
        newest_late_score = now + self.ttl - self.late_s
        with self.connection.pipeline(transaction=False) as pipe:
            for key in self.wip_keys:
                pipe.zrangebyscore(key, "-inf", newest_late_score)
            found = [(key, member.decode()) for key, members in zip(self.wip_keys, pipe.execute())
                     for member in members]
        if not found:
            return []
        with self.connection.pipeline(transaction=False) as pipe:
            for _, composite in found:
                pipe.hget(f"rq:job:{composite.split(':', 1)[0]}", "worker_name")
            workers = pipe.execute()
        return [(key, composite, (worker or b"").decode()) for (key, composite), worker in zip(found, workers)]

    def _connected_names(self) -> set[str] | None:
        """Names of the connected clients; None where CLIENT LIST is refused (an ACL without it)."""
        try:
            return {client.get("name", "") for client in self.connection.client_list(_type="normal")} - {""}
        except redis.ResponseError as exc:
            if not self._no_client_list:
                self._no_client_list = True
                log.warning("CLIENT LIST refused (%s): lost jobs are found by rq's heartbeat timeout alone, and a "
                            "worker starved of CPU for longer than it may have its jobs re-run", exc)
            return None

    def _vouch(self, entries: list[tuple[str, str]]) -> None:
        triples = []
        for wip_key, composite in entries:
            job_id, _, execution = composite.partition(":")
            triples.append(_Held(job_id, queue_key(wip_key.removeprefix("rq:wip:")), execution))
        rq_bridge.heartbeat(self.connection, triples, ttl=self.ttl)


class _Held:
    """The (job, queue, execution) triple rq_bridge.heartbeat reads, for a job another worker holds."""

    __slots__ = ("job_id", "queue_key", "execution_id")

    def __init__(self, job_id: str, queue_key: str, execution_id: str):
        self.job_id, self.queue_key, self.execution_id = job_id, queue_key, execution_id
