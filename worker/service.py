"""The worker process: check Redis, load the model once, register, batch jobs until told to stop.

SIGTERM or SIGINT: stop taking jobs, finish every job held, exit 0. A second one: interrupt
generation at the next step, put every unfinished job back at the front of its queue, exit 0.
With --exit-with-parent (how `up` starts its workers), the death of the parent is the second kind
at once: stop now, requeue, exit.
"""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import socket
import time

import redis

from florence2_serve.common import redis_layout as layout
from florence2_serve.common.images import reuse_image_memory
from florence2_serve.common.log_setup import route_library_logs
from florence2_serve.common.redis_url import connect, redact
from florence2_serve.common.rq_bridge import check_rq_version

from .settings import WorkerSettings

log = logging.getLogger(__name__)


class RedisUnreachable(RuntimeError):
    """The worker's REDIS_URL does not answer; the message names it."""


def check_redis(url: str, timeout_s: float = 3.0, client_name: str | None = None) -> redis.Redis:
    """A connection to `url`, or RedisUnreachable in one line (before minutes go into loading a model).

    `client_name` names every connection of its pool (CLIENT SETNAME): other workers tell a live worker
    from a dead one by it (worker/lost_jobs.py)."""
    try:
        connection = connect(url, socket_connect_timeout=timeout_s, health_check_interval=10, client_name=client_name)
    except ValueError as exc:
        raise RedisUnreachable(f"cannot use Redis at {redact(url)}: {exc}") from None
    try:
        connection.ping()
    except (redis.RedisError, OSError, ValueError) as exc:
        connection.close()
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise RedisUnreachable(f"cannot reach Redis at {redact(url)}: {reason}") from None
    return connection


def engine_name(engine) -> str:
    """decode | generate | yolo | noop: what ListModels, metrics and doctor say serves (without importing
    the decode engine, and so torch, into a worker that does not use it)."""
    if getattr(engine, "continuous", False):
        return "decode"
    return "generate" if engine.kind == "florence2" else engine.kind


def _checked_engine(engine, loaded, settings: WorkerSettings):
    """(engine to serve with, note): the decode engine only after it passed the start-up canary."""
    if not getattr(engine, "continuous", False) or not settings.canary:
        return engine, ""
    from .canary import check_decode_engine
    from .engine import Florence2Engine

    reference = Florence2Engine(loaded)
    report = check_decode_engine(engine, reference)
    return (engine, "") if report.engine == "decode" else (reference, report.note)


def describe(settings: WorkerSettings, loaded, engine, tokenizer_digest: str = "", engine_note: str = "") -> dict:
    """The worker's registration: who it is and what its model can do (ListModels and Submit read it)."""
    return {
        "model": settings.model_name, "model_id": loaded.model_id, "model_revision": loaded.revision,
        "kind": loaded.kind, "device": str(loaded.device), "dtype": loaded.dtype_name,
        "attention": loaded.attention, "random_weights": "1" if loaded.random_weights else "0",
        "batch_size": settings.batch_size, "host": socket.gethostname(), "started": time.time(),
        "tasks": ",".join(task.name for task in engine.tasks), "max_new_tokens": engine.max_new_tokens_limit,
        "max_text_tokens": engine.max_text_tokens, "tokenizer": tokenizer_digest,
        "source_format": loaded.source_format, "converted": "1" if loaded.converted else "0",
        "engine": engine_name(engine), "engine_note": engine_note,
    }


# Published tokenizers outlive a worker restart; any worker of the model publishes it again.
TOKENIZER_TTL_S = 7 * 24 * 3600


def publish_tokenizer(connection: redis.Redis, engine) -> str:
    """Store the engine's tokenizer for the front end (keyed by its digest); the digest, or ""."""
    text = engine.tokenizer_json()
    if not text:
        return ""
    digest = hashlib.sha256(text.encode()).hexdigest()[:32]
    connection.set(layout.tokenizer_key(digest), text, ex=TOKENIZER_TTL_S)
    return digest


def _exit_with_parent() -> None:
    """Linux: have the kernel send SIGTERM when our parent exits. The signal handler tells that from
    an ordinary SIGTERM by our parent having changed, and stops now (see run_worker)."""
    from .os_hooks import die_with_parent

    if not die_with_parent(signal.SIGTERM, os.getppid()):
        os.kill(os.getpid(), signal.SIGTERM)


def _serve_metrics(settings: WorkerSettings, loaded, engine) -> bool:
    from . import metrics

    metrics.describe_worker(settings.model_name, settings.worker_id, loaded, engine_name(engine))
    if hasattr(engine, "steps_run"):
        metrics.count_decode_steps(settings.model_name, engine)
    if not settings.metrics_port:
        return True
    from prometheus_client import start_http_server

    try:
        start_http_server(settings.metrics_port, addr=settings.metrics_host)
    except OSError as exc:
        log.error("cannot serve metrics on %s:%d: %s", settings.metrics_host, settings.metrics_port,
                  exc.strerror or exc)
        return False
    log.info("metrics on http://%s:%d/metrics", settings.metrics_host, settings.metrics_port)
    return True


def run_worker(settings: WorkerSettings) -> int:
    """Returns the exit code: 0 after a clean stop, 2 when the model does not load, 3 without Redis,
    4 when the metrics port is taken."""
    check_rq_version()
    # rq logs every registry clean-up at INFO; maintenance runs every second here.
    logging.getLogger("rq.worker").setLevel(logging.WARNING)
    parent = os.getppid()
    if settings.exit_with_parent:
        _exit_with_parent()
    try:
        connection = check_redis(settings.redis_url, client_name=settings.worker_id)
    except RedisUnreachable as exc:
        log.error("%s", exc)
        return 3
    from . import flash_attn_shim

    flash_attn_shim.install()  # before transformers is imported
    from .backends import create_engine
    from .batch_worker import BatchWorker
    from .loader import LoadOptions, ModelLoadError, load_model

    try:
        loaded = load_model(settings.model_path, LoadOptions(
            device=settings.device, dtype=settings.dtype, attention=settings.attention, kind=settings.kind,
            convert_cache=settings.convert_cache, image_backend=settings.image_backend))
    except (ModelLoadError, ValueError) as exc:
        log.error("%s", exc)
        return 2
    route_library_logs()  # transformers is imported by now: its warnings take our format, once each
    try:
        engine = create_engine(loaded, settings.engine, settings.batch_size, settings.compile)
    except ValueError as exc:
        log.error("%s", exc)
        return 2
    if getattr(engine, "options", None) is not None and engine.options.compile:
        # Compile (and capture CUDA graphs) before registering: the first job must not pay for it.
        log.info("compiling the decode step (%d rows) ...", engine.capacity)
        try:
            log.info("decode step compiled and warmed up in %.1fs", engine.warm_up((1, settings.batch_size)))
        except Exception:  # noqa: BLE001 - a compiler failure costs speed, not the worker
            log.exception("compiling the decode step failed; decoding without compiling")
            engine.use_eager()
    engine, engine_note = _checked_engine(engine, loaded, settings)
    if not _serve_metrics(settings, loaded, engine):
        return 4
    # Images in flight: the batch running, the next one decoded beside it, and a few spare.
    reuse_image_memory(2 * settings.batch_size + 4)
    tokenizer_digest = ""
    while True:
        try:
            tokenizer_digest = publish_tokenizer(connection, engine)
            break
        except (redis.RedisError, OSError) as exc:
            log.warning("cannot publish the tokenizer yet (%s); retrying", str(exc).splitlines()[0])
            time.sleep(1)
    worker = BatchWorker(connection, settings, engine, describe(settings, loaded, engine, tokenizer_digest, engine_note))

    def on_signal(signum, _frame):
        if settings.exit_with_parent and os.getppid() != parent:
            # `up` (or whatever started us) is gone, maybe SIGKILLed, and a supervisor will start a new
            # one at once: a graceful drain would hold Redis and the data directory for minutes.
            log.warning("the process that started this worker died: stopping now; unfinished jobs go back "
                        "to their queues")
            worker.stop(now=True)
        elif worker.stopping:
            log.info("second %s: stopping now; unfinished jobs go back to their queues",
                     signal.Signals(signum).name)
            worker.stop(now=True)
        else:
            log.info("%s: finishing the jobs in hand, taking no more", signal.Signals(signum).name)
            worker.stop()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    while True:
        try:
            worker.register()
            break
        except (redis.RedisError, OSError) as exc:
            if worker.stopping:
                return 0
            log.warning("cannot register with Redis yet (%s); retrying", str(exc).splitlines()[0])
            time.sleep(1)
    log.info("worker %s serving model %s (%s, %s engine) from its queues (batch %d, wait %.1f ms)",
             settings.worker_id, settings.model_name, loaded.kind, type(engine).__name__, settings.batch_size,
             settings.batch_wait_ms)
    try:
        worker.work()
    finally:
        connection.close()
    log.info("worker %s stopped", settings.worker_id)
    return 0
