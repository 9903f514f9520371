"""Docker files checked statically (no engine here): paths exist, commands are real CLI commands."""

import re
import shlex
from pathlib import Path

import yaml
from click.testing import CliRunner

from conftest import REPO
from florence2_serve.client.cli import cli
from florence2_serve.server.settings import ServerSettings

DOCKER = REPO / "docker"


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text())
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line.strip() else "")
            for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_dockerfiles_copy_existing_paths_and_run_real_commands():
    for name in ("Dockerfile.server", "Dockerfile.worker"):
        instructions = dockerfile_instructions(DOCKER / name)
        assert instructions[0][0] == "FROM"
        for keyword, rest in instructions:
            assert keyword in {"FROM", "ARG", "WORKDIR", "COPY", "RUN", "USER", "ENV", "EXPOSE", "HEALTHCHECK",
                               "ENTRYPOINT", "CMD"}, keyword
            if keyword == "COPY":
                for source in rest.split()[:-1]:
                    assert (REPO / source).exists(), f"{name}: COPY {source} does not exist"
        entry = next(rest for keyword, rest in instructions if keyword == "ENTRYPOINT")
        command = eval(entry)  # a JSON-array ENTRYPOINT  # noqa: S307
        assert command[0] == "florence2"
        result = CliRunner().invoke(cli, [*command[1:], "--help"])
        assert result.exit_code == 0, result.output


def test_compose_services_and_their_commands():
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"redis", "server", "worker"}
    for name in ("server", "worker"):
        build = services[name]["build"]
        assert (DOCKER / build["context"] / build["dockerfile"]).resolve().exists()
        assert services[name]["environment"]["REDIS_URL"].startswith("redis://redis:")
    known_env = set(ServerSettings.ENV.values())
    assert set(services["server"]["environment"]) <= known_env
    worker_args = services["worker"]["command"]
    result = CliRunner().invoke(cli, ["worker", "--help"])
    for flag in [a for a in worker_args if a.startswith("--")]:
        assert flag in result.output, f"compose passes unknown worker flag {flag}"
    assert services["worker"]["stop_signal"] == "SIGTERM"
    assert shlex.split("valkey-server --save ''")[0] == services["redis"]["command"][0]
