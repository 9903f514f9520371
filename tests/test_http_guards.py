"""The HTTP port's guards on a live stack: body limits (with a raw socket, to show what is never read),
slow uploads, bearer tokens, CORS and TLS."""

from __future__ import annotations

import base64
import json
import socket
import time

import pytest
import requests

from http_helpers import CAR, EVENTS, reason, sse, stack  # noqa: F401 - stack: the module's fixture
from service_helpers import start_front_end
from test_security import pki  # noqa: F401 - the CA and server certificate fixture


# -- bounds ----------------------------------------------------------------------------------------------

def _raw(port: int, head: bytes, body: bytes = b"", wait_s: float = 10.0) -> tuple[int, bytes, float]:
    """Send bytes over a plain socket; (HTTP status, the reply, seconds until it came)."""
    with socket.create_connection(("127.0.0.1", port), timeout=wait_s) as connection:
        started = time.monotonic()
        connection.sendall(head + body)
        reply = b""
        while b"\r\n\r\n" not in reply:
            chunk = connection.recv(65536)
            if not chunk:
                break
            reply += chunk
        return int(reply.split(b" ", 2)[1]), reply, time.monotonic() - started


def test_an_upload_over_the_image_limit_is_refused_before_its_body_is_read(stack):
    front = start_front_end(stack.url, max_image_bytes=50_000)
    try:
        port = front.front_end.http_port
        head = (b"POST /v1/jobs:run HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                b"Content-Length: 900000000\r\n\r\n")
        status, reply, seconds = _raw(port, head)  # 900 MB announced, none of it sent
        assert status == 429 and b"IMAGE_TOO_LARGE" in reply and seconds < 5
        big = CAR.read_bytes() + b"\0" * 60_000
        chunked = requests.post(f"http://127.0.0.1:{port}/v1/jobs", files={"image": ("big.jpg", big)},
                                data={"model": "nop", "task": "OD"}, timeout=30)
        assert chunked.status_code == 429 and reason(chunked.json()) == "IMAGE_TOO_LARGE"
        as_json = requests.post(f"http://127.0.0.1:{port}/v1/jobs", timeout=30,
                                json={"model": "nop", "task": "OD", "image": base64.b64encode(big).decode()})
        assert as_json.status_code == 429 and reason(as_json.json()) == "IMAGE_TOO_LARGE"
    finally:
        front.stop()


def test_a_slow_uploader_is_cut_off_and_queues_nothing(stack):
    front = start_front_end(stack.url, http_read_timeout_s=1.0)
    try:
        depth_before = stack.client.list_models()[0].queue_depth
        head = (b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: 5000\r\n\r\n")
        status, reply, seconds = _raw(front.front_end.http_port, head, b'{"model": "nop", ')
        assert status == 504 and b"UPLOAD_TOO_SLOW" in reply and 0.9 < seconds < 5
        assert stack.client.list_models()[0].queue_depth == depth_before
        # the port still serves others meanwhile
        assert requests.get(f"http://127.0.0.1:{front.front_end.http_port}/healthz", timeout=5).ok
    finally:
        front.stop()


# -- auth, CORS, TLS ---------------------------------------------------------------------------------------

def test_bearer_tokens_guard_the_api_but_not_health_or_the_document(stack):
    front = start_front_end(stack.url, token="s3cret,next")
    base = f"http://127.0.0.1:{front.front_end.http_port}"
    try:
        denied = requests.get(f"{base}/v1/models", timeout=10)
        assert denied.status_code == 401 and reason(denied.json()) == "UNAUTHENTICATED"
        wrong = requests.get(f"{base}/v1/models", headers={"Authorization": "Bearer nope"}, timeout=10)
        assert wrong.status_code == 401
        assert requests.get(f"{base}/v1/models", headers={"Authorization": "bearer next"}, timeout=10).ok
        with CAR.open("rb") as image:
            run = requests.post(f"{base}/v1/jobs:run", files={"image": image}, data={"model": "nop", "task": "OD"},
                                headers={"Authorization": "Bearer s3cret"}, stream=True, timeout=30)
            assert [json.loads(e["data"])["event"]["type"] for e in sse(run) if "data" in e] == EVENTS
        for open_path in ("/healthz", "/readyz", "/v1/openapi.json", "/"):
            assert requests.get(f"{base}{open_path}", timeout=10).ok, open_path
    finally:
        front.stop()


def test_cors_is_off_by_default_and_allows_only_the_configured_origins(stack):
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}
    default = requests.get(f"{stack.base}/v1/models", headers={"Origin": "https://app.example"}, timeout=10)
    assert "Access-Control-Allow-Origin" not in default.headers
    refused = requests.options(f"{stack.base}/v1/jobs", headers=preflight, timeout=10)
    assert refused.status_code == 403 and reason(refused.json()) == "ORIGIN_NOT_ALLOWED"
    front = start_front_end(stack.url, http_cors_origins="https://app.example")
    base = f"http://127.0.0.1:{front.front_end.http_port}"
    try:
        allowed = requests.options(f"{base}/v1/jobs", headers=preflight, timeout=10)
        assert allowed.status_code == 204
        assert allowed.headers["Access-Control-Allow-Origin"] == "https://app.example"
        assert "Authorization" in allowed.headers["Access-Control-Allow-Headers"]
        call = requests.get(f"{base}/v1/models", headers={"Origin": "https://app.example"}, timeout=10)
        assert call.headers["Access-Control-Allow-Origin"] == "https://app.example"
        other = requests.get(f"{base}/v1/models", headers={"Origin": "https://evil.example"}, timeout=10)
        assert "Access-Control-Allow-Origin" not in other.headers
    finally:
        front.stop()


def test_https_with_the_grpc_certificate(stack, pki):
    cert, key = pki["server"]
    front = start_front_end(stack.url, tls_cert=str(cert), tls_key=str(key))
    try:
        assert front.front_end.http_url.startswith("https://")
        url = f"https://localhost:{front.front_end.http_port}/v1/models"
        assert requests.get(url, verify=str(pki["ca"]), timeout=10).json()["models"][0]["name"] == "nop"
        with pytest.raises(requests.exceptions.ConnectionError):
            requests.get(url.replace("https", "http"), timeout=10)
    finally:
        front.stop()


def test_probe_port_answers_plaintext_when_the_api_needs_mtls_and_tokens(stack, pki, caplog):
    """kubelet cannot present a client certificate: with TLS, mTLS and tokens on the API ports, the probe
    port still answers /healthz and /readyz[?model=] in plaintext, and serves nothing else."""
    import logging

    from conftest import unused_port

    cert, key = pki["server"]
    port = unused_port()
    with caplog.at_level(logging.INFO, logger="florence2_serve.server.app"):
        front = start_front_end(stack.url, tls_cert=str(cert), tls_key=str(key), tls_client_ca=str(pki["ca"]),
                                token="s3cret", health_port=port)
    try:
        assert front.front_end.health_port == port
        probe = f"http://127.0.0.1:{port}"
        assert requests.get(f"{probe}/healthz", timeout=10).json() == {"status": "SERVING"}
        assert requests.get(f"{probe}/readyz", timeout=10).status_code == 200
        assert requests.get(f"{probe}/readyz?model=nop", timeout=10).status_code == 200
        missing = requests.get(f"{probe}/readyz?model=nobody", timeout=10)
        assert missing.status_code == 503 and reason(missing.json()) == "NO_LIVE_WORKER"
        assert requests.get(f"{probe}/v1/models", timeout=10).status_code == 404  # the API is not on it
        with pytest.raises(requests.exceptions.ConnectionError):  # the API port wants a client certificate
            requests.get(f"https://localhost:{front.front_end.http_port}/healthz", verify=str(pki["ca"]), timeout=10)
        started = [r.getMessage() for r in caplog.records if "front end listening" in r.getMessage()]
        assert started and all(part in started[0] for part in (
            "(mTLS)", "tokens required", "reflection on", f"probes on http://127.0.0.1:{port}", "no metrics"))
    finally:
        front.stop()
