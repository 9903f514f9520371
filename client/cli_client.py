"""Client commands of the `florence2` CLI: detect, models, job, health. No torch."""

from __future__ import annotations

import contextlib
import json
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import click
import grpc

from florence2_serve.common.tasks import Task

from .client import Florence2Client, JobFailed, error_info, event_to_dict, result_to_dict
from .inputs import expand_inputs

DEFAULT_SERVER = "127.0.0.1:50051"
server_option = click.option("--server", envvar="FLORENCE2_SERVER", default=DEFAULT_SERVER, show_default=True,
                             help="Front-end address (env FLORENCE2_SERVER).")
token_option = click.option("--token", envvar="FLORENCE2_TOKEN", default="", help="Bearer token (env FLORENCE2_TOKEN).")


def _fail(message: str, code: int = 1):
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def _rpc_error(exc: grpc.RpcError) -> str:
    info = error_info(exc)
    reason = f" [{info.reason}]" if info is not None else ""
    return f"{exc.code().name}{reason}: {exc.details()}"


def _call(server: str, token: str, call, timeout: float | None = 10):
    """One RPC through a fresh client; a gRPC error becomes a clear message and exit 1."""
    with Florence2Client(server, token=token, timeout=timeout) as client:
        try:
            return call(client)
        except grpc.RpcError as exc:
            _fail(_rpc_error(exc))


@contextlib.contextmanager
def _target(server: str, embedded: bool, model: str | None, worker_args: list[str]):
    """Yield (address, model name): a running server, or a whole stack for this command."""
    if not embedded:
        yield server, model
        return
    from florence2_serve.common.model_arg import parse_model_arg
    from florence2_serve.server.stack import LocalStack, StackConfig, StackError

    if not model:
        _fail("--embedded needs --model [NAME=]PATH_OR_ID (e.g. models/tiny from `florence2 make-test-model`)", 2)
    try:
        name, path = parse_model_arg(model)
    except ValueError as exc:
        _fail(str(exc), 2)
    with tempfile.TemporaryDirectory(prefix="florence2-embedded-") as tmp:
        config = StackConfig(models=[f"{name}={path}"], workers=1, address="127.0.0.1:0", worker_args=worker_args,
                             log_dir=Path(tmp))
        try:
            with LocalStack(config) as stack:
                yield stack.address, name
        except StackError as exc:
            _fail(str(exc))


@click.command()
@click.argument("images", nargs=-1, required=True)
@server_option
@token_option
@click.option("--embedded", is_flag=True, help="Run valkey + front end + one worker for this command only.")
@click.option("--model", default=None,
              help="Model name; with --embedded [NAME=]PATH_OR_ID to run. Default: the only model served.")
@click.option("--task", default="OD", show_default=True, help="Task: OD, CAPTION, OCR, ... or <OD> form.")
@click.option("--text", default="", help="Text input for the tasks that take it.")
@click.option("--region", default=None, help="x1,y1,x2,y2 in pixels for the REGION_TO_* tasks.")
@click.option("--max-new-tokens", type=int, default=0, help="0: the model default (1024).")
@click.option("--num-beams", type=int, default=0, help="0: the default (3).")
@click.option("--json", "as_json", is_flag=True, help="JSON Lines on stdout, one per image.")
@click.option("--draw", "draw_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Save each image with its boxes / polygons / labels drawn into this directory.")
@click.option("--concurrency", type=click.IntRange(1, 256), default=4, show_default=True)
@click.option("--timeout", type=float, default=600.0, show_default=True, help="Per-image deadline in seconds.")
@click.option("--device", default=None, help="With --embedded: worker device.")
def detect(images, server, token, embedded, model, task, text, region, max_new_tokens, num_beams, as_json,
           draw_dir, concurrency, timeout, device):
    """Run a task on IMAGES (files, directories, globs) and print typed results."""
    try:
        parsed_task = Task.parse(task)
        files = expand_inputs(list(images))
        parsed_region = tuple(float(v) for v in region.split(",")) if region else None
        if parsed_region is not None and len(parsed_region) != 4:
            raise ValueError("--region needs 4 numbers: x1,y1,x2,y2")
    except (ValueError, FileNotFoundError) as exc:
        _fail(str(exc), 2)
    if not files:
        _fail("no images found", 2)
    worker_args = ["--device", device] if device else []
    with _target(server, embedded, model, worker_args) as (address, model_name):
        with Florence2Client(address, token=token) as client:
            if not model_name:
                model_name = _only_model(client)
            failures = _detect_all(client, files, model_name, parsed_task, text, parsed_region, max_new_tokens,
                                   num_beams, as_json, draw_dir, concurrency, timeout)
    sys.exit(1 if failures else 0)


def _only_model(client: Florence2Client) -> str:
    try:
        models = [m.name for m in client.list_models() if m.live_workers]
    except grpc.RpcError as exc:
        _fail(_rpc_error(exc))
    if len(models) != 1:
        _fail(f"pass --model; models with live workers: {', '.join(models) or 'none'}", 2)
    return models[0]


def _detect_all(client, files, model, task, text, region, max_new_tokens, num_beams, as_json, draw_dir,
                concurrency, timeout) -> int:
    from rich.console import Console
    from rich.progress import Progress

    lock = threading.Lock()
    failures = 0
    show_progress = len(files) > 1 and sys.stderr.isatty()

    def one(path: Path):
        data = path.read_bytes()
        try:
            result = client.detect(data, model, task, timeout=timeout, text=text, region=region,
                                   max_new_tokens=max_new_tokens, num_beams=num_beams)
            return path, data, result_to_dict(result), None
        except JobFailed as exc:
            return path, data, None, f"{exc.state} [{exc.reason}]: {exc.error}"
        except grpc.RpcError as exc:
            return path, data, None, _rpc_error(exc)

    with Progress(console=Console(stderr=True), disable=not show_progress, transient=True) as progress:
        bar = progress.add_task("images", total=len(files))
        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            for path, data, result, error in pool.map(one, files):
                with lock:
                    progress.advance(bar)
                    if error:
                        failures += 1
                    if result and draw_dir is not None:
                        from florence2_serve.common.images import decode_image

                        from .draw import save_drawing

                        save_drawing(decode_image(data), result, draw_dir, path)
                    _print_one(path, result, error, as_json)
    return failures


def _print_one(path: Path, result: dict | None, error: str | None, as_json: bool) -> None:
    if as_json:
        line = {"image": str(path), "result": result} if result else {"image": str(path), "error": error}
        click.echo(json.dumps(line))
        return
    if error:
        click.echo(f"{path}: FAILED {error}")
        return
    parts = []
    if result.get("boxes"):
        parts.append(f"{len(result['boxes'])} boxes: " + ", ".join(b.get("label", "") or "?" for b in result["boxes"]))
    if result.get("polygons"):
        parts.append(f"{len(result['polygons'])} polygons")
    if result.get("text"):
        parts.append(repr(result["text"]))
    generate_ms = result.get("timings", {}).get("generate_ms", 0)
    click.echo(f"{path}: {'; '.join(parts) or 'nothing found'} ({generate_ms:.0f} ms generate)")


@click.command()
@server_option
@token_option
@click.option("--json", "as_json", is_flag=True)
def models(server, token, as_json):
    """Models with their live workers and queue depth."""
    from google.protobuf.json_format import MessageToDict

    found = _call(server, token, lambda client: client.list_models())
    if as_json:
        click.echo(json.dumps([MessageToDict(m, preserving_proto_field_name=True) for m in found], indent=2))
        return
    if not found:
        click.echo("no models (no worker has registered)")
    for model in found:
        flag = " [random weights]" if model.random_weights else ""
        click.echo(f"{model.name}: {model.live_workers} live workers, {model.queue_depth} queued{flag}")
        for worker in model.workers:
            click.echo(f"  {worker.worker_id} {worker.device} {worker.dtype} {worker.attention} "
                       f"batch={worker.batch_size} jobs={worker.jobs_done} generate_calls={worker.generate_calls}")


@click.group()
def job():
    """Inspect, follow or cancel a job by id."""


@job.command("get")
@click.argument("job_id")
@server_option
@token_option
def job_get(job_id, server, token):
    from google.protobuf.json_format import MessageToDict

    job = _call(server, token, lambda client: client.get_job(job_id))
    click.echo(json.dumps(MessageToDict(job, preserving_proto_field_name=True), indent=2))


@job.command("watch")
@click.argument("job_id")
@click.option("--after", default="", help="Resume after this event id.")
@server_option
@token_option
def job_watch(job_id, after, server, token):
    def follow(client):
        for event in client.watch(job_id, after):
            click.echo(json.dumps(event_to_dict(event)))

    _call(server, token, follow, timeout=None)


@job.command("cancel")
@click.argument("job_id")
@server_option
@token_option
def job_cancel(job_id, server, token):
    from florence2_serve.v1 import florence2_pb2 as pb

    response = _call(server, token, lambda client: client.cancel(job_id))
    click.echo(json.dumps({"job_id": job_id, "cancelled": response.cancelled,
                           "state": pb.JobState.Name(response.state)}))


@click.command()
@server_option
def health(server):
    """The standard grpc.health.v1 status of the front end (exit 1 unless SERVING)."""
    status = _call(server, "", lambda client: client.health(), timeout=5)
    click.echo(status)
    sys.exit(0 if status == "SERVING" else 1)
