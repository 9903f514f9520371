"""`florence2 detect` and `florence2 submit`: many images through the service, every output kept.

detect runs the images through Florence2Client.detect_many (bounded concurrency, results as they
complete). Every output line carries the image and its job id. The first Ctrl-C cancels this run's
outstanding jobs on the server, prints what was written and exits 130; a second one exits at once.
"""

from __future__ import annotations

import functools
import json
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import click

from florence2_serve.common.tasks import Task

from .cli_common import connection_options, fail, open_client, plural, print_json, target
from .client import Florence2Client
from .core import DetectOutcome
from .errors import Florence2Error, JobFailed, RpcError
from .inputs import InputImage, expand_inputs
from .json_output import to_json

TASK_NAMES = ", ".join(task.name for task in Task)
TASK_HELP = f"Task: one of {TASK_NAMES} (or the <OD> form). DETECT is for YOLOv8 models."


MODEL_HELP = "Model name (see `florence2 models`). Default: the only model served."
EMBEDDED_MODEL_HELP = ("Model name (see `florence2 models`); with --embedded [NAME=]PATH_OR_ID to run. "
                       "Default: the only model served.")


def task_options(function, model_help: str = MODEL_HELP):
    for option in reversed([
        click.option("--model", default=None, help=model_help),
        click.option("--task", default=None, help=TASK_HELP + " Default: OD, or DETECT for a model that serves only "
                                                               "DETECT (YOLO)."),
        click.option("--text", default="", help="Text input, for the tasks that take it (grounding, "
                                                "referring segmentation, open-vocabulary detection)."),
        click.option("--region", default=None, help="x1,y1,x2,y2 in pixels, for the REGION_TO_* tasks."),
        click.option("--max-new-tokens", type=int, default=0, help="0: the default (1024, or the model's limit)."),
        click.option("--num-beams", type=int, default=0, help="0: the default (3)."),
        click.option("--priority", type=click.IntRange(0, 9), default=0, show_default=True,
                     help="0-9, higher runs sooner."),
        click.option("--confidence", type=click.FloatRange(0, 1), default=None,
                     help="DETECT (YOLO): keep boxes scoring at least this (worker default 0.25)."),
        click.option("--iou", type=click.FloatRange(0, 1, min_open=True), default=None,
                     help="DETECT (YOLO): merge boxes overlapping more than this (worker default 0.7)."),
        click.option("--max-detections", type=click.IntRange(1, 1000), default=None,
                     help="DETECT (YOLO): at most this many boxes per image (worker default 300)."),
    ]):
        function = option(function)
    return function


# How the CLI names what a task is missing or does not take (common/tasks.validate_inputs' messages).
FLAG_HINTS = (("needs text input", "pass --text"), ("takes no text input", "drop --text"),
              ("needs a region", "pass --region x1,y1,x2,y2"), ("takes no region", "drop --region"))


def _parse(images, task, text, region, draw_dir=None) -> tuple[list[InputImage], Task, tuple | None]:
    """Every mistake in the arguments, once, before anything is sent (exit 2); the server checks again."""
    from florence2_serve.common.tasks import validate_inputs

    try:
        parsed_task = Task.parse(task)
    except ValueError as exc:
        fail(str(exc), 2)
    try:
        parsed_region = tuple(float(v) for v in region.split(",")) if region else None
    except ValueError:
        fail(f"--region takes 4 numbers x1,y1,x2,y2 in pixels, got {region!r}", 2)
    if parsed_region is not None:
        if len(parsed_region) != 4:
            fail(f"--region takes 4 numbers x1,y1,x2,y2 in pixels, got {len(parsed_region)}", 2)
        x1, y1, x2, y2 = parsed_region
        if not (x2 > x1 and y2 > y1 and min(parsed_region) >= 0):
            fail(f"--region {region}: need 0 <= x1 < x2 and 0 <= y1 < y2 (pixels)", 2)
    try:
        validate_inputs(parsed_task, text, parsed_region)
    except ValueError as exc:
        hint = next((f" ({flag})" for phrase, flag in FLAG_HINTS if phrase in str(exc)), "")
        fail(f"{exc}{hint}", 2)
    try:
        files = expand_inputs(list(images), skip_dir=draw_dir)
    except FileNotFoundError as exc:
        fail(str(exc), 2)
    if not files:
        fail("no images found", 2)
    return files, parsed_task, parsed_region


def _only_model(models: list) -> str:
    live = [m.name for m in models if m.live_workers]
    if len(live) != 1:
        fail(f"pass --model; models with live workers: {', '.join(live) or 'none'}", 2)
    return live[0]


def _detection_options(task: Task, confidence, iou, max_detections) -> dict:
    """The DETECT options given, as job_spec keywords; a usage error for another task (exit 2)."""
    given = {k: v for k, v in (("confidence", confidence), ("iou", iou), ("max_detections", max_detections))
             if v is not None}
    if given and task is not Task.DETECT:
        flags = ", ".join("--" + name.replace("_", "-") for name in given)
        fail(f"{flags} apply to the DETECT task (YOLO models), not {task.name}", 2)
    return given


def _default_task(models: list, model: str) -> Task:
    """OD, unless the model serves DETECT and not OD (a YOLO model)."""
    from florence2_serve.common.proto_enums import task_from_proto

    info = next((m for m in models if m.name == model), None)
    tasks = {task_from_proto(t) for t in info.tasks} if info is not None else set()
    return Task.DETECT if Task.DETECT in tasks and Task.OD not in tasks else Task.OD


def _model_and_task(client: Florence2Client, model: str | None, task: Task | None) -> tuple[str, Task]:
    """The model (the only one served, unless named) and the task (OD, or DETECT for a YOLO model, unless
    given): one ListModels call when either is left out."""
    if model and task:
        return model, task
    try:
        models = list(client.list_models())
    except Florence2Error as exc:
        if not model:
            fail(str(exc))
        return model, Task.OD  # the job's own call reports what is wrong
    model = model or _only_model(models)
    return model, task or _default_task(models, model)


@dataclass
class Tally:
    started: float = field(default_factory=time.monotonic)
    succeeded: int = 0
    failed: int = 0
    cancelled: int = 0
    drawings: int = 0
    kept_beside: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)  # (input, why)

    def line(self, total: int) -> str:
        elapsed = time.monotonic() - self.started
        done = self.succeeded + self.failed
        parts = [f"{plural(total, 'image')}: {self.succeeded} succeeded, {self.failed} failed"]
        if self.cancelled:
            parts.append(f"{self.cancelled} cancelled on the server")
        if total - done:
            parts.append(f"{total - done} not run")
        rate = f", {self.succeeded / elapsed:.1f} images/s" if self.succeeded and elapsed > 0 else ""
        parts.append(f"{elapsed:.1f} s{rate}")
        if self.drawings:
            parts.append(plural(self.drawings, "drawing") + (f" ({self.kept_beside} beside existing files; "
                                                              "--overwrite replaces)" if self.kept_beside else ""))
        return "; ".join(parts)

    def failed_lines(self, shown: int = 20) -> list[str]:
        """Which inputs failed, and why: for a summary whose result lines went to a file or a pipe."""
        lines = [f"  {image}: {why}" for image, why in self.failures[:shown]]
        if len(self.failures) > shown:
            lines.append(f"  … and {len(self.failures) - shown} more (see the output's error lines)")
        return (["failed:"] + lines) if lines else []


class Output:
    """What stdout gets per outcome in each --format (and, for coco, once at the end)."""

    def __init__(self, output_format: str, task: Task):
        from .export import CocoDocument, CsvRows

        self.format, self.task = output_format, task
        self.csv = CsvRows() if output_format == "csv" else None
        self.coco = CocoDocument() if output_format == "coco" else None
        self.header = self.csv.header() if self.csv else None

    def lines(self, outcome: DetectOutcome) -> list[str]:
        image: InputImage = outcome.source
        if self.format == "jsonl":
            line = {"image": str(image.path), "job_id": outcome.job_id, "request_id": outcome.request_id,
                    "task": self.task.name}
            if outcome.ok:
                line["result"] = to_json(outcome.result)
            else:
                line["error"] = _error_json(outcome.error)
            return [json.dumps(line, ensure_ascii=False)]
        if self.csv is not None:
            return self.csv.lines(str(image.path), outcome.job_id, self.task.name,
                                  to_json(outcome.result) if outcome.ok else None, str(outcome.error))
        if self.coco is not None:
            if outcome.ok:
                self.coco.add(str(image.path), to_json(outcome.result))
            return []
        return [_describe(outcome)]

    def finish(self) -> None:
        if self.coco is not None:
            click.echo(self.coco.document())


def _describe(outcome: DetectOutcome) -> str:
    image: InputImage = outcome.source
    if not outcome.ok:
        return f"{image.path}: FAILED {outcome.error} (job {outcome.job_id or '-'})"
    result = outcome.result
    parts = []
    if result.boxes:
        parts.append(f"{plural(len(result.boxes), 'box', 'boxes')}: " + ", ".join(b.label or "?" for b in result.boxes))
    if result.polygons:
        parts.append(f"{plural(len(result.polygons), 'polygon')}: "
                     + ", ".join(p.label or "?" for p in result.polygons))
    if result.text:
        parts.append(repr(result.text))
    return (f"{image.path}: {'; '.join(parts) or 'nothing found'} "
            f"({result.timings.generate_ms:.0f} ms generate, job {outcome.job_id})")


def _error_json(error: Florence2Error) -> dict:
    data = {"message": str(error), "reason": getattr(error, "reason", "")}
    if isinstance(error, JobFailed):
        data["state"] = error.state
    elif isinstance(error, RpcError):
        data["code"] = error.code().name
    return data


@click.command()
@click.argument("images", nargs=-1, required=True)
@connection_options
@functools.partial(task_options, model_help=EMBEDDED_MODEL_HELP)
@click.option("--embedded", is_flag=True, help="Run valkey + front end + one worker for this command only.")
@click.option("--json", "as_json", is_flag=True, help="JSON Lines on stdout, one per image (--format jsonl).")
@click.option("--format", "output_format", type=click.Choice(["text", "jsonl", "csv", "coco"]), default=None,
              help="stdout: text lines (default), jsonl (one JSON object per image, with its job_id), csv (one row "
                   "per box, polygon or OCR quad) or coco (one COCO-style JSON document at the end).")
@click.option("--draw", "draw_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Save each image with its result drawn, below this directory at the image's relative path, "
                   "the task in the name (img.jpg -> DIR/img.jpg.od.png).")
@click.option("--overwrite", is_flag=True, help="Replace drawings that exist (default: keep them, write beside).")
@click.option("--concurrency", type=click.IntRange(1, 256), default=4, show_default=True,
              help="Jobs in flight at once.")
@click.option("--timeout", type=float, default=600.0, show_default=True, help="Per-image deadline in seconds.")
@click.option("--fail-fast", is_flag=True, help="Stop at the first failed image: cancel the rest, exit 1.")
@click.option("--device", default=None, help="With --embedded: the worker's device (auto, cpu, cuda:0).")
def detect(images, server, token, tls, ca_file, cert_file, key_file, connect_timeout, model, task, text, region,
           max_new_tokens, num_beams, priority, confidence, iou, max_detections, embedded, as_json, output_format,
           draw_dir, overwrite, concurrency, timeout, fail_fast, device):
    """Run a task on IMAGES (files, directories, globs); print one line per image as it completes.

    Exit 0 when every image succeeded, 1 when any failed, 130 after Ctrl-C.
    """
    if as_json and output_format not in (None, "jsonl"):
        fail(f"--json is --format jsonl; it cannot go with --format {output_format}", 2)
    output_format = "jsonl" if as_json else (output_format or "text")
    files, parsed_task, parsed_region = _parse(images, task or "OD", text, region, draw_dir)
    worker_args = ["--device", device] if device else []
    with target(server, embedded, model, worker_args) as (address, model_name):
        with open_client(address, token, tls, ca_file, cert_file, key_file, connect_timeout, timeout=None) as client:
            model_name, parsed_task = _model_and_task(client, model_name, parsed_task if task else None)
            run = client.detect_many(files, model_name, parsed_task, concurrency=concurrency, timeout=timeout,
                                     text=text, region=parsed_region, max_new_tokens=max_new_tokens,
                                     num_beams=num_beams, priority=priority, cancel_on_disconnect=True,
                                     **_detection_options(parsed_task, confidence, iou, max_detections))
            code = _drive(run, files, parsed_task, parsed_region, output_format, draw_dir, overwrite, fail_fast)
    sys.exit(code)


def _drive(run, files, task: Task, region, output_format: str, draw_dir: Path | None, overwrite: bool,
           fail_fast: bool) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    tally = Tally()
    interrupted = []
    output = Output(output_format, task)
    if output.header:
        click.echo(output.header)

    def on_interrupt(*_):
        if interrupted:
            raise KeyboardInterrupt
        interrupted.append(True)
        click.echo("\ninterrupted: cancelling this run's jobs on the server (Ctrl-C again to quit now)", err=True)
        tally.cancelled += run.cancel()

    previous = signal.signal(signal.SIGINT, on_interrupt)
    show = len(files) > 1 and sys.stderr.isatty()
    # Results and the bar on one terminal: both through one console, so a line never lands inside the bar.
    shared = show and sys.stdout.isatty()
    console = Console(file=sys.stdout) if shared else Console(stderr=True)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    try:
        with Progress(*columns, console=console, disable=not show, transient=True,
                      speed_estimate_period=60) as progress:
            bar = progress.add_task("images", total=len(files))
            for outcome in run:
                progress.advance(bar)
                if outcome.ok:
                    tally.succeeded += 1
                    if draw_dir is not None:
                        _draw(outcome, task, region, draw_dir, overwrite, tally)
                else:
                    tally.failed += 1
                    tally.failures.append((str(outcome.source), str(outcome.error)))
                for line in output.lines(outcome):
                    if shared:
                        progress.console.print(line, markup=False, highlight=False, soft_wrap=True)
                    else:
                        click.echo(line)
                if fail_fast and not outcome.ok and not interrupted:
                    click.echo("--fail-fast: stopping at the first failure", err=True)
                    interrupted.append(False)
                    tally.cancelled += run.cancel()
    except KeyboardInterrupt:
        output.finish()
        _summary(tally, len(files))
        return 130
    finally:
        signal.signal(signal.SIGINT, previous)
    output.finish()
    _summary(tally, len(files))
    if interrupted and interrupted[0]:
        return 130
    return 1 if tally.failed or interrupted else 0


def _summary(tally: Tally, total: int) -> None:
    click.echo(tally.line(total), err=True)
    if not sys.stdout.isatty():  # the result lines went elsewhere: say here which inputs failed
        for line in tally.failed_lines():
            click.echo(line, err=True)


def _draw(outcome: DetectOutcome, task: Task, region, draw_dir: Path, overwrite: bool, tally: Tally) -> None:
    from florence2_serve.common.images import ImageError, decode_image

    from .draw import drawing_path, save_drawing

    image: InputImage = outcome.source
    target_path, beside = drawing_path(draw_dir, image.relative, task.name, overwrite)
    try:
        save_drawing(decode_image(image.path.read_bytes()), to_json(outcome.result), target_path, region)
    except (ImageError, OSError) as exc:
        click.echo(f"{image.path}: drawing not saved ({exc})", err=True)
        return
    tally.drawings += 1
    tally.kept_beside += beside


@click.command()
@click.argument("images", nargs=-1, required=True)
@connection_options
@task_options
@click.option("--wait", is_flag=True, help="Also wait for each job and print its result (or error).")
@click.option("--timeout", type=float, default=600.0, show_default=True, help="With --wait: per-image deadline.")
def submit(images, server, token, tls, ca_file, cert_file, key_file, connect_timeout, model, task, text, region,
           max_new_tokens, num_beams, priority, confidence, iou, max_detections, wait, timeout):
    """Queue a job per image and print its id at once (JSON Lines); the jobs run whether or not anyone
    waits. Follow one later with `florence2 job watch JOB_ID`."""
    files, parsed_task, parsed_region = _parse(images, task or "OD", text, region)
    failed = 0
    with open_client(server, token, tls, ca_file, cert_file, key_file, connect_timeout, timeout=30) as client:
        model_name, parsed_task = _model_and_task(client, model, parsed_task if task else None)
        submitted = []
        for image in files:
            line = {"image": str(image.path), "task": parsed_task.name}
            try:
                spec = client.spec(image.path, model_name, parsed_task, text=text, region=parsed_region,
                                   max_new_tokens=max_new_tokens, num_beams=num_beams, priority=priority,
                                   **_detection_options(parsed_task, confidence, iou, max_detections))
                response = client.submit(spec)
                line.update(job_id=response.job_id, request_id=spec.request_id, created=response.created)
                submitted.append((line, response.job_id))
            except (Florence2Error, OSError, ValueError) as exc:
                failed += 1
                line["error"] = _error_json(exc) if isinstance(exc, Florence2Error) else {"message": str(exc)}
            if not wait or "error" in line:
                print_json(line)
        for line, job_id in submitted if wait else ():
            try:
                line["result"] = to_json(client.wait(job_id, timeout))
            except Florence2Error as exc:
                failed += 1
                line["error"] = _error_json(exc)
            print_json(line)
    sys.exit(1 if failed else 0)

