"""One machine, one command: Redis (embedded unless a URL is given), the front end and N workers.

Used by `florence2 up` and `florence2 detect --embedded`. Workers are real subprocesses
(`florence2 worker`), each in a session of its own; the embedded Redis runs in a keeper process
(server/embedded_redis.py). The stack supervises what it starts: a worker that dies is restarted
with backoff (and logged). Stopping drains the workers first, then stops the front end, then Redis.
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
from dataclasses import dataclass, field, replace
from pathlib import Path

from florence2_serve.common import redis_layout as layout
from florence2_serve.common.model_arg import parse_model_arg
from florence2_serve.common.redis_url import connect

from .app import AddressInUse, FrontEnd, check_free, check_redis, create_server
from .settings import ServerSettings

log = logging.getLogger(__name__)


class StackError(RuntimeError):
    pass


def default_data_dir(environ=None) -> Path:
    """Where `up` keeps its Redis data by default: $XDG_DATA_HOME/florence2-serve/redis."""
    environ = os.environ if environ is None else environ
    base = Path(environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return base / "florence2-serve" / "redis"


@dataclass
class StackConfig:
    models: list[str]  # NAME=PATH_OR_ID, or a bare path (named after its last component)
    workers: int = 1
    redis_url: str | None = None  # None: run an embedded valkey-server
    data_dir: Path | None = None  # embedded Redis: keep data here (AOF); None: in memory only
    redis_maxmemory: str | None = None  # embedded Redis: its maxmemory (None: a quarter of the RAM)
    address: str = "127.0.0.1:50051"
    worker_args: list[str] = field(default_factory=list)  # extra `florence2 worker` flags
    log_dir: Path | None = None  # worker logs go here instead of this process's stderr
    ready_timeout_s: float = 300.0
    drain_timeout_s: float = 30.0  # after this a second SIGTERM (stop now), then SIGKILL
    server_settings: dict = field(default_factory=dict)
    # Every worker serves Prometheus metrics on 127.0.0.1 (or FLORENCE2_WORKER_METRICS_HOST): the i-th worker
    # on worker_metrics_port + i, or on a free port each when None (printed by `up`).
    worker_metrics_port: int | None = None

    def model_specs(self) -> list[tuple[str, str]]:
        try:
            return [parse_model_arg(model) for model in self.models]
        except ValueError as exc:
            raise StackError(str(exc)) from None


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


@dataclass
class _Worker:
    name: str
    path: str
    index: int
    process: subprocess.Popen
    log_path: Path | None
    started: float = field(default_factory=time.monotonic)
    restarts: int = 0
    restart_at: float | None = None


class LocalStack:
    RESTART_BACKOFF_S = (1, 2, 5, 10, 30)
    STABLE_AFTER_S = 60.0  # a worker up this long has its backoff reset

    def __init__(self, config: StackConfig):
        self.config = config
        self.specs = config.model_specs()
        self.redis_url = config.redis_url
        self.keeper: subprocess.Popen | None = None
        self.front: FrontEndThread | None = None
        self.workers: list[_Worker] = []
        self._stopping = threading.Event()
        self._hurry = threading.Event()
        self._lock = threading.Lock()
        self._supervisor: threading.Thread | None = None
        self.metrics_ports: dict[tuple[str, int], int] = {}

    @property
    def address(self) -> str:
        host = self.config.address.rsplit(":", 1)[0]
        return f"{host}:{self.front.port}"

    @property
    def http_url(self) -> str | None:
        """The HTTP port's base URL (the playground is at its root); None without one."""
        return self.front.front_end.http_url if self.front and self.front.front_end else None

    def __enter__(self) -> "LocalStack":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- start ----------------------------------------------------------------------------------

    def start(self) -> None:
        try:  # a busy port is refused before anything is started
            check_free(self.config.address)
            settings = ServerSettings.from_env(address=self.config.address, **self.config.server_settings)
            if settings.http_port > 0:
                check_free(f"{settings.http_bind_host}:{settings.http_port}")
            self.metrics_ports = self._plan_metrics_ports()
        except (AddressInUse, ValueError) as exc:  # ValueError: a setting out of range
            raise StackError(str(exc)) from None
        if self.redis_url:
            try:
                asyncio.run(check_redis(self.redis_url))
            except RuntimeError as exc:
                raise StackError(str(exc)) from None
        else:
            self.redis_url = self._start_redis()
        # The ports open once every worker is live: a client never meets a model `up` was told to serve
        # as unknown (its worker still loading); until then it finds nothing listening.
        for name, path in self.specs:
            for index in range(self.config.workers):
                self.workers.append(self._spawn(name, path, index))
        self.wait_ready()
        self.front = FrontEndThread(replace(settings, redis_url=self.redis_url))
        self.front.start()
        self.front.ready.wait(timeout=30)
        if self.front.error is not None:
            raise StackError(str(self.front.error))
        self._supervisor = threading.Thread(target=self._supervise, name="florence2-supervisor", daemon=True)
        self._supervisor.start()

    def _plan_metrics_ports(self) -> dict[tuple[str, int], int]:
        slots = [(name, index) for name, _ in self.specs for index in range(self.config.workers)]
        base = self.config.worker_metrics_port
        if base is None:
            return dict(zip(slots, free_ports(len(slots))))
        if not 0 < base <= 65535 - len(slots) + 1:
            raise ValueError(f"worker metrics port {base} leaves no room for {len(slots)} worker(s)")
        ports = {slot: base + i for i, slot in enumerate(slots)}
        for port in ports.values():
            try:
                check_free(f"127.0.0.1:{port}")
            except AddressInUse:
                raise AddressInUse(f"cannot serve worker metrics on port {port}: the port is in use "
                                   f"(--worker-metrics-port {base} gives worker i port {base}+i)") from None
        return ports

    def _metrics_port_for(self, name: str, index: int) -> int:
        """The worker's planned port, or a free one if something took it since (a restart never fails on it)."""
        port = self.metrics_ports[(name, index)]
        try:
            check_free(f"127.0.0.1:{port}")
        except AddressInUse:
            (port,) = free_ports(1)
            log.warning("worker %d of model %s: its metrics port was taken; now on port %d", index, name, port)
            self.metrics_ports[(name, index)] = port
        return port

    def _start_redis(self) -> str:
        where = ["--data-dir", str(self.config.data_dir)] if self.config.data_dir else ["--in-memory"]
        if self.config.redis_maxmemory:
            where += ["--maxmemory", self.config.redis_maxmemory]
        self.keeper = subprocess.Popen(
            [sys.executable, "-m", "florence2_serve.server.embedded_redis", *where],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
            env=_child_env())
        url = self.keeper.stdout.readline().strip()
        if not url:
            self.keeper.wait(timeout=10)
            message = (self.keeper.stderr.read() or "").strip().splitlines()
            self.keeper = None
            raise StackError((message[-1] if message else "embedded Redis did not start").removeprefix("error: "))
        threading.Thread(target=_drain, args=(self.keeper.stderr,), daemon=True).start()
        log.info("embedded valkey-server at %s (%s)", url,
                 f"data in {self.config.data_dir}" if self.config.data_dir else "in memory only")
        return url

    def _spawn(self, name: str, path: str, index: int, restarts: int = 0) -> _Worker:
        command = [sys.executable, "-m", "florence2_serve.client.cli", "worker", "--model", f"{name}={path}",
                   "--exit-with-parent", "--metrics-port", str(self._metrics_port_for(name, index)),
                   *self.config.worker_args]
        env = _child_env(REDIS_URL=self.redis_url, PYTHONUNBUFFERED="1")
        log_path = None
        stream = None
        if self.config.log_dir is not None:
            self.config.log_dir.mkdir(parents=True, exist_ok=True)
            log_path = self.config.log_dir / f"worker-{name}-{index}.log"
            stream = open(log_path, "ab")  # noqa: SIM115 - owned by the child
        # Own session: a terminal's Ctrl-C reaches only `up`, which then drains the workers first.
        process = subprocess.Popen(command, env=env, stdout=stream, stderr=subprocess.STDOUT if stream else None,
                                   start_new_session=True)
        if stream is not None:
            stream.close()
        return _Worker(name, path, index, process, log_path, restarts=restarts)

    def wait_ready(self) -> None:
        """Block until every worker has registered (or one of them died)."""
        connection = connect(self.redis_url)
        deadline = time.monotonic() + self.config.ready_timeout_s
        try:
            while time.monotonic() < deadline:
                for worker in self.workers:
                    if worker.process.poll() is not None:
                        raise StackError(f"worker for {worker.name} exited with code {worker.process.returncode}"
                                         + (f":\n{_tail(worker.log_path)}" if worker.log_path else ""))
                live = {name: sum(1 for wid in connection.smembers(layout.model_workers_key(name))
                                  if connection.exists(layout.worker_key(wid.decode())))
                        for name, _ in self.specs}
                if all(count >= self.config.workers for count in live.values()):
                    return
                time.sleep(0.1)
            raise StackError(f"workers not ready after {self.config.ready_timeout_s}s")
        finally:
            connection.close()

    # -- supervision ----------------------------------------------------------------------------

    def _supervise(self) -> None:
        while not self._stopping.wait(0.5):
            if self.keeper is not None and self.keeper.poll() is not None:
                log.error("embedded Redis exited (code %s); stopping the stack", self.keeper.returncode)
                os.kill(os.getpid(), signal.SIGTERM)
                return
            with self._lock:
                for i, worker in enumerate(self.workers):
                    self.workers[i] = self._check(worker)

    def _check(self, worker: _Worker) -> _Worker:
        now = time.monotonic()
        if worker.restart_at is not None:
            if now < worker.restart_at or self._stopping.is_set():
                return worker
            log.info("restarting worker %d of model %s (restart %d)", worker.index, worker.name, worker.restarts)
            return self._spawn(worker.name, worker.path, worker.index, restarts=worker.restarts)
        code = worker.process.poll()
        if code is None:
            if worker.restarts and now - worker.started > self.STABLE_AFTER_S:
                worker.restarts = 0
            return worker
        delay = self.RESTART_BACKOFF_S[min(worker.restarts, len(self.RESTART_BACKOFF_S) - 1)]
        log.warning("worker %d of model %s exited with code %s; restarting it in %d s%s", worker.index,
                    worker.name, code, delay, f"\n{_tail(worker.log_path, 10)}" if worker.log_path else "")
        worker.restarts += 1
        worker.restart_at = now + delay
        return worker

    # -- stop -----------------------------------------------------------------------------------

    def hurry(self) -> None:
        """A second interrupt: workers stop now (unfinished jobs go back to their queues)."""
        self._hurry.set()

    def stop(self) -> None:
        self._stopping.set()
        if self._supervisor is not None:
            self._supervisor.join(timeout=5)
        with self._lock:
            workers, self.workers = self.workers, []
        running = [w.process for w in workers if w.process.poll() is None]
        for process in running:
            process.send_signal(signal.SIGTERM)
        self._wait(running, self.config.drain_timeout_s, on_hurry=signal.SIGTERM)
        running = [p for p in running if p.poll() is None]
        for process in running:  # the second SIGTERM: stop now, requeue
            process.send_signal(signal.SIGTERM)
        self._wait(running, 10)
        for process in running:
            if process.poll() is None:
                log.warning("worker %d did not stop; killing it", process.pid)
                process.kill()
                process.wait()
        if self.front is not None:
            self.front.stop()
            self.front = None
        if self.keeper is not None:
            self.keeper.send_signal(signal.SIGTERM)
            try:
                self.keeper.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.keeper.kill()
                self.keeper.wait()
            self.keeper = None

    def _wait(self, processes: list[subprocess.Popen], timeout: float, on_hurry=None) -> None:
        deadline = time.monotonic() + timeout
        hurried = False
        while time.monotonic() < deadline and any(p.poll() is None for p in processes):
            if on_hurry is not None and self._hurry.is_set() and not hurried:
                hurried = True
                for process in processes:
                    if process.poll() is None:
                        process.send_signal(on_hurry)
            time.sleep(0.05)


def free_ports(count: int) -> list[int]:
    """`count` distinct ports free on 127.0.0.1 now (held open together so they differ)."""
    import socket

    probes = [socket.socket() for _ in range(count)]
    try:
        for probe in probes:
            probe.bind(("127.0.0.1", 0))
        return [probe.getsockname()[1] for probe in probes]
    finally:
        for probe in probes:
            probe.close()


def _child_env(**extra) -> dict:
    env = dict(os.environ)
    env.update(extra)
    return env


def _drain(stream) -> None:
    for line in stream:
        log.warning("embedded Redis: %s", line.rstrip())


def _tail(path: Path | None, lines: int = 30) -> str:
    if path is None or not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
