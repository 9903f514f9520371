"""The benchmarks' process helpers: start and stop `florence2` processes, wait for their ports and workers,
and read a process's CPU time."""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import time
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def tiny_png() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def start(command: list[str], env: dict, log: Path) -> subprocess.Popen:
    with open(log, "wb") as stream:
        return subprocess.Popen(command, env=env, stdout=stream, stderr=subprocess.STDOUT)


def wait_for_port(log: Path, process: subprocess.Popen, timeout: float = 60) -> int:
    return wait_for_ports(log, process, timeout)[0]


def wait_for_ports(log: Path, process: subprocess.Popen, timeout: float = 60) -> tuple[int, str]:
    """(the gRPC port, the HTTP URL) from `florence2 serve`'s "listening on port N; HTTP at URL" line."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = re.search(r"^listening on port (\d+)(?:; HTTP at (\S+))?", log.read_text(errors="replace"), re.M)
        if found:
            return int(found.group(1)), found.group(2) or ""
        if process.poll() is not None:
            raise RuntimeError(log.read_text())
        time.sleep(0.05)
    raise RuntimeError("front end did not start")


def wait_for_workers(redis_url: str, worker_ids: list[str], timeout: float = 60) -> None:
    import redis

    from florence2_serve.common import redis_layout as layout

    connection = redis.Redis.from_url(redis_url)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(connection.exists(layout.worker_key(w)) for w in worker_ids):
            return
        time.sleep(0.05)
    raise RuntimeError("workers did not register")


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
