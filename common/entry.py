"""The `florence2` console script's first module: process-wide settings that must precede every import.

gRPC's C core reads GRPC_VERBOSITY once, when grpc is first imported, and on its own prints a line for
every failed TLS handshake. A client command (detect, submit, models, job, health) explains a connection
failure in one line of its own, so it runs with the C core quiet; the server commands keep its lines
(JSON-wrapped with --log-format json). A GRPC_VERBOSITY the user set wins, and -v keeps the lines.
"""

from __future__ import annotations

import os
import sys

CLIENT_COMMANDS = frozenset({"detect", "submit", "models", "job", "health"})
OTHER_COMMANDS = frozenset({"serve", "up", "worker", "doctor", "convert", "make-test-model"})


def quiet_grpc_core(argv: list[str], environ=None) -> None:
    environ = os.environ if environ is None else environ
    words = [arg for arg in argv[1:] if not arg.startswith("-")]
    # The first word naming a command (an option's value, e.g. `--log-format json`, names none).
    command = next((word for word in words if word in CLIENT_COMMANDS | OTHER_COMMANDS), None)
    verbose = any(arg in ("-v", "--verbose") for arg in argv[1:])
    if command in CLIENT_COMMANDS and not verbose:
        environ.setdefault("GRPC_VERBOSITY", "NONE")


def main() -> None:
    quiet_grpc_core(sys.argv)
    from florence2_serve.client.cli import main as cli_main

    cli_main()
