"""`florence2 serve` (the front end alone) and `florence2 up` (Redis, front end and workers on one machine)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

def _server_options(function):
    for option in reversed([
        click.option("--address", default=None, help="host:port to listen on (env FLORENCE2_ADDRESS)."),
        click.option("--max-message-bytes", type=int, default=None,
                     help="gRPC message limit (env FLORENCE2_MAX_MESSAGE_BYTES; default 32 MiB)."),
        click.option("--max-image-bytes", type=int, default=None,
                     help="Largest encoded image (env FLORENCE2_MAX_IMAGE_BYTES; default 30 MiB)."),
        click.option("--max-image-pixels", type=int, default=None,
                     help="Largest image in pixels (env FLORENCE2_MAX_IMAGE_PIXELS; default 50,000,000)."),
        click.option("--max-queue-depth", type=int, default=None,
                     help="Jobs a model's queues may hold (env FLORENCE2_MAX_QUEUE_DEPTH; default 10,000)."),
        click.option("--result-ttl", "result_ttl_s", type=int, default=None, help="Seconds jobs and results are kept."),
        click.option("--job-timeout", "job_timeout_s", type=int, default=None,
                     help="Longest a job may run once started (env FLORENCE2_JOB_TIMEOUT; default 3600, 0: none)."),
        click.option("--token", default=None,
                     help="Require this bearer token; comma-separated for several, e.g. during rotation "
                          "(env FLORENCE2_TOKEN)."),
        click.option("--token-file", default=None,
                     help="Also accept the tokens in this file, one per line, re-read when it changes "
                          "(env FLORENCE2_TOKEN_FILE)."),
        click.option("--tls-cert", default=None, help="Serve gRPC over TLS: certificate chain, PEM (env FLORENCE2_TLS_CERT)."),
        click.option("--tls-key", default=None, help="TLS private key, PEM (env FLORENCE2_TLS_KEY)."),
        click.option("--tls-client-ca", default=None,
                     help="Require client certificates signed by this CA, PEM: mutual TLS (env FLORENCE2_TLS_CLIENT_CA)."),
        click.option("--reflection/--no-reflection", default=None,
                     help="Serve gRPC reflection (default on; env FLORENCE2_REFLECTION). Health stays on."),
        click.option("--metrics-port", type=int, default=None,
                     help="Serve Prometheus metrics on this port (env FLORENCE2_METRICS_PORT; default off)."),
        click.option("--metrics-host", default=None,
                     help="Host the metrics listener binds (env FLORENCE2_METRICS_HOST; default: the gRPC host)."),
        click.option("--http-port", type=click.IntRange(0, 65535), default=None,
                     help="Serve HTTP/JSON, the event streams as SSE, and the playground page on this port "
                          "(env FLORENCE2_HTTP_PORT; default 8080, or a free port when --address's port is 0)."),
        click.option("--no-http", is_flag=True, default=False, help="Serve gRPC only."),
        click.option("--http-host", default=None,
                     help="Host the HTTP listener binds (env FLORENCE2_HTTP_HOST; default: the gRPC host)."),
        click.option("--http-cors-origin", "http_cors_origins", multiple=True,
                     help="Let pages from this origin call the HTTP API (repeatable, or *; env "
                          "FLORENCE2_HTTP_CORS_ORIGINS, comma-separated; default none)."),
        click.option("--health-port", type=click.IntRange(0, 65535), default=None,
                     help="Also serve /healthz and /readyz alone, plaintext and without tokens, on this port, for "
                          "probes that cannot do TLS or mTLS (env FLORENCE2_HEALTH_PORT; default off)."),
        click.option("--health-host", default=None,
                     help="Host the probe listener binds (env FLORENCE2_HEALTH_HOST; default: the gRPC host)."),
        click.option("--redis-wait-replicas", type=click.IntRange(0, 16), default=None,
                     help="Answer Submit only once this many Redis replicas hold the job (WAIT): no acknowledged job "
                          "is lost when a Sentinel failover replaces the primary (env FLORENCE2_REDIS_WAIT_REPLICAS; "
                          "default 0)."),
        click.option("--redis-wait-timeout-ms", type=click.IntRange(1), default=None,
                     help="How long Submit waits for them before answering UNAVAILABLE (env "
                          "FLORENCE2_REDIS_WAIT_TIMEOUT_MS; default 1000)."),
        click.option("--http-read-timeout", "http_read_timeout_s", type=float, default=None,
                     help="Seconds an HTTP request body may take to arrive (env FLORENCE2_HTTP_READ_TIMEOUT; "
                          "default 60)."),
    ]):
        function = option(function)
    return function


def _http_choice(options: dict) -> dict:
    """The HTTP flags as settings: --no-http is port -1; several --http-cors-origin one comma-separated value."""
    origins = options.pop("http_cors_origins", ())
    if origins:
        options["http_cors_origins"] = ",".join(origins)
    if options.pop("no_http", False):
        options["http_port"] = -1
    return options


@click.command()
@click.option("--redis-url", envvar="REDIS_URL", default=None,
              help="Redis the workers share (env REDIS_URL; default redis://127.0.0.1:6379/0).")
@_server_options
def serve(redis_url, **options):
    """The gRPC front end alone (workers run elsewhere, pointed at the same Redis)."""
    import asyncio

    from florence2_serve.server.app import AddressInUse, RedisUnreachable
    from florence2_serve.server.app import serve as serve_forever
    from florence2_serve.server.settings import ServerSettings

    from florence2_serve.common.tracing import setup_tracing

    setup_tracing("florence2-frontend")
    say = _sayer()
    try:
        settings = ServerSettings.from_env(redis_url=redis_url, **_http_choice(options))

        def ready(front_end):
            http = f"; HTTP at {front_end.http_url}" if front_end.http_url else ""
            say(f"listening on port {front_end.port}{http}")

        asyncio.run(serve_forever(settings, ready=ready))
    except (AddressInUse, RedisUnreachable, ValueError) as exc:
        say(str(exc), error=True)
        sys.exit(1)


DASHBOARD_PORT = 9181


def stderr_as_json_lines() -> bool:
    """Is this process logging JSON? Then a long-running command also turns its stderr into JSON Lines."""
    if (click.get_current_context().find_root().obj or {}).get("log_format") != "json":
        return False
    from florence2_serve.common.log_setup import json_lines_on_stderr

    json_lines_on_stderr()
    return True


def _sayer():
    """`up`'s lines for people on stderr; with --log-format json, log records (the stream stays JSON Lines)."""
    import logging

    if not stderr_as_json_lines():
        return lambda message, error=False: click.echo(("error: " if error else "") + message, err=True)
    log = logging.getLogger("florence2_serve.cli")
    return lambda message, error=False: (log.error if error else log.info)(message)


@click.command()
@click.option("--model", "models", multiple=True, help="[NAME=]PATH_OR_ID (repeatable).",
              default=["base=florence-community/Florence-2-base"], show_default=True)
@click.option("--workers", type=click.IntRange(1, 64), default=1, show_default=True, help="Workers per model.")
@click.option("--device", default=None, help="Worker device (auto, cpu, cuda:0, ...).")
@click.option("--dtype", type=click.Choice(["auto", "fp16", "bf16", "fp32"]), default=None,
              help="Workers' weights dtype; auto: fp16 on CUDA, fp32 on CPU.")
@click.option("--attention", type=click.Choice(["eager", "sdpa"]), default=None,
              help="Workers' attention implementation (default eager).")
@click.option("--batch-size", type=int, default=None, help="Most jobs decoding at once, per worker (default 8).")
@click.option("--kind", type=click.Choice(["auto", "native", "remote", "yolo", "noop"]), default=None,
              help="Checkpoint kind (default auto: read from config.json).")
@click.option("--engine", type=click.Choice(["auto", "decode", "generate"]), default=None,
              help="Workers' Florence-2 decoding (default auto: the decode engine for native models).")
@click.option("--compile/--no-compile", "compile_step", default=None,
              help="torch.compile the workers' decode step (default off).")
@click.option("--image-backend", type=click.Choice(["auto", "pil", "torchvision"]), default=None,
              help="Workers' image preprocessing (default auto: PIL for converted Microsoft-format checkpoints).")
@click.option("--job-heartbeat-ttl", type=int, default=None,
              help="Workers' job heartbeat TTL in seconds (default 4; a worker that keeps its Redis connection "
                   "is not condemned by it, see --silent-worker-limit of `worker`).")
@click.option("--silent-worker-limit", type=float, default=None,
              help="Seconds a connected but silent worker keeps its jobs (default 60).")
@click.option("--redis-url", envvar="REDIS_URL", default=None,
              help="Use this Redis (env REDIS_URL) instead of starting an embedded one.")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), envvar="FLORENCE2_DATA_DIR",
              default=None, help="Embedded Redis keeps its data here (append-only file, fsync every second); "
                                 "default $XDG_DATA_HOME/florence2-serve/redis (env FLORENCE2_DATA_DIR).")
@click.option("--in-memory", is_flag=True, help="Embedded Redis keeps nothing across restarts.")
@click.option("--redis-maxmemory", default=None,
              help="Embedded Redis's maxmemory, e.g. 4gb (default: a quarter of this machine's memory); when full it "
                   "refuses new jobs (QUEUE_FULL) and never evicts a queued one.")
@click.option("--worker-metrics-port", type=click.IntRange(1, 65535), envvar="FLORENCE2_WORKER_METRICS_PORT",
              default=None,
              help="Worker i serves its Prometheus metrics on this port + i (env FLORENCE2_WORKER_METRICS_PORT); "
                   "default: a free port each. The ports are printed.")
@click.option("--dashboard", is_flag=True,
              help="Also run rq-dashboard on the queues, on 127.0.0.1 (needs the dashboard extra).")
@click.option("--dashboard-port", type=click.IntRange(1, 65535), default=DASHBOARD_PORT, show_default=True,
              help="rq-dashboard's port (with --dashboard).")
@_server_options
def up(models, workers, device, dtype, attention, batch_size, kind, engine, compile_step, image_backend,
       job_heartbeat_ttl, silent_worker_limit, redis_url, data_dir, redis_maxmemory, in_memory, worker_metrics_port,
       dashboard, dashboard_port, address, **server_options):
    """Everything on one machine: Redis (embedded unless --redis-url), front end, N workers per model.

    Ctrl-C or SIGTERM: workers finish their jobs, then the front end stops, then Redis; a second
    Ctrl-C makes the workers stop now and put their unfinished jobs back in the queue.
    """
    import signal
    import threading

    from florence2_serve.common.redis_url import redact
    from florence2_serve.server.app import AddressInUse, check_free
    from florence2_serve.server.stack import LocalStack, StackConfig, StackError, default_data_dir

    say = _sayer()
    worker_args = []
    for flag, value in (("--device", device), ("--dtype", dtype), ("--attention", attention),
                        ("--batch-size", batch_size), ("--kind", kind), ("--engine", engine),
                        ("--image-backend", image_backend), ("--job-heartbeat-ttl", job_heartbeat_ttl),
                        ("--silent-worker-limit", silent_worker_limit),
                        ("--log-format", (click.get_current_context().find_root().obj or {}).get("log_format"))):
        if value is not None:
            worker_args += [flag, str(value)]
    if compile_step is not None:
        worker_args.append("--compile" if compile_step else "--no-compile")
    if in_memory and data_dir is not None:
        raise click.BadParameter("--in-memory and --data-dir exclude each other")
    config = StackConfig(
        models=list(models), workers=workers, redis_url=redis_url or None,
        data_dir=None if in_memory or redis_url else (data_dir or default_data_dir()), redis_maxmemory=redis_maxmemory,
        address=address or "127.0.0.1:50051", worker_args=worker_args, worker_metrics_port=worker_metrics_port,
        server_settings={k: v for k, v in _http_choice(server_options).items() if v is not None},
    )
    board_runner = None
    if dashboard:
        board_runner = _dashboard_runner()
        try:
            check_free(f"127.0.0.1:{dashboard_port}")
        except AddressInUse:
            say(f"cannot serve rq-dashboard on 127.0.0.1:{dashboard_port}: the port is in use "
                "(choose another with --dashboard-port)", error=True)
            sys.exit(1)
    from florence2_serve.common.tracing import setup_tracing

    setup_tracing("florence2-frontend")
    stop = threading.Event()
    stack_ref: list = []

    def on_signal(*_):
        if stop.is_set() and stack_ref:
            say("stopping now: unfinished jobs go back to the queue")
            stack_ref[0].hurry()
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    try:
        stack = LocalStack(config)
        stack_ref.append(stack)
        with stack:
            names = ", ".join(name for name, _ in stack.specs)
            http = stack.http_url
            say(f"florence2 serving {names} at {stack.address}{f' and {http}' if http else ''} "
                f"(redis {redact(stack.redis_url)}); Ctrl-C stops")
            say("worker metrics: " + ", ".join(f"{name} #{index} http://127.0.0.1:{port}/metrics"
                                               for (name, index), port in stack.metrics_ports.items()))
            board = _start_dashboard(board_runner, stack.redis_url, dashboard_port, say) if dashboard else None
            click.echo(stack.address)
            if http:
                click.echo(http)
            try:
                while not stop.wait(0.5):
                    pass
            finally:
                if board is not None:
                    board.terminate()
                    board.wait(timeout=10)
            say("stopping: workers finish their jobs, then the front end, then Redis")
        say("stopped")
    except StackError as exc:
        say(str(exc), error=True)
        sys.exit(1)


def _dashboard_runner() -> str:
    import shutil

    executable = Path(sys.executable).parent / "rq-dashboard"
    found = str(executable) if executable.exists() else shutil.which("rq-dashboard")
    if not found:
        raise click.UsageError("--dashboard needs rq-dashboard: pip install 'florence2-serve[dashboard]'")
    return found


def _start_dashboard(executable: str, redis_url: str, port: int, say, timeout_s: float = 20.0):
    """rq-dashboard on the stack's Redis, on 127.0.0.1 (a child of `up`, stopped with it). Its URL is printed
    once it answers; if it exits first (its port taken meanwhile, a broken install), one error line."""
    import subprocess
    import threading
    import time
    import urllib.request

    from florence2_serve.common.redis_url import master_url

    # rq-dashboard takes plain URLs only: behind Sentinel it gets the master of now (not followed later).
    process = subprocess.Popen([executable, "--redis-url", master_url(redis_url), "--bind", "127.0.0.1",
                                "--port", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    collected: list[str] = []
    threading.Thread(target=_relay, args=(process.stderr, collected), daemon=True).start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while process.poll() is None and time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2).close()
            say(f"rq-dashboard at {url}")
            return process
        except OSError:
            time.sleep(0.2)
    if process.poll() is None:
        process.terminate()
        process.wait(timeout=10)
    time.sleep(0.2)  # its last lines reach the relay
    lines = [line for line in collected if line.strip()]
    say(f"rq-dashboard did not start on port {port}"
        + (f": {lines[-1].strip()}" if lines else "") + "; the stack runs on without it", error=True)
    return None


def _relay(stream, collected: list[str]) -> None:
    """rq-dashboard's stderr, read to its end (it must never block on a full pipe), logged at DEBUG."""
    import logging

    log = logging.getLogger("rq_dashboard")
    for line in stream:
        collected.append(line)
        del collected[:-20]
        log.debug("%s", line.rstrip())
