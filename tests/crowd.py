"""A crowd of watchers in a process of its own: `python tests/crowd.py ADDRESS JOB_ID COUNT`.

One Python gRPC client process holds at most about 2,400 open streams (measured: a client-side
limit, whatever the number of channels), so tests that need more start several of these. Prints
"open" once every Watch call has been started, then one JSON line: how each stream ended.
"""

from __future__ import annotations

import asyncio
import collections
import json
import sys

import grpc

STREAMS_PER_CHANNEL = 50

from florence2_serve.client import AsyncFlorence2Client
from florence2_serve.v1 import florence2_pb2 as pb


async def watch_all(address: str, job_id: str, count: int) -> dict:
    clients = [AsyncFlorence2Client(address, timeout=300) for _ in range(count // STREAMS_PER_CHANNEL + 1)]

    async def one(client) -> str:
        last = "NONE"
        try:
            async for event in client.watch(job_id):
                last = pb.EventType.Name(event.type).removeprefix("EVENT_TYPE_")
        except grpc.aio.AioRpcError as exc:
            last = exc.code().name
        return last

    try:
        tasks = [asyncio.ensure_future(one(clients[i % len(clients)])) for i in range(count)]
        await asyncio.sleep(0)
        print("open", flush=True)
        return dict(collections.Counter(await asyncio.gather(*tasks)))
    finally:
        for client in clients:
            await client.close()


if __name__ == "__main__":
    print(json.dumps(asyncio.run(watch_all(sys.argv[1], sys.argv[2], int(sys.argv[3])))), flush=True)
