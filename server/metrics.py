"""Prometheus metrics of the front end (served on --metrics-port, bound to the gRPC host by default).

Every metric is listed, with the workers', in README's "Observability" section; the Grafana dashboard
in docker/grafana/ is built on these names (a test checks it).
"""

from __future__ import annotations

import logging

from prometheus_client import Counter, Gauge, Histogram

from florence2_serve.common import metrics as shared
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import REGISTRY, Collector

log = logging.getLogger(__name__)

REQUESTS = Counter("florence2_requests_total", "RPCs answered, by method and gRPC status code", ["method", "code"])
REQUEST_SECONDS = Histogram("florence2_request_duration_seconds",
                            "Time to answer a unary RPC, or to end a stream (Run, Watch)", ["method"],
                            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60,
                                     300))
JOBS_SUBMITTED = Counter("florence2_jobs_submitted_total", "Jobs enqueued", ["model", "task"])
# Jobs ended here (cancelled while still queued) go to the shared florence2_jobs_ended_total.
JOBS_ENDED = shared.JOBS_ENDED
OPEN_STREAMS = Gauge("florence2_open_event_streams", "Run and Watch streams open (all share one Redis subscription)")


class QueueCollector(Collector):
    """Queue depth per model and priority, and live workers per model, read from Redis at scrape time.

    These are cluster-wide: every front end on one Redis exports the same values, so dashboards and
    autoscalers aggregate them with `max by (...)`, never `sum` (README "Observability")."""

    def __init__(self, redis_url: str):
        self.redis_url = redis_url
        self._connection = None

    def describe(self):
        return []

    def collect(self):
        import redis

        from florence2_serve.common import redis_layout as layout

        depth = GaugeMetricFamily("florence2_queue_depth",
                                  "Jobs waiting in a model's queue, by priority (cluster-wide: aggregate with max)",
                                  labels=["model", "priority"])
        live = GaugeMetricFamily("florence2_live_workers",
                                 "Workers registered and heartbeating, by model (cluster-wide: aggregate with max)",
                                 labels=["model"])
        try:
            if self._connection is None:
                from florence2_serve.common.redis_url import connect

                self._connection = connect(self.redis_url, socket_timeout=2, socket_connect_timeout=2)
            connection = self._connection
            for model in sorted(m.decode() for m in connection.smembers(layout.MODELS_KEY)):
                keys = [layout.rq_queue_key(model, p) for p in range(layout.MIN_PRIORITY, layout.MAX_PRIORITY + 1)]
                pipe = connection.pipeline(transaction=False)
                for key in keys:
                    pipe.llen(key)
                workers = [w.decode() for w in connection.smembers(layout.model_workers_key(model))]
                for worker in workers:
                    pipe.exists(layout.worker_key(worker))
                replies = pipe.execute()
                for priority, count in enumerate(replies[:len(keys)]):
                    depth.add_metric([model, str(priority)], count)
                live.add_metric([model], sum(replies[len(keys):]))
        except (redis.RedisError, OSError):
            log.debug("metrics: Redis unreachable at scrape time", exc_info=True)
        yield depth
        yield live


def register_queue_collector(redis_url: str) -> QueueCollector:
    collector = QueueCollector(redis_url)
    REGISTRY.register(collector)
    return collector
