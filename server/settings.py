"""Front-end settings: one typed object, from flags and environment variables."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields

from florence2_serve.common.images import DEFAULT_MAX_PIXELS

MiB = 1024 * 1024
AUTO_HTTP_PORT, DEFAULT_HTTP_PORT = -2, 8080


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
    # Bearer tokens accepted in `authorization` metadata (comma-separated: several, for rotation), and
    # a file of more (one per line, re-read when it changes); neither: no auth.
    token: str = ""
    token_file: str = ""
    metrics_port: int = 0  # 0: no Prometheus endpoint
    # The metrics listener's host; empty: the gRPC address's host.
    metrics_host: str = ""
    # TLS for the gRPC listener: certificate chain and key (PEM files); with a client CA, clients must
    # present a certificate it signed (mutual TLS).
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""
    # Server reflection (v1 and v1alpha); health stays on either way.
    reflection: bool = True
    health_interval_s: float = 1.0
    # CancelJob waits this long for a running job to stop, so its reply is normally CANCELLED.
    cancel_wait_s: float = 2.0
    # A quiet Watch reads its job's stream itself this often (and notices an expired job).
    watch_check_s: float = 30.0
    # Decoded pixels the front end's image checks may hold at once (others wait): bounds its memory
    # (about 3 bytes a pixel) whatever arrives together. Never below max_image_pixels in effect.
    image_check_pixels: int = 60_000_000
    # The HTTP/JSON port (server/http_api.py): -1 off, 0 a free port; AUTO_HTTP_PORT: 8080, or a free port
    # when the gRPC port is 0 (so tests and second stacks never collide on it). Host: empty is the gRPC host.
    http_port: int = AUTO_HTTP_PORT
    http_host: str = ""
    # Origins allowed to call the HTTP API from a browser page of theirs (comma-separated, or *); empty: none.
    http_cors_origins: str = ""
    # An HTTP request body must arrive within this (a slow uploader is cut off; nothing is queued).
    http_read_timeout_s: float = 60.0
    # /healthz and /readyz alone, plaintext and without tokens, on this port (0: off) for kubelet's probes,
    # which cannot present a client certificate; host: empty is the gRPC host.
    health_port: int = 0
    health_host: str = ""
    # Submit answers only once this many Redis replicas hold the job (WAIT), within the timeout; 0: at once
    # (asynchronous replication: a primary that dies right after answering may take the job with it).
    redis_wait_replicas: int = 0
    redis_wait_timeout_ms: int = 1000
    # A quiet event stream sends an SSE comment this often, so proxies keep it open.
    http_keepalive_s: float = 15.0

    ENV = {
        "redis_url": "REDIS_URL", "address": "FLORENCE2_ADDRESS",
        "max_message_bytes": "FLORENCE2_MAX_MESSAGE_BYTES", "max_image_bytes": "FLORENCE2_MAX_IMAGE_BYTES",
        "max_image_pixels": "FLORENCE2_MAX_IMAGE_PIXELS", "max_queue_depth": "FLORENCE2_MAX_QUEUE_DEPTH",
        "result_ttl_s": "FLORENCE2_RESULT_TTL", "job_timeout_s": "FLORENCE2_JOB_TIMEOUT",
        "max_retries": "FLORENCE2_MAX_RETRIES",
        "token": "FLORENCE2_TOKEN", "token_file": "FLORENCE2_TOKEN_FILE", "metrics_port": "FLORENCE2_METRICS_PORT",
        "metrics_host": "FLORENCE2_METRICS_HOST", "tls_cert": "FLORENCE2_TLS_CERT", "tls_key": "FLORENCE2_TLS_KEY",
        "tls_client_ca": "FLORENCE2_TLS_CLIENT_CA", "reflection": "FLORENCE2_REFLECTION",
        "image_check_pixels": "FLORENCE2_IMAGE_CHECK_PIXELS",
        "http_port": "FLORENCE2_HTTP_PORT", "http_host": "FLORENCE2_HTTP_HOST",
        "http_cors_origins": "FLORENCE2_HTTP_CORS_ORIGINS", "http_read_timeout_s": "FLORENCE2_HTTP_READ_TIMEOUT",
        "health_port": "FLORENCE2_HEALTH_PORT", "health_host": "FLORENCE2_HEALTH_HOST",
        "redis_wait_replicas": "FLORENCE2_REDIS_WAIT_REPLICAS",
        "redis_wait_timeout_ms": "FLORENCE2_REDIS_WAIT_TIMEOUT_MS",
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
        if self.http_port == AUTO_HTTP_PORT:
            grpc_port = self.address.rpartition(":")[2]
            object.__setattr__(self, "http_port", 0 if grpc_port == "0" else DEFAULT_HTTP_PORT)
        if self.http_port < -1 or self.http_port > 65535:
            raise ValueError("http_port must be a port number (0: a free one; -1: no HTTP port)")
        if self.redis_wait_replicas < 0 or self.redis_wait_timeout_ms <= 0:
            raise ValueError("redis_wait_replicas must not be negative and redis_wait_timeout_ms must be positive")
        if not 0 <= self.health_port <= 65535:
            raise ValueError("health_port must be a port number (0: no probe listener)")
        if self.http_read_timeout_s <= 0 or self.http_keepalive_s <= 0:
            raise ValueError("http_read_timeout_s and http_keepalive_s must be positive")
        for name in ("job_timeout_s", "max_retries", "cancel_wait_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("TLS needs both a certificate (--tls-cert) and its key (--tls-key)")
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
        for name in ("tls_cert", "tls_key", "tls_client_ca", "token_file"):
            if getattr(self, name) and not os.path.isfile(getattr(self, name)):
                raise ValueError(f"{name} {getattr(self, name)}: no such file")

    @property
    def metrics_bind_host(self) -> str:
        return self.metrics_host or self.address.rpartition(":")[0].strip("[]") or "127.0.0.1"

    @property
    def http_bind_host(self) -> str:
        return self.http_host or self.address.rpartition(":")[0].strip("[]") or "127.0.0.1"

    @property
    def health_bind_host(self) -> str:
        return self.health_host or self.address.rpartition(":")[0].strip("[]") or "127.0.0.1"

    @property
    def auth_enabled(self) -> bool:
        return bool(self.token or self.token_file)


def _coerce(raw: str, kind, var: str):
    kind = kind if isinstance(kind, str) else kind.__name__
    if kind == "bool":
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{var}={raw!r} is not a boolean (1/0, true/false)")
    try:
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
    except ValueError:
        raise ValueError(f"{var}={raw!r} is not a valid {kind}") from None
    return raw
