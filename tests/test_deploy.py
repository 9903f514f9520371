"""Deployment files checked offline (no Docker engine): Dockerfiles with hadolint, the compose file against
the compose spec (its monitoring profile too), the locks (the environment is the lock; the images install
theirs, which agree with it, resolved with pip's dry run). Kubernetes: tests/test_kubernetes.py."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from conftest import REPO
from florence2_serve.client.cli import cli

DOCKER = REPO / "docker"
REQUIREMENTS = REPO / "requirements"
K8S = REPO / "deploy" / "kubernetes"


def _tool(name: str) -> str:
    found = shutil.which(name) or str(Path(sys.executable).parent / name)
    if not Path(found).exists():
        assert not os.environ.get("CI"), f"CI installs {name} (dev extra)"
        pytest.skip(f"{name} not installed (pip install -e '.[dev]')")
    return found


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


@pytest.mark.parametrize("name", ["Dockerfile.server", "Dockerfile.worker", "Dockerfile.worker-baked"])
def test_dockerfiles_pass_hadolint(name):
    result = subprocess.run([_tool("hadolint"), "--failure-threshold", "info", str(DOCKER / name)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfiles_install_dependencies_before_the_sources_and_have_a_healthcheck():
    for name in ("Dockerfile.server", "Dockerfile.worker"):
        text = (DOCKER / name).read_text()
        assert text.index("pip install --no-cache-dir -") < text.index("COPY common"), name
        assert "HEALTHCHECK" in text and "USER 10001:10001" in text, name  # numeric: runAsNonRoot can check it
    server = dict(dockerfile_instructions(DOCKER / "Dockerfile.server"))
    # Liveness is the process, on the plaintext probe port (works with TLS on; a Redis outage never fails it).
    assert "http://127.0.0.1:8081/healthz" in server["HEALTHCHECK"] and "FLORENCE2_HEALTH_PORT=8081" in server["ENV"]
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".venv", ".legacy", "node_modules", ".git"} <= set(ignored)


def test_compose_file_is_valid_and_gives_each_worker_its_own_gpu():
    from compose_spec import PyCompose

    text = (DOCKER / "compose.yaml").read_text()
    # Compose interpolates ${VAR:-default} before it validates; so does this test, with the defaults.
    # YAML merge keys (<<: *worker) are resolved by the YAML loader first, as Compose's own loader does.
    resolved = yaml.safe_dump(yaml.safe_load(re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", text)))
    compose = PyCompose.from_yaml(resolved)
    assert {"redis", "server", "worker-gpu0", "worker-gpu1"} <= set(compose.service_names())
    data = yaml.safe_load(text)
    workers = {name: s for name, s in data["services"].items() if name.startswith("worker")}
    gpus = [s["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"] for s in workers.values()]
    assert len({tuple(g) for g in gpus}) == len(gpus) and all(len(g) == 1 for g in gpus)
    assert all(s.get("restart") == "unless-stopped" for s in data["services"].values())
    assert all(port.startswith("${FLORENCE2_BIND:-127.0.0.1}:") for port in data["services"]["server"]["ports"])
    worker_help = CliRunner().invoke(cli, ["worker", "--help"]).output
    for service in workers.values():
        for flag in [a for a in service["command"] if a.startswith("--")]:
            assert flag in worker_help


def test_compose_monitoring_profile_scrapes_every_process_and_provisions_the_dashboard():
    data = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = data["services"]
    monitoring = {name for name, s in services.items() if "monitoring" in s.get("profiles", [])}
    assert monitoring == {"prometheus", "grafana"}
    published = [port.rsplit(":", 2)[-2] for s in services.values() for port in s.get("ports", [])]
    assert "9100" not in published, "9100 is node_exporter's port"
    # Prometheus scrapes the front end and every worker service, on the ports they serve metrics on.
    server_port = services["server"]["environment"]["FLORENCE2_METRICS_PORT"]
    worker_env = {}
    for line in (DOCKER / "Dockerfile.worker").read_text().replace("\\\n", " ").splitlines():
        if line.startswith("ENV "):
            worker_env.update(re.findall(r"(\w+)=(\S+)", line))
    worker_port = worker_env["FLORENCE2_WORKER_METRICS_PORT"]
    assert worker_env["FLORENCE2_WORKER_METRICS_HOST"] == "0.0.0.0"  # reachable from the Prometheus container
    scrape = yaml.safe_load((DOCKER / "prometheus" / "prometheus.yml").read_text())
    targets = {target for job in scrape["scrape_configs"] for config in job["static_configs"]
               for target in config["targets"]}
    workers = [name for name in services if name.startswith("worker")]
    assert targets == {f"server:{server_port}", *(f"{name}:{worker_port}" for name in workers)}
    for name in workers:  # and each worker's metrics are published on a port of its own
        assert any(port.endswith(f":{worker_port}") for port in services[name]["ports"]), name
    mounts = {volume.split(":")[0]: volume.split(":")[1] for volume in services["prometheus"]["volumes"]}
    assert mounts["./prometheus/prometheus.yml"] == "/etc/prometheus/prometheus.yml"
    # Grafana: the data source is that Prometheus; the dashboard is loaded from where it is mounted.
    grafana = {volume.split(":")[0]: volume.split(":")[1] for volume in services["grafana"]["volumes"]}
    provisioning = DOCKER / "grafana" / "provisioning"
    assert grafana["./grafana/provisioning"] == "/etc/grafana/provisioning"
    (source,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090" and source["isDefault"]
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "florence2.yaml").read_text())["providers"]
    assert grafana["./grafana/florence2-dashboard.json"].startswith(provider["options"]["path"] + "/")
    dashboard = json.loads((DOCKER / "grafana" / "florence2-dashboard.json").read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    uids = {panel["datasource"]["uid"] for panel in dashboard["panels"] if "datasource" in panel}
    assert uids == {"${DS_PROMETHEUS}"} and variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus" and "__inputs" not in dashboard  # provisioning-safe


def test_readme_compose_commands_name_services_that_exist():
    services = set(yaml.safe_load((DOCKER / "compose.yaml").read_text())["services"])
    profiles = {p for s in yaml.safe_load((DOCKER / "compose.yaml").read_text())["services"].values()
                for p in s.get("profiles", [])}
    commands = re.findall(r"docker compose [^`\n]*", (REPO / "README.md").read_text())
    assert commands
    for command in commands:
        for name in re.findall(r"--scale (\S+?)=", command):
            assert name in services, command
        for profile in re.findall(r"--profile (\S+)", command):
            assert profile in profiles, command


def test_every_shipped_redis_has_a_maxmemory_that_never_evicts_a_queued_job():
    """compose, Kubernetes and up's embedded valkey: a maxmemory with noeviction (README "Sizing Redis")."""
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())["services"]["redis"]["command"]
    manifests = list(yaml.safe_load_all((REPO / "deploy" / "kubernetes" / "valkey.yaml").read_text()))
    statefulset = next(m for m in manifests if m and m["kind"] == "StatefulSet")
    kubernetes = statefulset["spec"]["template"]["spec"]["containers"][0]["args"]
    for args in (compose, kubernetes):
        assert args[args.index("--maxmemory-policy") + 1] == "noeviction"
        assert args[args.index("--maxmemory") + 1]
    limit = statefulset["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"]
    assert limit == "2Gi" and kubernetes[kubernetes.index("--maxmemory") + 1] == "1536mb"  # below the limit


def test_up_embedded_redis_never_evicts(tmp_path):
    import redis

    up = subprocess.Popen([sys.executable, "-m", "florence2_serve.server.embedded_redis", "--in-memory",
                           "--maxmemory", "64mb"], stdout=subprocess.PIPE, text=True)
    try:
        connection = redis.Redis.from_url(up.stdout.readline().strip())
        assert connection.config_get("maxmemory")["maxmemory"] == str(64 * 1024 * 1024)
        assert connection.config_get("maxmemory-policy")["maxmemory-policy"] == "noeviction"
    finally:
        up.terminate()
        up.wait(timeout=30)


def _pins(path: Path) -> dict[str, str]:
    from packaging.utils import canonicalize_name

    return {canonicalize_name(name): version
            for name, version in re.findall(r"^([A-Za-z0-9_.\-]+)==([^\s\\;]+)", path.read_text(), re.MULTILINE)}


def test_the_environment_is_the_lock():
    """Every package of requirements/lock.txt is installed at its locked version (.ci/setup installs the lock),
    and the legacy line in .legacy is requirements/legacy.txt's transformers."""
    import importlib.metadata as metadata

    def installed(name: str) -> str | None:  # the distribution an import finds first (vendored copies aside)
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    locked = _pins(REQUIREMENTS / "lock.txt")
    wrong = {name: (version, installed(name)) for name, version in locked.items() if installed(name) != version}
    assert not wrong, f"not the lock's versions (locked, installed): {wrong}; run bash .ci/setup"
    legacy = REPO / ".legacy"
    if legacy.is_dir():
        (dist,) = legacy.glob("transformers-*.dist-info")
        assert dist.name == f"transformers-{_pins(REQUIREMENTS / 'legacy.txt')['transformers']}.dist-info"


def test_the_locks_agree_and_satisfy_pyproject():
    """One set of versions: the images' locks take the full lock's, and every range in pyproject.toml
    (each extra) and requirements/legacy.in admits its locked version."""
    import tomllib

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    full = _pins(REQUIREMENTS / "lock.txt")
    for name in ("server.txt", "worker.txt"):
        image = _pins(REQUIREMENTS / name)
        assert {k: v for k, v in image.items() if full.get(k) != v} == {}, name
        assert all("--hash=sha256:" in block for block in re.split(r"\n(?=\S)", (REQUIREMENTS / name).read_text())
                   if "==" in block), f"{name}: every pin carries its hashes"
    assert "torch" not in _pins(REQUIREMENTS / "server.txt"), "the front end's image has no torch"
    assert {"torch", "torchvision", "transformers"} <= set(_pins(REQUIREMENTS / "worker.txt"))
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    groups = {"": project["dependencies"], **{k: v for k, v in project["optional-dependencies"].items()
                                               if k != "legacy"}}
    for group, requirements in groups.items():
        for line in requirements:
            requirement = Requirement(line)
            locked = full.get(canonicalize_name(requirement.name))
            assert locked is not None and requirement.specifier.contains(locked, prereleases=True), (group, line, locked)
    legacy = _pins(REQUIREMENTS / "legacy.txt")
    for line in (REQUIREMENTS / "legacy.in").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            requirement = Requirement(line)
            assert requirement.specifier.contains(legacy[canonicalize_name(requirement.name)]), line
    legacy_extra = [Requirement(r) for r in project["optional-dependencies"]["legacy"] if r.startswith("transformers")]
    assert legacy_extra[0].specifier.contains(legacy["transformers"])


def test_images_install_their_lock_with_hashes():
    for name, lock in (("Dockerfile.server", "server.txt"), ("Dockerfile.worker", "worker.txt")):
        text = (DOCKER / name).read_text()
        assert f"COPY requirements/{lock} ./requirements.txt" in text, name
        assert "pip install --no-cache-dir --require-hashes -r requirements.txt" in text, name
        assert "pip install --no-cache-dir --no-deps ." in text, name  # nothing but the lock's versions


@pytest.mark.slow
def test_the_worker_images_lock_resolves_as_it_is(tmp_path):
    """pip resolves the worker image's lock to exactly its pins (no conflict, nothing added), torch and
    transformers being the pair this suite imports Florence-2 with."""
    import importlib.metadata as metadata

    report = tmp_path / "report.json"
    result = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                             "--require-hashes", "--report", str(report), "-r", str(REQUIREMENTS / "worker.txt")],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    from packaging.utils import canonicalize_name

    resolved = {canonicalize_name(item["metadata"]["name"]): item["metadata"]["version"]
                for item in json.loads(report.read_text())["install"]}
    assert resolved == _pins(REQUIREMENTS / "worker.txt")
    for name in ("torch", "torchvision", "transformers"):
        assert resolved[name] == metadata.version(name), name
    from transformers import Florence2ForConditionalGeneration  # noqa: F401 - the pair imports Florence-2


@pytest.mark.slow
def test_up_dashboard_shows_our_queues(tmp_path, tiny_png):
    import signal
    import time
    import urllib.request

    from florence2_serve.client import Florence2Client

    env = dict(os.environ)
    env.pop("REDIS_URL", None)
    from conftest import unused_port

    port = unused_port()
    up = subprocess.Popen([str(Path(sys.executable).parent / "florence2"), "up", "--model", "board=noop", "--kind",
                           "noop", "--in-memory", "--address", "127.0.0.1:0", "--dashboard", "--dashboard-port",
                           str(port)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        address = up.stdout.readline().strip()
        assert address.startswith("127.0.0.1:"), up.stderr.read() if up.poll() is not None else address
        with Florence2Client(address, timeout=30) as client:
            client.detect(tiny_png, "board", "CAPTION")
        deadline, listed = time.monotonic() + 30, None
        while time.monotonic() < deadline:
            try:
                listed = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/0/data/queues.json",
                                                           timeout=5).read())
                break
            except OSError:
                time.sleep(0.5)
        assert listed is not None, "rq-dashboard did not answer"
        assert "florence2:board" in json.dumps(listed)
    finally:
        up.send_signal(signal.SIGTERM)
        up.wait(timeout=60)
    assert f"rq-dashboard at http://127.0.0.1:{port}" in up.stderr.read()
