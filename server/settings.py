"""Front-end settings: one typed object, from flags and environment variables."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields

from florence2_serve.common.images import DEFAULT_MAX_PIXELS

MiB = 1024 * 1024


@dataclass(frozen=True)
class ServerSettings:
    redis_url: str = "redis://127.0.0.1:6379/0"
    address: str = "127.0.0.1:50051"
    # gRPC message limit: large enough for a 20 MB photo plus the request around it.
    max_message_bytes: int = 32 * MiB
    max_image_bytes: int = 30 * MiB
    max_image_pixels: int = DEFAULT_MAX_PIXELS
    max_queue_depth: int = 10_000
    result_ttl_s: int = 3600
    # Longest a worker may run a job once it started (also rq's job timeout): past it the job stops
    # at its next decoding step and ends FAILED, the limit named. 0: no limit.
    job_timeout_s: int = 3600
    # Re-runs of a job whose worker died while running it; then it ends FAILED with the reason.
    max_retries: int = 2
    # Bearer token required in `authorization` metadata; empty: no auth.
    token: str = ""
    metrics_port: int = 0  # 0: no Prometheus endpoint
    health_interval_s: float = 1.0
    # CancelJob waits this long for a running job to stop, so its reply is normally CANCELLED.
    cancel_wait_s: float = 2.0
    # A quiet Watch reads its job's stream itself this often (and notices an expired job).
    watch_check_s: float = 30.0
    # Decoded pixels the front end's image checks may hold at once (others wait): bounds its memory
    # (about 3 bytes a pixel) whatever arrives together. Never below max_image_pixels in effect.
    image_check_pixels: int = 60_000_000

    ENV = {
        "redis_url": "REDIS_URL", "address": "FLORENCE2_ADDRESS",
        "max_message_bytes": "FLORENCE2_MAX_MESSAGE_BYTES", "max_image_bytes": "FLORENCE2_MAX_IMAGE_BYTES",
        "max_image_pixels": "FLORENCE2_MAX_IMAGE_PIXELS", "max_queue_depth": "FLORENCE2_MAX_QUEUE_DEPTH",
        "result_ttl_s": "FLORENCE2_RESULT_TTL", "job_timeout_s": "FLORENCE2_JOB_TIMEOUT",
        "max_retries": "FLORENCE2_MAX_RETRIES",
        "token": "FLORENCE2_TOKEN", "metrics_port": "FLORENCE2_METRICS_PORT",
        "image_check_pixels": "FLORENCE2_IMAGE_CHECK_PIXELS",
    }

    @classmethod
    def from_env(cls, environ=None, **overrides) -> "ServerSettings":
        """Environment first, then explicit overrides (flags); None overrides are ignored."""
        environ = os.environ if environ is None else environ
        values = {}
        types = {f.name: f.type for f in fields(cls)}
        for name, var in cls.ENV.items():
            if var in environ and environ[var] != "":
                values[name] = _coerce(environ[var], types[name], var)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def __post_init__(self):
        for name in ("max_message_bytes", "max_image_bytes", "max_image_pixels", "max_queue_depth", "result_ttl_s",
                     "image_check_pixels"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        for name in ("job_timeout_s", "max_retries", "cancel_wait_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")


def _coerce(raw: str, kind, var: str):
    kind = kind if isinstance(kind, str) else kind.__name__
    try:
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
    except ValueError:
        raise ValueError(f"{var}={raw!r} is not a valid {kind}") from None
    return raw
