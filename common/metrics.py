"""The metric both sides write: jobs that ended. Workers count what they end; the front end counts the
jobs it cancels while they are still queued. One definition, so a process holding both (tests, an
all-in-one deployment) registers it once."""

from prometheus_client import Counter

JOBS_ENDED = Counter("florence2_jobs_ended_total", "Jobs that ended, by outcome and reason",
                     ["model", "task", "outcome", "reason"])
