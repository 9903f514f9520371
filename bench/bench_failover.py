"""Acknowledged jobs lost across a Sentinel failover, with and without `--redis-wait-replicas`.

    python bench/bench_failover.py [--runs 5] [--clients 3]

Each run: a primary, one replica and three sentinels on loopback (the harness of tests/test_failover.py),
an in-process front end and one no-op worker over the redis+sentinel:// URL, C clients submitting jobs
(a 16x16 PNG, distinct request_ids) as fast as they can; after 1 s the primary is SIGKILLed, the sentinels
promote the replica, the old primary comes back as its replica, the clients submit on for 2 s more. Then
every job whose Submit returned OK is looked up on the new primary: lost = unknown there. Prints each run
and the totals, WAIT off and on; writes bench/out/failover.json.
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUT = Path(__file__).resolve().parent / "out"
sys.path.insert(0, str(REPO / "tests"))  # the loopback Sentinel harness and the in-process front end


def tiny_png() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def one_run(wait_replicas: int, clients: int, image: bytes) -> dict:
    from sentinel_helpers import SentinelSet
    from service_helpers import WorkerProcess, start_front_end

    from florence2_serve.client import Florence2Client, Florence2Error, RetryPolicy, job_spec

    with tempfile.TemporaryDirectory() as folder:
        group = SentinelSet(Path(folder)).start()
        front = start_front_end(group.url, redis_wait_replicas=wait_replicas, redis_wait_timeout_ms=500)
        worker = WorkerProcess(group.url, "nop=noop", "--kind", "noop", log_dir=Path(folder), worker_id="bench-w")
        acknowledged: list[str] = []
        stop = threading.Event()

        def submit_loop(index: int) -> None:
            retry = RetryPolicy(max_attempts=100, initial_backoff_s=0.05, max_backoff_s=0.5, max_elapsed_s=30)
            with Florence2Client(f"127.0.0.1:{front.port}", timeout=10, retry=retry) as client:
                n = 0
                while not stop.is_set():
                    n += 1
                    try:
                        spec = job_spec(image, "nop", "CAPTION", request_id=f"c{index}-{n}")
                        acknowledged.append(client.submit(spec).job_id)
                    except Florence2Error:
                        pass

        threads = [threading.Thread(target=submit_loop, args=(i,)) for i in range(clients)]
        try:
            worker.wait_registered()
            for thread in threads:
                thread.start()
            time.sleep(1.0)
            before = len(acknowledged)
            group.kill_primary()
            promoted = group.wait_failover()
            try:  # the losses are decided at the kill; a slow resync only delays WAIT's answers
                rejoined = group.restart_old_primary()
            except AssertionError:
                rejoined = None
            time.sleep(2.0)
            stop.set()
            for thread in threads:
                thread.join(timeout=60)
            lost = 0
            with Florence2Client(f"127.0.0.1:{front.port}", timeout=30) as client:
                for job_id in acknowledged:
                    try:
                        client.get_job(job_id)
                    except Florence2Error:
                        lost += 1
            return {"acknowledged": len(acknowledged), "before_kill": before, "lost": lost,
                    "promoted_after_s": round(promoted, 2), "old_primary_back_s": round(rejoined, 2) if rejoined is not None else "not in sync within 60 s"}
        finally:
            stop.set()
            front.stop()
            worker.stop()
            group.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--clients", type=int, default=3)
    args = parser.parse_args()
    image = tiny_png()
    report = {"machine": platform.node(), "python": platform.python_version(), "runs": args.runs,
              "clients": args.clients, "date": time.strftime("%Y-%m-%d"), "wait_off": [], "wait_on": []}
    for key, wait in (("wait_off", 0), ("wait_on", 1)):
        for run in range(args.runs):
            result = one_run(wait, args.clients, image)
            report[key].append(result)
            print(f"{key} run {run + 1}: {result}", flush=True)
        total = sum(r["lost"] for r in report[key])
        acked = sum(r["acknowledged"] for r in report[key])
        print(f"{key}: {total} of {acked} acknowledged jobs lost in {args.runs} runs", flush=True)
    OUT.mkdir(exist_ok=True)
    (OUT / "failover.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
