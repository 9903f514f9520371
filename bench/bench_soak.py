"""Soak benchmark: does the real `up` stack keep its shape over many jobs?

    python bench/bench_soak.py [--jobs 200000] [--model noop|tiny] [--workers 2] [--clients 16]

Starts `florence2 up --in-memory --workers W` (the no-op engine by default; `--model tiny` builds the
tiny Florence-2 and runs 20,000 jobs by default), then C asyncio clients in a process of their own
Submit a job and Watch it to its end, one after the other, every job a distinct request_id and the
same image (examples/car.jpg by default, so each job decodes a real 640x480 JPEG).

Prints, at every tenth of the jobs, the RSS of every process of the stack (front end = `up` itself,
each worker, the embedded valkey-server) read from /proc; then each one's growth from the mark at 10 %
to the end (target: within 3 %), Redis `used_memory` per retained (ended, within its TTL) job, and
the jobs' fates read back from Redis: every job the clients were told was submitted has exactly one
terminal event, DONE, and exactly one RESULT (0 lost, 0 duplicated). Writes bench/out/soak-<model>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUT = Path(__file__).resolve().parent / "out"


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def peak_rss_mb(pids: dict[str, int], seconds: float = 2.0, samples: int = 20) -> dict[str, float]:
    """Each process's highest RSS over a short window. One reading is noisy (a worker's RSS swings with
    the images in flight: a 640x480 image is 1.2 MB decoded); the peak over a window of many batches is
    what the in-flight work needs plus whatever has leaked."""
    peak = {name: 0.0 for name in pids}
    for _ in range(samples):
        for name, pid in pids.items():
            peak[name] = max(peak[name], rss_mb(pid))
        time.sleep(seconds / samples)
    return {name: round(value, 1) for name, value in peak.items()}


def children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def command_line(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")


def stack_processes(up_pid: int) -> dict[str, int]:
    """name -> pid for `up` (the front end runs in it), its workers and the embedded valkey-server."""
    processes = {"front end (up)": up_pid}
    workers = 0
    for pid in children(up_pid):
        line = command_line(pid)
        if "worker" in line:
            workers += 1
            processes[f"worker {workers}"] = pid
        elif any("embedded_redis" in part for part in line):
            for server in children(pid):
                processes["valkey"] = server
    return processes


# -- the clients (a process of their own) ---------------------------------------------------------

async def run_clients(address: str, model: str, jobs: int, clients: int, image: bytes, ids_path: Path,
                      pause_after: int) -> dict:
    """Run `jobs` jobs from `clients` concurrent clients; after `pause_after` of them, print "paused" and
    wait for a line on stdin (the stack is measured at rest) before going on."""
    from florence2_serve.client import AsyncFlorence2Client, job_spec
    from florence2_serve.v1 import florence2_pb2 as pb

    ended: dict[str, int] = {}
    ids: list[str] = []

    async def one(client, left: list[int]) -> None:
        while left[0] > 0:
            left[0] -= 1
            job_id = (await client.submit(job_spec(image, model, "OD"))).job_id
            ids.append(job_id)
            last = None
            async for event in client.watch(job_id):
                last = event
            name = pb.EventType.Name(last.type) if last is not None else "NONE"
            ended[name] = ended.get(name, 0) + 1

    channels = [AsyncFlorence2Client(address, timeout=600) for _ in range(max(1, clients // 8))]
    seconds = 0.0
    try:
        for phase, count in enumerate((pause_after, jobs - pause_after)):
            if phase == 1:
                print("paused", flush=True)
                await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
            left = [count]
            started = time.perf_counter()
            await asyncio.gather(*[one(channels[i % len(channels)], left) for i in range(clients)])
            seconds += time.perf_counter() - started
    finally:
        for client in channels:
            await client.close()
    ids_path.write_text("\n".join(ids))
    return {"seconds": seconds, "ended": ended, "submitted": len(ids)}


# -- reading the jobs back ------------------------------------------------------------------------

def fates(url: str, ids: list[str]) -> dict:
    """Lost: no DONE. Duplicated: more than one RESULT or terminal event, or more than one STARTED."""
    import redis

    from florence2_serve.common import redis_layout as layout

    connection = redis.Redis.from_url(url)
    lost = duplicated = 0
    for job_id in ids:
        types = [event.type.value for event in layout.read_events(connection, job_id)]
        terminal = [t for t in types if layout.EventType(t).terminal]
        if terminal != ["DONE"]:
            lost += 1
        if types.count("RESULT") > 1 or types.count("STARTED") > 1 or len(terminal) > 1:
            duplicated += 1
    return {"jobs": len(ids), "lost": lost, "duplicated": duplicated, "distinct_ids": len(set(ids))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=None, help="default 200,000 (no-op) or 20,000 (tiny)")
    parser.add_argument("--model", choices=["noop", "tiny"], default="noop")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--image", type=Path, default=REPO / "examples" / "car.jpg")
    parser.add_argument("--as-clients", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.as_clients:
        address, model, jobs, clients, ids_path, pause_after = args.as_clients
        report = asyncio.run(run_clients(address, model, int(jobs), int(clients), args.image.read_bytes(),
                                         Path(ids_path), int(pause_after)))
        print(json.dumps(report), flush=True)
        return
    jobs = args.jobs or (200_000 if args.model == "noop" else 20_000)

    import redis

    from florence2_serve.common import redis_layout as layout

    OUT.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-soak-"))
    exe = [sys.executable, "-m", "florence2_serve.client.cli"]
    if args.model == "tiny":
        subprocess.run([*exe, "make-test-model", str(work / "tiny")], check=True, stdout=subprocess.DEVNULL)
        model_args = ["--model", f"tiny={work / 'tiny'}", "--device", "cpu"]
        model = "tiny"
    else:
        model_args = ["--model", "nop=noop", "--kind", "noop"]
        model = "nop"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    up = subprocess.Popen([*exe, "up", *model_args, "--in-memory", "--workers", str(args.workers),
                           "--address", "127.0.0.1:0", "--max-queue-depth", str(jobs + 1000)],
                          env=env, stdout=subprocess.PIPE, stderr=open(work / "up.log", "wb"), text=True)
    clients = None
    try:
        address = up.stdout.readline().strip()
        if not address:
            raise SystemExit(f"up did not start:\n{(work / 'up.log').read_text()}")
        processes = stack_processes(up.pid)
        url = next(line.split("(redis ", 1)[1].split(")", 1)[0] for line in (work / "up.log").read_text().splitlines()
                   if "(redis " in line)
        monitor = redis.Redis.from_url(url)
        worker_ids = [w.decode() for w in monitor.smembers(layout.model_workers_key(model))]

        def done() -> int:
            return sum(int(monitor.hget(layout.worker_key(w), "jobs_done") or 0) for w in worker_ids)

        used_before = monitor.info("memory")["used_memory"]
        warm_up = max(1, jobs // 10)
        clients = subprocess.Popen(
            [sys.executable, __file__, "--image", str(args.image), "--as-clients", address, model, str(jobs),
             str(args.clients), str(work / "ids.txt"), str(warm_up)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        marks: list[dict] = []

        def mark(under_load: bool) -> None:
            count = done()
            row = {"jobs": count, "seconds": round(time.perf_counter() - started, 1),
                   "rss_mb": peak_rss_mb(processes) if under_load else
                   {name: round(rss_mb(pid), 1) for name, pid in processes.items()},
                   "under_load": under_load, "redis_used_mb": round(monitor.info("memory")["used_memory"] / 1e6, 1)}
            marks.append(row)
            print(f"| {count:,} | {'peak under load' if under_load else 'at rest'} | "
                  + " | ".join(f"{v:.1f}" for v in row["rss_mb"].values()) + f" | {row['redis_used_mb']:.1f} MB |",
                  flush=True)

        started = time.perf_counter()
        print("| jobs | RSS MB | " + " | ".join(processes) + " | redis used_memory |\n|"
              + "---|" * (len(processes) + 3), flush=True)
        if clients.stdout.readline().strip() != "paused":
            raise SystemExit("clients failed in the warm-up")
        time.sleep(2)  # let the last batch's buffers go
        mark(under_load=False)
        at_rest = [marks[-1]]
        clients.stdin.write("go\n")
        clients.stdin.flush()
        next_mark = 2 * warm_up
        while clients.poll() is None:
            if done() >= next_mark:
                mark(under_load=True)
                next_mark += warm_up
            time.sleep(0.2)
        time.sleep(2)
        mark(under_load=False)
        at_rest.append(marks[-1])
        report = json.loads(clients.stdout.read().strip().splitlines()[-1])
        if clients.returncode != 0:
            raise SystemExit(f"clients failed: {report}")
        used_after = monitor.info("memory")["used_memory"]
        ids = (work / "ids.txt").read_text().split()
        read_back = fates(url, ids)
        retained = sum(1 for key in monitor.scan_iter(match=f"{layout.PREFIX}:job:*", count=10_000))
    finally:
        if clients is not None and clients.poll() is None:
            clients.kill()
        up.send_signal(signal.SIGTERM)
        try:
            up.wait(timeout=60)
        except subprocess.TimeoutExpired:
            up.kill()
    # valkey grows with the jobs it retains (their TTL): that is the bytes-per-job figure, not a leak.
    measured = [name for name in processes if name != "valkey"]
    baseline, end = at_rest
    growth = {name: round(100 * (end["rss_mb"][name] - baseline["rss_mb"][name]) / baseline["rss_mb"][name], 2)
              for name in measured}
    import grpc
    import rq

    result = {
        "command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d"), "python": platform.python_version(),
        "grpcio": grpc.__version__, "rq": rq.__version__, "cpus": os.cpu_count(), "model": args.model,
        "workers": args.workers, "clients": args.clients, "image": args.image.name, "jobs": jobs,
        "jobs_per_s": round(jobs / report["seconds"], 1), "marks": marks, "baseline_jobs": baseline["jobs"],
        "rss_growth_percent_after_baseline": growth, "ended": report["ended"],
        "redis_bytes_per_retained_job": round((used_after - used_before) / max(1, retained)),
        "retained_jobs": retained, "read_back": read_back,
    }
    (OUT / f"soak-{args.model}.json").write_text(json.dumps(result, indent=2))
    print(f"\n{jobs:,} jobs in {report['seconds']:.0f} s ({result['jobs_per_s']} jobs/s); clients saw {report['ended']}")
    print("RSS growth at rest, from {:,} jobs to the end: ".format(baseline["jobs"])
          + ", ".join(f"{name} {value:+.2f} %" for name, value in growth.items()))
    print(f"Redis: {result['redis_bytes_per_retained_job']} bytes per retained job ({retained:,} retained)")
    print(f"read back: {read_back['jobs']:,} jobs, {read_back['lost']} lost, {read_back['duplicated']} duplicated")
    worst = max(growth.values())
    ok = worst <= 3.0 and read_back["lost"] == 0 and read_back["duplicated"] == 0
    print("soak: " + ("PASS" if ok else "FAIL") + f" (worst RSS growth {worst:+.2f} %, target within 3 %)")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
