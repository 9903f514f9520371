"""Worker settings: one typed object per process, from flags and environment variables."""

from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass, field

from florence2_serve.common.model_arg import parse_model_arg


def _default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


@dataclass(frozen=True)
class WorkerSettings:
    model_name: str
    model_path: str
    redis_url: str = "redis://127.0.0.1:6379/0"
    device: str = "auto"
    dtype: str = "auto"
    attention: str = "eager"
    kind: str = "auto"
    batch_size: int = 8
    batch_wait_ms: float = 5.0
    result_ttl_s: int = 3600
    worker_id: str = field(default_factory=_default_worker_id)
    # Presence: the registration (and rq's heartbeat of held jobs) is written every heartbeat_s.
    heartbeat_s: float = 1.0
    registration_ttl_s: int = 10
    # How often held jobs' cancel flags are read (each decoding step sees the latest value).
    cancel_poll_ms: float = 20.0
    # A held job whose worker stops heartbeating for this long is abandoned; the next maintenance
    # (every maintenance_interval_s, on any live worker) re-runs it at the front of its queue.
    job_heartbeat_ttl_s: int = 4
    # ... unless its worker still holds a Redis connection (alive, but starved of CPU or paused): then
    # its jobs are kept for it for up to this long (worker/lost_jobs.py).
    silent_worker_limit_s: float = 60.0
    maintenance_interval_s: float = 1.0
    # rq's own worker registration TTL (rq adds 60 s).
    rq_worker_ttl_s: int = 20
    # Longest an idle worker blocks on its wake list before looking at the queues itself.
    wake_timeout_s: float = 0.5
    # Exit (SIGTERM) when the process that started this worker dies (used by `florence2 up`).
    exit_with_parent: bool = False
    # Prometheus metrics on this port (0: none), bound to metrics_host.
    metrics_port: int = 0
    metrics_host: str = "127.0.0.1"
    # Florence-2 decoding: "decode" (iteration-level batching on a static KV cache, native models), "generate"
    # (transformers' generate per batch), "auto" (decode where it applies).
    engine: str = "auto"
    # torch.compile the decode step (CUDA graphs on a GPU).
    compile: bool = False
    # Where Microsoft-format checkpoints converted on load are kept (None: ~/.cache/florence2-serve/converted).
    convert_cache: str | None = None
    # How images become pixels: auto (PIL for converted Microsoft-format checkpoints, as their reference
    # computes them; transformers' default otherwise), pil or torchvision.
    image_backend: str = "auto"
    # Before registering, check the decode engine against generate on this device (worker/canary.py).
    canary: bool = True
    # Decode engine: processes that decode images and make their pixels (0: the fetcher thread does it).
    # None: one on a CUDA device (the cores are free, the worker's GIL is not), none on CPU, where a process
    # cost more CPU than it saved on the 2-core benchmark machine (bench/RESULTS.md §6).
    image_workers: int | None = None

    @classmethod
    def from_env(cls, model: str, environ=None, **overrides) -> "WorkerSettings":
        environ = os.environ if environ is None else environ
        name, path = parse_model_arg(model)
        values = {"model_name": name, "model_path": path}
        if environ.get("REDIS_URL"):
            values["redis_url"] = environ["REDIS_URL"]
        if environ.get("FLORENCE2_RESULT_TTL"):
            values["result_ttl_s"] = int(environ["FLORENCE2_RESULT_TTL"])
        if environ.get("FLORENCE2_WORKER_METRICS_PORT"):
            values["metrics_port"] = int(environ["FLORENCE2_WORKER_METRICS_PORT"])
        if environ.get("FLORENCE2_WORKER_METRICS_HOST"):
            values["metrics_host"] = environ["FLORENCE2_WORKER_METRICS_HOST"]
        if environ.get("FLORENCE2_WORKER_IMAGE_WORKERS"):
            values["image_workers"] = int(environ["FLORENCE2_WORKER_IMAGE_WORKERS"])
        if environ.get("FLORENCE2_CONVERT_CACHE"):
            values["convert_cache"] = environ["FLORENCE2_CONVERT_CACHE"]
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    @property
    def idle_registration_s(self) -> float:
        """How long the worker stays registered as idle (rq_bridge TAKE) without renewing it: an idle
        worker renews it every wake timeout; one that died lapses soon after."""
        return 2 * self.wake_timeout_s + 1.0

    def __post_init__(self):
        if not 1 <= self.batch_size <= 256:
            raise ValueError(f"batch size must be between 1 and 256, got {self.batch_size}")
        if self.batch_wait_ms < 0:
            raise ValueError("batch wait must not be negative")
        if self.job_heartbeat_ttl_s < 2 * self.heartbeat_s:
            raise ValueError(f"job heartbeat TTL ({self.job_heartbeat_ttl_s} s) must be at least twice the "
                             f"heartbeat interval ({self.heartbeat_s:g} s)")
        if self.image_backend not in ("auto", "pil", "torchvision"):
            raise ValueError(f"image backend must be auto, pil or torchvision, got {self.image_backend!r}")
        if self.engine not in ("auto", "decode", "generate"):
            raise ValueError(f"engine must be auto, decode or generate, got {self.engine!r}")
        if not self.worker_id or any(c.isspace() or not c.isprintable() or not c.isascii() for c in self.worker_id):
            raise ValueError(f"worker id must be printable ASCII without spaces (it names the worker's Redis "
                             f"connections), got {self.worker_id!r}")
        if self.image_workers is not None and not 0 <= self.image_workers <= 64:
            raise ValueError(f"image workers must be between 0 and 64, got {self.image_workers}")
        if self.silent_worker_limit_s < 0:
            raise ValueError("silent worker limit must not be negative")
        if self.maintenance_interval_s <= 0:
            raise ValueError("maintenance interval must be positive")
