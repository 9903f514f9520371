"""Prometheus metrics of a worker (served on `florence2 worker --metrics-port`).

Jobs by outcome, the time each stage of a job took, batch sizes, running jobs, and what the worker
holds (model kind, dtype, attention, load time, GPU memory). Listed in README's "Observability".
"""

from __future__ import annotations

from prometheus_client import REGISTRY, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily

from florence2_serve.common import metrics as shared

STAGE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800)

JOBS_ENDED = shared.JOBS_ENDED
STAGE_SECONDS = Histogram("florence2_job_stage_seconds",
                          "Seconds a job spent per stage: queue_wait, preprocess, generate, postprocess, end_to_end",
                          ["model", "stage"], buckets=STAGE_BUCKETS)
BATCH_SIZE = Histogram("florence2_batch_size", "Jobs per generate call", ["model"],
                       buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
RUNNING_JOBS = Gauge("florence2_running_jobs", "Jobs this worker's model is running now", ["model"])
WORKER_INFO = Gauge("florence2_worker_info", "What this worker holds (always 1)",
                    ["model", "worker_id", "kind", "dtype", "attention", "device", "engine"])
LOAD_SECONDS = Gauge("florence2_worker_load_seconds", "Seconds the model took to load", ["model"])
GPU_MEMORY = Gauge("florence2_worker_gpu_memory_bytes", "CUDA memory of this worker's device (torch)",
                   ["model", "kind"])

OUTCOMES = {"SUCCEEDED": "succeeded", "FAILED": "failed", "CANCELLED": "cancelled", "EXPIRED": "expired"}


def describe_worker(model: str, worker_id: str, loaded, engine: str) -> None:
    WORKER_INFO.labels(model, worker_id, loaded.kind, loaded.dtype_name, loaded.attention, str(loaded.device),
                       engine).set(1)
    LOAD_SECONDS.labels(model).set(loaded.load_seconds)
    device = loaded.device
    if getattr(device, "type", "") == "cuda":
        import torch

        GPU_MEMORY.labels(model, "allocated").set_function(lambda: torch.cuda.memory_allocated(device))
        GPU_MEMORY.labels(model, "reserved").set_function(lambda: torch.cuda.memory_reserved(device))


class DecodeSteps:
    """`florence2_decode_steps_total`: the decode engines' steps, read from their own counters at scrape time
    (a step pays nothing for it). Jobs per second over steps per second is how many requests a step carried."""

    def __init__(self):
        self.engines: dict[str, object] = {}

    def collect(self):
        family = CounterMetricFamily("florence2_decode_steps", "Decoding steps the decode engine ran (one step "
                                     "advances every request decoding at that moment)", labels=["model"])
        for model, engine in self.engines.items():
            family.add_metric([model], engine.steps_run)
        yield family


DECODE_STEPS = DecodeSteps()
REGISTRY.register(DECODE_STEPS)


def count_decode_steps(model: str, engine) -> None:
    DECODE_STEPS.engines[model] = engine


def job_ended(model: str, task: str, state: str, reason: str = "") -> None:
    JOBS_ENDED.labels(model, task, OUTCOMES.get(state, state.lower()), reason).inc()


def job_stages(model: str, timings, end_to_end_s: float) -> None:
    for stage, ms in (("queue_wait", timings.queue_ms), ("preprocess", timings.preprocess_ms),
                      ("generate", timings.generate_ms), ("postprocess", timings.postprocess_ms)):
        STAGE_SECONDS.labels(model, stage).observe(ms / 1000)
    STAGE_SECONDS.labels(model, "end_to_end").observe(end_to_end_s)
