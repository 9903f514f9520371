"""Helpers for service tests: real valkey, real front end on port 0, workers as real subprocesses."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path


from florence2_serve.common.redis_url import connect

from florence2_serve.common import redis_layout as layout
from florence2_serve.server.settings import ServerSettings
from florence2_serve.server.stack import FrontEndThread


def enqueue_directly(redis_url: str, record, image: bytes, options) -> str:
    """Enqueue `record` through the front end's enqueue function, with no front end: its job id."""
    from florence2_serve.common import rq_bridge
    from florence2_serve.server.redis_pipe import PipelinedRedis

    async def go():
        pipe = PipelinedRedis(redis_url)
        try:
            enqueued = await rq_bridge.enqueue(pipe, record, image, "digest", ttl=options.ttl, max_depth=1000,
                                               templates=rq_bridge.JobTemplates(options), priority=record.priority)
            return enqueued.job_id
        finally:
            await pipe.close()
    return asyncio.run(go())


def start_front_end(redis_url: str, **settings) -> FrontEndThread:
    """An in-process front end: gRPC and (unless http_port=-1) HTTP on free ports."""
    front = FrontEndThread(ServerSettings.from_env(environ={}, redis_url=redis_url, address="127.0.0.1:0",
                                                    health_interval_s=0.2, **settings))
    front.start()
    front.ready.wait(timeout=30)
    assert front.error is None, front.error
    return front


def serve_process(redis_url: str, *flags: str) -> tuple[subprocess.Popen, str]:
    """`florence2 serve` in a process of its own, on a free gRPC port: (the process, its `listening on port …`
    line); the rest of its stderr is drained."""
    process = subprocess.Popen([sys.executable, "-m", "florence2_serve.client.cli", "serve", "--redis-url", redis_url,
                                "--address", "127.0.0.1:0", *flags], stderr=subprocess.PIPE, text=True)
    line = process.stderr.readline()
    while not line.startswith("listening on port "):  # the log lines before it
        assert line, "serve exited before listening"
        line = process.stderr.readline()
    threading.Thread(target=process.stderr.read, daemon=True).start()
    return process, line


class WorkerProcess:
    def __init__(self, redis_url: str, model_arg: str, *args: str, log_dir: Path, worker_id: str):
        self.worker_id = worker_id
        self.log_path = log_dir / f"{worker_id}.log"
        command = [sys.executable, "-m", "florence2_serve.client.cli", "worker", "--model", model_arg,
                   "--device", "cpu", "--worker-id", worker_id, *args]
        env = dict(os.environ, REDIS_URL=redis_url, PYTHONUNBUFFERED="1")
        env.pop("PYTHONPATH", None)
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        self.redis = connect(redis_url)

    def wait_registered(self, timeout: float = 120) -> "WorkerProcess":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"worker exited {self.process.returncode}:\n{self.log()}")
            if self.redis.exists(layout.worker_key(self.worker_id)):
                return self
            time.sleep(0.05)
        raise AssertionError(f"worker did not register:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def stats(self) -> dict:
        return {k.decode(): v.decode() for k, v in self.redis.hgetall(layout.worker_key(self.worker_id)).items()}

    def stop(self, sig=signal.SIGTERM, timeout: float = 30) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.wait(timeout)

    def wait(self, timeout: float = 30) -> int:
        """Wait for the process to exit (killed after timeout); returns its exit status."""
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.redis.close()
        return self.process.returncode


def run_async(coro):
    return asyncio.run(coro)


def collect_in_thread(iterator_factory):
    """Consume a blocking event iterator on a thread; returns (thread, list being filled)."""
    events: list = []
    errors: list = []

    def consume():
        try:
            for event in iterator_factory():
                events.append(event)
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    thread = threading.Thread(target=consume, daemon=True)
    thread.start()
    return thread, events, errors


def wait_for(predicate, timeout: float = 30, interval: float = 0.02, message: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {message}")


def hold(ms: int) -> dict:
    """Generation options that keep a no-op job running for about `ms` milliseconds."""
    return {"min_new_tokens": ms, "max_new_tokens": ms, "num_beams": 1}


def types_of(events) -> list[str]:
    """Event types as their short names: QUEUED, STARTED, RESULT, DONE..."""
    from florence2_serve.v1 import florence2_pb2 as pb

    return [pb.EventType.Name(e.type).removeprefix("EVENT_TYPE_") for e in events]


def reason_of(exc) -> str:
    """The ErrorInfo reason of a failed call, raised by our client or by a raw stub."""
    from florence2_serve.client import RpcError

    return (exc if isinstance(exc, RpcError) else RpcError.from_grpc(exc)).reason
