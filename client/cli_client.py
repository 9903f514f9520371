"""Client commands of the `florence2` CLI besides detect/submit: models, job, health. No torch."""

from __future__ import annotations

import sys

import click

from .cli_common import call, connection_options, plural, print_json
from .json_output import to_json
from .retry import NO_RETRY


@click.command()
@connection_options
@click.option("--json", "as_json", is_flag=True, help="Print the models as JSON (every field, zero values too).")
def models(as_json, **connection):
    """Models with their kind, tasks, limits, live workers and queue depth."""
    found = call(connection, lambda client: client.list_models())
    if as_json:
        print_json([to_json(m) for m in found], indent=2)
        return
    if not found:
        click.echo("no models (no worker has registered)")
    for model in found:
        if not model.live_workers:  # what it can do is known from its workers only
            click.echo(f"{model.name}: no live workers, {model.queue_depth} queued (kind and limits show once a "
                       "worker registers)")
            continue
        flag = " [random weights]" if model.random_weights else ""
        described = to_json(model)
        click.echo(f"{model.name}: {described['kind']}, {plural(model.live_workers, 'live worker')}, "
                   f"{model.queue_depth} queued, max_new_tokens {model.max_new_tokens}, "
                   f"{described['source_format']} checkpoint{flag}")
        for worker in model.workers:
            converted = " converted" if worker.converted else ""
            click.echo(f"  {worker.worker_id} {worker.device} {worker.dtype} {worker.attention} "
                       f"batch={worker.batch_size} jobs={worker.jobs_done} generate_calls={worker.generate_calls}"
                       f"{converted}")


@click.group()
def job():
    """Inspect, follow or cancel a job by its id (as detect --json and submit print it)."""


@job.command("get")
@click.argument("job_id")
@connection_options
def job_get(job_id, **connection):
    """The job's state, and its result or error, as JSON."""
    print_json(to_json(call(connection, lambda client: client.get_job(job_id))), indent=2)


@job.command("watch")
@click.argument("job_id")
@click.option("--after", default="", help="Resume after this event id (as a previous watch printed it).")
@connection_options
def job_watch(job_id, after, **connection):
    """Print the job's events as JSON Lines until it ends (resuming across front-end restarts)."""
    def follow(client):
        for event in client.watch(job_id, after):
            print_json(to_json(event))

    call(connection, follow, timeout=None)


@job.command("cancel")
@click.argument("job_id")
@connection_options
def job_cancel(job_id, **connection):
    """Cancel a queued or running job; prints whether this call cancelled it and its state."""
    response = call(connection, lambda client: client.cancel(job_id))
    print_json({"job_id": job_id, "cancelled": response.cancelled, "state": to_json(response)["state"]})


@click.command()
@connection_options
@click.option("--model", default="", help="Check this model's health name (SERVING while it has a live worker).")
def health(model, **connection):
    """The standard grpc.health.v1 status of the front end, or of one model (exit 1 unless SERVING)."""
    status = call(connection, lambda client: client.health(model), timeout=5, retry=NO_RETRY)  # a probe: no retry
    click.echo(status)
    sys.exit(0 if status == "SERVING" else 1)
