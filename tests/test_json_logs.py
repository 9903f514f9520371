"""`--log-format json` as a log collector reads it: every line `up` writes to stderr is a JSON object —
a model load, a TLS handshake that fails in gRPC's C core, jobs, a job whose worker is killed — with
RFC 3339 times, and lines about a job carry its task and request_id (lost and requeued jobs too)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from florence2_serve.client import NO_RETRY, Florence2Client, job_spec
from florence2_serve.v1 import florence2_pb2 as pb
from service_helpers import wait_for
from test_security import pki  # noqa: F401 - the CA and server certificate fixture

pytestmark = pytest.mark.slow
RFC3339_MS_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def test_every_line_of_a_json_up_run_is_json(tiny_model_dir, pki, tiny_png):
    cert, key = pki["server"]
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "HF_HUB_DISABLE_PROGRESS_BARS")}
    up = subprocess.Popen([str(Path(sys.executable).parent / "florence2"), "--log-format", "json", "up",
                           "--model", f"tiny={tiny_model_dir}", "--workers", "2", "--batch-size", "1", "--in-memory",
                           "--address", "127.0.0.1:0", "--no-http", "--tls-cert", str(cert), "--tls-key", str(key)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        address = up.stdout.readline().strip()
        assert address, up.stderr.read()
        with Florence2Client(address, timeout=10, retry=NO_RETRY) as plaintext, pytest.raises(Exception):
            plaintext.list_models()  # plaintext against TLS: the C core logs the failed handshake
        with Florence2Client(address, timeout=120, root_certificates=pki["ca"].read_bytes()) as client:
            for i in range(3):
                client.detect(tiny_png, "tiny", "CAPTION", request_id=f"log-{i}")
            held = client.submit(job_spec(tiny_png, "tiny", "OD", request_id="lost-1", min_new_tokens=1000,
                                          max_new_tokens=1000, num_beams=1)).job_id
            wait_for(lambda: client.get_job(held).state == pb.JOB_STATE_RUNNING, timeout=60, message="running")
            worker_id = client.get_job(held).worker_id
            os.kill(int(worker_id.rsplit("-", 2)[1]), signal.SIGKILL)  # its job is found lost and re-run
            wait_for(lambda: client.get_job(held).worker_id not in ("", worker_id), timeout=60,
                     message="the job re-run by the other worker")
            client.cancel(held)
    finally:
        os.killpg(up.pid, signal.SIGTERM)
        try:
            up.wait(timeout=90)
        finally:
            if up.poll() is None:
                os.killpg(up.pid, signal.SIGKILL)
    stderr = up.stderr.read()
    records = []
    for line in stderr.splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            pytest.fail(f"not JSON: {line!r}")
    assert up.returncode == 0, stderr[-3000:]
    assert all(isinstance(r, dict) and {"time", "level", "logger", "message"} <= set(r) for r in records)
    assert all(RFC3339_MS_UTC.match(r["time"]) for r in records), [r["time"] for r in records][:3]
    messages = [r["message"] for r in records]
    assert any("Handshake failed" in m for m in messages), messages  # the C core's line, wrapped
    assert any(m.startswith("florence2 serving tiny") for m in messages)
    assert any("worker metrics:" in m for m in messages) and messages[-1] == "stopped"
    lost = [r for r in records if r.get("job_id") == held and "lost its worker" in r["message"]]
    assert lost and lost[0]["task"] == "OD" and lost[0]["request_id"] == "lost-1" and lost[0]["model"] == "tiny"
    taken = [r for r in records if r.get("job_id") == held and "runs here next" in r["message"]]
    assert taken and taken[0]["task"] == "OD" and taken[0]["request_id"] == "lost-1"
    assert not any("Loading weights" in m for m in messages)  # no progress bars
