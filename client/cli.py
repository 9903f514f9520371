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
@click.option("--server", envvar="FLORENCE2_SERVER", default=None,
              help="Also check a running front end at host:port: health and models (env FLORENCE2_SERVER).")
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
    import time

    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    what = "YOLOv8n" if yolo else (f"{size} Microsoft-format Florence-2" if remote_code else f"{size} Florence-2")
    expected = {"tiny": "seconds", "base": "a minute or two", "large": "several minutes"}[size]
    click.echo(f"building a {what} with random weights in {directory} (takes {expected}) …", err=True)
    started = time.monotonic()
    # A spinner with the elapsed time (rich redraws it itself), so a long build shows it is alive.
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                  console=Console(stderr=True), transient=True) as progress:
        progress.add_task(f"building a {what} …", total=None)
        if yolo:
            from florence2_serve.worker.yolo import build_yolo

            path = build_yolo(directory)
        elif remote_code:
            from florence2_serve.worker.fixtures import build_remote_code

            path = build_remote_code(directory, size=size)
        else:
            from florence2_serve.worker.model_builder import build_native

            path = build_native(directory, size=size)
    click.echo(f"built in {time.monotonic() - started:.1f} s", err=True)
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
@click.option("--model", "model", required=True, envvar="FLORENCE2_MODEL",
              help="[NAME=]PATH_OR_ID of the model this worker holds (a bare path is named after its last part; "
                   "env FLORENCE2_MODEL).")
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
@click.option("--image-workers", type=int, default=None,
              help="Decode engine: processes that decode images and make their pixels when a job is taken, off the "
                   "model's thread (env FLORENCE2_WORKER_IMAGE_WORKERS; 0: the fetcher thread does it; default 1 on a "
                   "CUDA device, 0 on CPU).")
def worker(model, redis_url, device, dtype, attention, kind, batch_size, batch_wait_ms, worker_id,
           job_heartbeat_ttl_s, silent_worker_limit_s, maintenance_interval_s, exit_with_parent, metrics_port, metrics_host, convert_cache,
           engine, compile_step, image_backend, canary, image_workers):
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
            canary=canary, image_workers=image_workers)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    from florence2_serve.worker.service import run_worker

    from florence2_serve.common.tracing import setup_tracing

    from .cli_serve import stderr_as_json_lines

    stderr_as_json_lines()

    setup_tracing("florence2-worker")
    sys.exit(run_worker(settings))


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
    from .cli_serve import serve, up

    for command in (serve, up, detect, submit, models, job, health):
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
