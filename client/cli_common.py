"""What the CLI's client commands share: connection options, one client per command, errors as one line."""

from __future__ import annotations

import contextlib
import json
import sys
import tempfile
from pathlib import Path

import click

from .client import Florence2Client
from .connection import ServerUnreachable
from .errors import Florence2Error
from .retry import RetryPolicy

DEFAULT_SERVER = "127.0.0.1:50051"


def connection_options(function):
    """--server, --token and the TLS options, each with its environment variable."""
    for option in reversed([
        click.option("--server", envvar="FLORENCE2_SERVER", default=DEFAULT_SERVER, show_default=True,
                     help="Front-end address host:port (env FLORENCE2_SERVER)."),
        click.option("--token", envvar="FLORENCE2_TOKEN", default="", help="Bearer token (env FLORENCE2_TOKEN)."),
        click.option("--tls", is_flag=True, envvar="FLORENCE2_TLS", help="Connect with TLS (system roots unless --ca)."),
        click.option("--ca", "ca_file", type=click.Path(dir_okay=False, path_type=Path), envvar="FLORENCE2_CA",
                     default=None, help="PEM file of the CA that signed the server's certificate (implies --tls)."),
        click.option("--cert", "cert_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
                     help="Client certificate (PEM) for mutual TLS, with --key."),
        click.option("--key", "key_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
                     help="Client private key (PEM) for mutual TLS, with --cert."),
        click.option("--connect-timeout", type=click.FloatRange(min=0.1), envvar="FLORENCE2_CONNECT_TIMEOUT",
                     default=3.0, show_default=True,
                     help="Seconds to wait for a connection before saying why there is none "
                          "(env FLORENCE2_CONNECT_TIMEOUT)."),
    ]):
        function = option(function)
    return function


def fail(message: str, code: int = 1):
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def open_client(server: str, token: str = "", tls: bool = False, ca_file: Path | None = None,
                cert_file: Path | None = None, key_file: Path | None = None, connect_timeout: float = 3.0,
                timeout: float | None = 10, retry: RetryPolicy | None = None) -> Florence2Client:
    """A client that is connected: TLS inputs checked first (exit 2), then a connection within
    `connect_timeout` or one line saying why there is none (exit 1)."""
    if (cert_file is None) != (key_file is None):
        fail("--cert and --key go together (mutual TLS): " + ("--key is missing" if key_file is None
                                                               else "--cert is missing"), 2)

    def read(path: Path | None, flag: str) -> bytes | None:
        if path is None:
            return None
        try:
            return path.read_bytes()
        except OSError as exc:
            fail(f"{flag} {path}: {exc.strerror or exc}", 2)

    try:
        client = Florence2Client(server, token=token, timeout=timeout, tls=tls,
                                 root_certificates=read(ca_file, "--ca"), certificate_chain=read(cert_file, "--cert"),
                                 private_key=read(key_file, "--key"), retry=retry)
    except ValueError as exc:
        fail(str(exc), 2)
    try:
        client.check_connection(connect_timeout)
    except ServerUnreachable as exc:
        client.close()
        fail(str(exc))
    return client


def call(connection: dict, function, timeout: float | None = 10, retry: RetryPolicy | None = None):
    """One call through a fresh client; a failure becomes one line on stderr and exit 1."""
    with open_client(**connection, timeout=timeout, retry=retry) as client:
        try:
            return function(client)
        except Florence2Error as exc:
            fail(str(exc))


def plural(count: int, noun: str, nouns: str | None = None) -> str:
    """`1 image`, `2 images` (`nouns` for irregular plurals: `1 box`, `2 boxes`)."""
    return f"{count} {noun if count == 1 else (nouns or noun + 's')}"


def print_json(data, indent: int | None = None) -> None:
    click.echo(json.dumps(data, indent=indent, ensure_ascii=False))


@contextlib.contextmanager
def target(server: str, embedded: bool, model: str | None, worker_args: list[str]):
    """Yield (address, model name): a running server, or a whole stack for this command."""
    if not embedded:
        yield server, model
        return
    from florence2_serve.common.model_arg import parse_model_arg
    from florence2_serve.server.stack import LocalStack, StackConfig, StackError

    if not model:
        fail("--embedded needs --model [NAME=]PATH_OR_ID (e.g. models/tiny from `florence2 make-test-model`)", 2)
    try:
        name, path = parse_model_arg(model)
    except ValueError as exc:
        fail(str(exc), 2)
    with tempfile.TemporaryDirectory(prefix="florence2-embedded-") as tmp:
        config = StackConfig(models=[f"{name}={path}"], workers=1, address="127.0.0.1:0", worker_args=worker_args,
                             log_dir=Path(tmp), server_settings={"http_port": -1})  # the CLI speaks gRPC
        try:
            with LocalStack(config) as stack:
                yield stack.address, name
        except StackError as exc:
            fail(str(exc))
