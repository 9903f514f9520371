"""The floor under the front end: what grpc.aio itself costs per RPC, with a servicer that does nothing.

    python bench/bench_grpc_floor.py [--rpcs 5000] [--clients 64] [--client python|go]

An empty Florence2Service in its own process answers Run with the four events a real job streams
(QUEUED, STARTED, RESULT, DONE; no Redis, no validation) and Submit with an empty reply. Reported:
server CPU ms per RPC (from /proc) and RPCs/s, for each. Whatever the front end spends beyond this
is ours; this part is gRPC's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_queue import build_go_client  # noqa: E402
from bench_stack import cpu_seconds  # noqa: E402


def serve() -> None:
    import grpc

    from florence2_serve.v1 import florence2_pb2 as pb
    from florence2_serve.v1 import florence2_pb2_grpc as pb_grpc

    class Empty(pb_grpc.Florence2ServiceServicer):
        async def Run(self, request, context):
            for event_type, state in ((1, 1), (2, 2), (3, 2), (4, 3)):
                event = pb.JobEvent(event_id="1764065436000-0", job_id="0" * 32, type=event_type, state=state)
                if event_type == 3:
                    event.result.CopyFrom(pb.Result(task=pb.TASK_TYPE_CAPTION, image_width=16, image_height=16))
                yield pb.RunResponse(event=event)

        async def Submit(self, request, context):
            return pb.SubmitResponse(job_id="0" * 32, created=True, state=pb.JOB_STATE_QUEUED)

    async def main():
        server = grpc.aio.server()
        pb_grpc.add_Florence2ServiceServicer_to_server(Empty(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        print(port, flush=True)
        await server.wait_for_termination()

    asyncio.run(main())


async def python_client(address: str, method: str, rpcs: int, clients: int) -> float:
    from florence2_serve.client import AsyncFlorence2Client, job_spec

    image = b"\x89PNG" + b"\0" * 100
    async with AsyncFlorence2Client(address, timeout=60) as client:
        left = [rpcs]

        async def one():
            while left[0] > 0:
                left[0] -= 1
                spec = job_spec(image, "nop", "CAPTION")
                if method == "run":
                    [e async for e in client.run(spec)]
                else:
                    await client.submit(spec)

        started = time.perf_counter()
        await asyncio.gather(*[one() for _ in range(clients)])
        return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rpcs", type=int, default=5000)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--client", choices=["python", "go"], default="python")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve()
        return
    server = subprocess.Popen([sys.executable, __file__, "--serve"], stdout=subprocess.PIPE, text=True)
    address = f"127.0.0.1:{server.stdout.readline().strip()}"
    results = {}
    try:
        methods = ["run"] if args.client == "go" else ["run", "submit"]
        go_binary = build_go_client(Path(tempfile.mkdtemp(prefix="grpc-floor-"))) if args.client == "go" else None
        for method in methods:
            before = cpu_seconds(server.pid)
            if go_binary:
                image = Path(tempfile.mkdtemp()) / "x.png"
                image.write_bytes(b"\x89PNG")
                out = subprocess.run([str(go_binary), address, "nop", str(args.rpcs), str(args.clients), str(image)],
                                     capture_output=True, text=True, check=False).stdout
                # The Go load client insists on DONE as the last event: the empty server sends it.
                elapsed = json.loads(out.strip().splitlines()[-1])["seconds"]
            else:
                elapsed = asyncio.run(python_client(address, method, args.rpcs, args.clients))
            cpu = cpu_seconds(server.pid) - before
            results[method] = {"rpcs_per_s": args.rpcs / elapsed, "server_cpu_ms_per_rpc": cpu * 1000 / args.rpcs}
    finally:
        server.kill()
    print(json.dumps({"client": args.client, "clients": args.clients, "rpcs": args.rpcs, **results}, indent=2))
    for method, row in results.items():
        print(f"grpc floor ({method}, {args.client} client): {row['rpcs_per_s']:.0f} RPCs/s, "
              f"server CPU {row['server_cpu_ms_per_rpc']:.3f} ms per RPC")


if __name__ == "__main__":
    main()
