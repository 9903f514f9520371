"""Prometheus metrics of the front end (served on --metrics-port when set)."""

from prometheus_client import Counter

JOBS_SUBMITTED = Counter("florence2_jobs_submitted_total", "Jobs enqueued", ["model"])
