"""Prometheus metrics of the front end (served on --metrics-port when set)."""

from prometheus_client import Counter, Gauge

JOBS_SUBMITTED = Counter("florence2_jobs_submitted_total", "Jobs enqueued", ["model"])
OPEN_STREAMS = Gauge("florence2_open_event_streams", "Run and Watch streams open (all share one Redis subscription)")
