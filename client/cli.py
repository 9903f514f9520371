"""The `florence2` command line.

Client commands (detect, models, job, health) need no torch; worker-side commands (worker, doctor,
make-test-model) import the worker package only when they run.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click


LOG_FORMATS = click.Choice(["text", "json"])


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
@click.option("--log-format", type=LOG_FORMATS, envvar="FLORENCE2_LOG_FORMAT", default="text", show_default=True,
              help="Log lines as text or as JSON objects (env FLORENCE2_LOG_FORMAT).")
@click.version_option(package_name="florence2-serve")
@click.pass_context
def cli(ctx, verbose: bool, log_format: str) -> None:
    """Florence-2 inference service: front end, workers, client."""
    from florence2_serve.common.log_setup import configure_logging

    ctx.obj = {"log_format": log_format}
    configure_logging(logging.DEBUG if verbose else logging.INFO, log_format)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--model", default=None, help="Also load this checkpoint (path or hub id) and run one generate.")
@click.option("--device", default="auto", show_default=True, help="Device for --model: auto, cpu, cuda:0, ...")
@click.option("--attention", type=click.Choice(["eager", "sdpa"]), default="eager", show_default=True,
              help="Attention implementation for --model.")
@click.option("--redis-url", envvar="REDIS_URL", default=None,
              help="Also check this Redis: reachable, version, persistence (env REDIS_URL).")
@click.option("--server", default=None, help="Also check a running front end at host:port: health and models.")
def doctor(as_json: bool, model: str | None, device: str, attention: str, redis_url: str | None,
           server: str | None) -> None:
    """Versions, CUDA, flash-attn status, optional extras, what this environment can run; with flags, a
    Redis, a running server and a model load. Exit 1 when something is broken."""
    from florence2_serve.worker.doctor import collect, render

    report = collect(model=model, device=device, attention=attention, redis_url=redis_url, server=server)
    click.echo(json.dumps(report, indent=2) if as_json else render(report))
    sys.exit(0 if report["ok"] else 1)


@cli.command("make-test-model")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--size", type=click.Choice(["tiny", "base", "large"]), default="tiny", show_default=True,
              help="tiny: seconds to build, for tests; base/large: full-size shapes with random weights, for timing.")
@click.option("--remote-code", is_flag=True,
              help="Build a Microsoft-format (remote-code, auto_map) checkpoint instead, of --size tiny, base or large.")
@click.option("--yolo", is_flag=True, help="Build a YOLOv8n from its config instead (needs the yolo extra).")
def make_test_model(directory: str, size: str, remote_code: bool, yolo: bool) -> None:
    """Build a Florence-2 (or YOLOv8) checkpoint offline, with random weights (marked as such)."""
    from rich.console import Console

    what = "YOLOv8n" if yolo else (f"{size} Microsoft-format Florence-2" if remote_code else f"{size} Florence-2")
    with Console(stderr=True).status(f"building a {what} with random weights in {directory} …"):
        if yolo:
            from florence2_serve.worker.yolo import build_yolo

            path = build_yolo(directory)
        elif remote_code:
            from florence2_serve.worker.fixtures import build_remote_code

            path = build_remote_code(directory, size=size)
        else:
            from florence2_serve.worker.model_builder import build_native

            path = build_native(directory, size=size)
    click.echo(str(path))


@cli.command()
@click.argument("source")
@click.argument("destination", type=click.Path(file_okay=False))
@click.option("--revision", default=None, help="Hub revision of SOURCE (a branch, tag or commit).")
@click.option("--overwrite", is_flag=True, help="Replace DESTINATION if it already holds files.")
def convert(source: str, destination: str, revision: str | None, overwrite: bool) -> None:
    """Convert a Microsoft-format Florence-2 checkpoint (SOURCE: a directory or hub id, with auto_map and
    modeling_florence2.py) into a native one in DESTINATION, without running its code. Workers do the same
    on load by themselves; this writes the result where you want it."""
    from rich.console import Console

    from florence2_serve.worker.conversion import ConversionError
    from florence2_serve.worker.conversion_cache import convert_source

    target = Path(destination)
    if target.exists() and any(target.iterdir()) and not overwrite:
        raise click.UsageError(f"{destination} is not empty; pass --overwrite to replace its files")
    with Console(stderr=True).status(f"converting {source} …"):
        try:
            report = convert_source(source, target, revision)
        except ConversionError as exc:
            raise click.ClickException(f"cannot convert {source}: {exc}") from None
    click.echo(f"converted {source} -> {destination}: {report.tensors} tensors in {report.seconds:.1f}s"
               + (f"; not carried over (Florence-2 never reads them): {', '.join(report.unused)}"
                  if report.unused else ""))


@cli.command()
@click.option("--model", "model", required=True,
              help="[NAME=]PATH_OR_ID of the model this worker holds (a bare path is named after its last part).")
@click.option("--redis-url", envvar="REDIS_URL", default=None, help="Redis URL (env REDIS_URL).")
@click.option("--device", default=None, help="auto (CUDA if present), cpu, cuda:0, ...")
@click.option("--dtype", type=click.Choice(["auto", "fp16", "bf16", "fp32"]), default=None,
              help="Weights dtype; auto: fp16 on CUDA, fp32 on CPU.")
@click.option("--attention", type=click.Choice(["eager", "sdpa"]), default=None,
              help="Attention implementation (default eager; never flash-attn).")
@click.option("--kind", type=click.Choice(["auto", "native", "remote", "yolo", "noop"]), default=None,
              help="Checkpoint kind; auto reads config.json: a Microsoft-format (auto_map) checkpoint is converted "
                   "to native once and served natively; remote forces its own code (transformers < 4.50 only). "
                   "noop: no model, empty results at once (for measuring the service itself).")
@click.option("--batch-size", type=int, default=None,
              help="Most jobs decoding at once (default 8); with --engine generate, the most per generate call.")
@click.option("--batch-wait-ms", type=float, default=None, help="Under load, wait this long to fill a batch (default 5).")
@click.option("--worker-id", default=None, help="This worker's id in Redis and ListModels (default host-pid-random).")
@click.option("--job-heartbeat-ttl", "job_heartbeat_ttl_s", type=int, default=None,
              help="Seconds without heartbeat after which a held job counts as abandoned (default 4).")
@click.option("--silent-worker-limit", "silent_worker_limit_s", type=float, default=None,
              help="Seconds a worker that still holds its Redis connection may go without heartbeating (starved "
                   "of CPU, paused) before its jobs count as abandoned anyway (default 60).")
@click.option("--maintenance-interval", "maintenance_interval_s", type=float, default=None,
              help="Seconds between rq maintenance runs that re-run abandoned jobs (default 1).")
@click.option("--exit-with-parent", is_flag=True, default=None,
              help="Stop when the process that started this worker exits: at once, its unfinished jobs back in "
                   "the queue (what `up` uses).")
@click.option("--metrics-port", type=int, default=None,
              help="Serve Prometheus metrics on this port (env FLORENCE2_WORKER_METRICS_PORT; default off).")
@click.option("--metrics-host", default=None, help="Host the metrics listener binds (default 127.0.0.1).")
@click.option("--convert-cache", default=None,
              help="Where Microsoft-format checkpoints converted on load are kept "
                   "(env FLORENCE2_CONVERT_CACHE; default ~/.cache/florence2-serve/converted).")
@click.option("--engine", type=click.Choice(["auto", "decode", "generate"]), default=None,
              help="Florence-2 decoding: decode (iteration-level batching on a static KV cache), generate "
                   "(transformers' generate per batch); auto: decode for native models.")
@click.option("--compile/--no-compile", "compile_step", default=None,
              help="torch.compile the decode step (CUDA graphs on a GPU; dynamic shapes on CPU). Default off.")
@click.option("--image-backend", type=click.Choice(["auto", "pil", "torchvision"]), default=None,
              help="How images become pixels: auto (PIL for converted Microsoft-format checkpoints, bit-equal to "
                   "their reference; transformers' default otherwise), pil or torchvision.")
@click.option("--canary/--no-canary", default=None,
              help="Before registering, run one small request through the decode engine and through transformers' "
                   "generate (greedy and 3 beams) and serve with generate if their tokens differ (default on).")
def worker(model, redis_url, device, dtype, attention, kind, batch_size, batch_wait_ms, worker_id,
           job_heartbeat_ttl_s, silent_worker_limit_s, maintenance_interval_s, exit_with_parent, metrics_port, metrics_host, convert_cache,
           engine, compile_step, image_backend, canary):
    """A GPU/CPU worker: holds one model, pulls its jobs in batches, streams results.

    SIGTERM/SIGINT: finish the jobs in hand and exit; a second one: stop now, requeue them.
    """
    from florence2_serve.worker.settings import WorkerSettings

    try:
        settings = WorkerSettings.from_env(
            model, redis_url=redis_url, device=device, dtype=dtype, attention=attention, kind=kind,
            batch_size=batch_size, batch_wait_ms=batch_wait_ms, worker_id=worker_id,
            job_heartbeat_ttl_s=job_heartbeat_ttl_s, silent_worker_limit_s=silent_worker_limit_s,
            maintenance_interval_s=maintenance_interval_s,
            exit_with_parent=exit_with_parent, metrics_port=metrics_port, metrics_host=metrics_host,
            convert_cache=convert_cache, engine=engine, compile=compile_step, image_backend=image_backend,
            canary=canary)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    from florence2_serve.worker.service import run_worker

    from florence2_serve.common.tracing import setup_tracing

    setup_tracing("florence2-worker")
    sys.exit(run_worker(settings))


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


@cli.command()
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
    try:
        settings = ServerSettings.from_env(redis_url=redis_url, **_http_choice(options))

        def ready(front_end):
            http = f"; HTTP at {front_end.http_url}" if front_end.http_url else ""
            click.echo(f"listening on port {front_end.port}{http}", err=True)

        asyncio.run(serve_forever(settings, ready=ready))
    except (AddressInUse, RedisUnreachable, ValueError) as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)


@cli.command()
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
@click.option("--dashboard", is_flag=True,
              help="Also run rq-dashboard on the queues, at 127.0.0.1:9181 (needs the dashboard extra).")
@_server_options
def up(models, workers, device, dtype, attention, batch_size, kind, engine, compile_step, image_backend,
       job_heartbeat_ttl, silent_worker_limit, redis_url, data_dir, redis_maxmemory, in_memory, dashboard, address,
       **server_options):
    """Everything on one machine: Redis (embedded unless --redis-url), front end, N workers per model.

    Ctrl-C or SIGTERM: workers finish their jobs, then the front end stops, then Redis; a second
    Ctrl-C makes the workers stop now and put their unfinished jobs back in the queue.
    """
    import signal
    import threading

    from florence2_serve.server.stack import LocalStack, StackConfig, StackError, default_data_dir

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
        address=address or "127.0.0.1:50051", worker_args=worker_args,
        server_settings={k: v for k, v in _http_choice(server_options).items() if v is not None},
    )
    from florence2_serve.common.tracing import setup_tracing

    setup_tracing("florence2-frontend")
    stop = threading.Event()
    stack_ref: list = []

    def on_signal(*_):
        if stop.is_set() and stack_ref:
            click.echo("stopping now: unfinished jobs go back to the queue", err=True)
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
            click.echo(f"florence2 serving {names} at {stack.address}{f' and {http}' if http else ''} "
                       f"(redis {stack.redis_url}); Ctrl-C stops", err=True)
            board = _start_dashboard(stack.redis_url) if dashboard else None
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
            click.echo("stopping: workers finish their jobs, then the front end, then Redis", err=True)
    except StackError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)


DASHBOARD_PORT = 9181


def _start_dashboard(redis_url: str):
    """rq-dashboard on the stack's Redis, on 127.0.0.1 (a child of `up`, stopped with it)."""
    import shutil
    import subprocess

    executable = Path(sys.executable).parent / "rq-dashboard"
    if not executable.exists():
        executable = shutil.which("rq-dashboard")
    if not executable:
        raise click.UsageError("--dashboard needs rq-dashboard: pip install 'florence2-serve[dashboard]'")
    process = subprocess.Popen([str(executable), "--redis-url", redis_url, "--bind", "127.0.0.1",
                                "--port", str(DASHBOARD_PORT)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    click.echo(f"rq-dashboard at http://127.0.0.1:{DASHBOARD_PORT}", err=True)
    return process


def _verbose(ctx, _param, value) -> None:
    if value:
        logging.getLogger().setLevel(logging.DEBUG)


def _log_format(ctx, _param, value) -> None:
    if value:
        from florence2_serve.common.log_setup import configure_logging

        configure_logging(logging.getLogger().level, value)
        if ctx.find_root().obj is not None:
            ctx.find_root().obj["log_format"] = value


def _add_client_commands() -> None:
    from .cli_client import health, job, models
    from .cli_detect import detect, submit

    for command in (detect, submit, models, job, health):
        cli.add_command(command)


def _accept_verbose_everywhere(command: click.Command) -> None:
    """`-v` and `--log-format` after the subcommand too (`florence2 detect -v ...`), not only before it."""
    command.params.append(click.Option(["-v", "--verbose"], is_flag=True, expose_value=False, is_eager=True,
                                       callback=_verbose, help="Debug logging."))
    command.params.append(click.Option(["--log-format"], type=LOG_FORMATS, default=None, expose_value=False,
                                       is_eager=True, callback=_log_format, help="Log lines as text or JSON."))
    for sub in getattr(command, "commands", {}).values():
        _accept_verbose_everywhere(sub)


_add_client_commands()
for _command in cli.commands.values():
    _accept_verbose_everywhere(_command)


def main() -> None:
    cli(prog_name="florence2")


if __name__ == "__main__":
    main()
