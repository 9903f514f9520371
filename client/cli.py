"""The `florence2` command line.

Client commands (detect, models, job, health) need no torch; worker-side commands (worker, doctor,
make-test-model) import the worker package only when they run.
"""

from __future__ import annotations

import json
import logging
import sys

import click


def _configure_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
@click.version_option(package_name="florence2-serve")
def cli(verbose: bool) -> None:
    """Florence-2 inference service: front end, workers, client."""
    _configure_logging(verbose)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--model", default=None, help="Also load this checkpoint (path or hub id) and run one generate.")
@click.option("--device", default="auto", show_default=True)
@click.option("--attention", type=click.Choice(["eager", "sdpa"]), default="eager", show_default=True)
def doctor(as_json: bool, model: str | None, device: str, attention: str) -> None:
    """Versions, CUDA, flash-attn status, what this environment can run. Exit 1 when broken."""
    from florence2_serve.worker.doctor import collect, render

    report = collect(model=model, device=device, attention=attention)
    click.echo(json.dumps(report, indent=2) if as_json else render(report))
    sys.exit(0 if report["ok"] else 1)


@cli.command("make-test-model")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--size", type=click.Choice(["tiny", "base", "large"]), default="tiny", show_default=True,
              help="tiny: seconds to build, for tests; base/large: full-size shapes with random weights, for timing.")
@click.option("--remote-code", is_flag=True, help="Build the tiny remote-code (auto_map) fixture instead.")
def make_test_model(directory: str, size: str, remote_code: bool) -> None:
    """Build a Florence-2 checkpoint offline, with random weights (marked as such)."""
    if remote_code:
        from florence2_serve.worker.fixtures import build_remote_code

        path = build_remote_code(directory)
    else:
        from florence2_serve.worker.model_builder import build_native

        path = build_native(directory, size=size)
    click.echo(str(path))


def main() -> None:
    cli(prog_name="florence2")


if __name__ == "__main__":
    main()
