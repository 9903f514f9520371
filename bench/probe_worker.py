"""`florence2 worker`, with its decode engine's model thread timed (bench/bench_gil.py runs it).

  python bench/probe_worker.py OUT.json WORKER-ARGS...

On the model thread, every decoding step (`_step`), every admission of joining requests (`_admit`) and
every look for more work between steps (the worker's `pull`, when it does not wait) is timed: wall time,
the thread's own CPU time (CLOCK_THREAD_CPUTIME_ID), its context switches and page faults (getrusage
RUSAGE_THREAD). Wall minus CPU is time the thread was off a CPU inside that work: asleep waiting for the
GIL (a voluntary switch: a CPU torch op on one thread never sleeps otherwise) or runnable but preempted (an
involuntary switch: the machine's cores were busy). The totals are written to OUT.json every 0.5 s.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import threading
import time


def main() -> None:
    out, args = sys.argv[1], sys.argv[2:]
    from florence2_serve.worker.decoding.engine import DecodeEngine

    totals = {name: {"calls": 0, "wall_s": 0.0, "cpu_s": 0.0, "voluntary": 0, "involuntary": 0, "page_faults": 0}
              for name in ("step", "admit", "take")}

    def timed(name: str, function):
        total = totals[name]

        def wrapper(*a, **k):
            usage = resource.getrusage(resource.RUSAGE_THREAD)
            started, cpu = time.perf_counter(), time.thread_time()
            try:
                return function(*a, **k)
            finally:
                cpu, wall = time.thread_time() - cpu, time.perf_counter() - started
                after = resource.getrusage(resource.RUSAGE_THREAD)
                total["calls"] += 1
                total["wall_s"] += wall
                total["cpu_s"] += cpu
                total["voluntary"] += after.ru_nvcsw - usage.ru_nvcsw
                total["involuntary"] += after.ru_nivcsw - usage.ru_nivcsw
                total["page_faults"] += after.ru_minflt - usage.ru_minflt
        return wrapper

    DecodeEngine._step = timed("step", DecodeEngine._step)
    DecodeEngine._admit = timed("admit", DecodeEngine._admit)
    serve = DecodeEngine.serve

    def serve_timing_pull(self, pull, done, until_idle=False):
        timed_pull = timed("take", pull)

        def pull_unless_waiting(free_rows, block):  # a pull that may wait for work is not timed
            return (pull if block else timed_pull)(free_rows, block)

        return serve(self, pull_unless_waiting, done, until_idle)

    DecodeEngine.serve = serve_timing_pull

    def write() -> None:
        while True:
            time.sleep(0.5)
            with open(out + ".tmp", "w") as stream:
                json.dump(totals, stream)
            os.replace(out + ".tmp", out)

    threading.Thread(target=write, daemon=True).start()
    from florence2_serve.client.cli import cli

    sys.argv = ["florence2", "worker", *args]
    cli()


if __name__ == "__main__":
    main()
