"""Deployment files checked offline (no Docker engine, no cluster): Dockerfiles with hadolint, the
compose file against the compose spec, the locks (the environment is the lock; the images install
theirs, which agree with it, resolved with pip's dry run), the Kubernetes manifests against the
Kubernetes schemas and KEDA's ScaledObject schema."""

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
from florence2_serve.common import redis_layout as layout

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


@pytest.mark.parametrize("name", ["Dockerfile.server", "Dockerfile.worker"])
def test_dockerfiles_pass_hadolint(name):
    result = subprocess.run([_tool("hadolint"), "--failure-threshold", "warning", str(DOCKER / name)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfiles_install_dependencies_before_the_sources_and_have_a_healthcheck():
    for name in ("Dockerfile.server", "Dockerfile.worker"):
        text = (DOCKER / name).read_text()
        assert text.index("pip install --no-cache-dir -") < text.index("COPY common"), name
        assert "HEALTHCHECK" in text and "USER florence2" in text, name
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


def _manifests() -> list[dict]:
    return [doc for path in sorted(K8S.glob("*.yaml")) for doc in yaml.safe_load_all(path.read_text()) if doc]


def test_kubernetes_manifests_validate_against_the_kubernetes_schemas():
    import kubernetes_validate

    builtin = [doc for doc in _manifests() if not doc["apiVersion"].startswith("keda.sh/")]
    assert {doc["kind"] for doc in builtin} == {"Service", "StatefulSet", "Deployment"}
    for doc in builtin:
        kubernetes_validate.validate(doc, "1.30.0", strict=True)


def test_keda_scaled_object_validates_and_points_at_the_workers_queue():
    import jsonschema

    schema = json.loads((K8S / "schemas" / "keda-scaledobject-v1alpha1.json").read_text())
    scaled = [doc for doc in _manifests() if doc["kind"] == "ScaledObject"]
    deployments = {doc["metadata"]["name"]: doc for doc in _manifests() if doc["kind"] == "Deployment"}
    assert scaled
    for doc in scaled:
        jsonschema.validate(doc, schema)
        target = deployments[doc["spec"]["scaleTargetRef"]["name"]]
        model = target["metadata"]["labels"]["florence2-serve/model"]
        args = target["spec"]["template"]["spec"]["containers"][0]["args"]
        assert args[args.index("--model") + 1].startswith(f"{model}=")
        triggers = {t["type"]: t["metadata"] for t in doc["spec"]["triggers"]}
        assert triggers["redis"]["listName"] == layout.rq_queue_key(model)
        query = triggers["prometheus"]["query"]
        assert f'florence2_queue_depth{{model="{model}"}}' in query and "florence2_running_jobs" in query
    broken = json.loads(json.dumps(scaled[0]))
    broken["spec"]["triggers"][0]["metadata"]["listLength"] = 8  # a number, not a string: KEDA refuses it
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


def test_kubernetes_front_end_probes_http_health_and_workers_request_a_gpu():
    docs = {(d["kind"], d["metadata"]["name"]): d for d in _manifests()}
    front = docs[("Deployment", "florence2-frontend")]["spec"]["template"]["spec"]["containers"][0]
    # liveness is the process (a Redis outage must not restart front ends), readiness is Redis
    assert front["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert front["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    ports = {p["name"]: p["containerPort"] for p in front["ports"]}
    env = {e["name"]: e["value"] for e in front["env"]}
    assert ports["http"] == int(env["FLORENCE2_HTTP_PORT"]) == 8080
    service = docs[("Service", "florence2-frontend")]["spec"]["ports"]
    assert {"name": "http", "port": 8080, "targetPort": 8080, "appProtocol": "http"} in service
    worker = docs[("Deployment", "florence2-worker-base")]["spec"]["template"]["spec"]["containers"][0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    worker_help = CliRunner().invoke(cli, ["worker", "--help"]).output
    assert all(flag in worker_help for flag in worker["args"] if flag.startswith("--"))
    env_names = {e["name"] for c in (front, worker) for e in c["env"]}
    assert re.findall(r"FLORENCE2_[A-Z_]+", " ".join(env_names))


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
