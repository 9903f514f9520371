"""A stack that runs for weeks: worker memory that stays flat, Redis that keeps little per ended job.

bench/bench_soak.py measures the same over 200,000 jobs through `up`; these are the short versions
with bounds generous enough for a loaded CI machine and tight enough that the defects fail them.
"""

from __future__ import annotations

import asyncio
import gc
import signal
import threading
import time
import weakref
from pathlib import Path

import grpc
import pytest
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from florence2_serve.client import job_spec
from florence2_serve.common import redis_layout as layout
from florence2_serve.common import rq_bridge
from florence2_serve.v1 import florence2_pb2 as pb
from florence2_serve.v1 import florence2_pb2_grpc as pb_grpc
from service_helpers import wait_for

CAR = Path(__file__).resolve().parent.parent / "examples" / "car.jpg"


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_a_held_job_is_freed_without_the_garbage_collector(tiny_png):
    """Held -> request -> its stop check must not lead back to Held: a cycle would keep each finished
    job's decoded image alive until a full collection (+30 MB per 1,000 640x480 jobs, measured)."""
    from florence2_serve.common.rq_bridge import TakenJob
    from florence2_serve.worker.job_request import prepare_request
    from florence2_serve.worker.outcomes import Held

    record = layout.JobRecord(job_id="j", model="m", task="<OD>")
    held = Held(TakenJob("rq:queue:florence2:m", "j", "x1", record, tiny_png), taken_at=time.time())
    assert prepare_request(held, None, threading.Event()) is None
    assert held.request.should_stop() is False
    held.cancel.set()
    assert held.request.should_stop() is True
    image = weakref.ref(held.request.image)
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        del held
        assert image() is None, "the job's image outlived the job (a reference cycle holds it)"
    finally:
        if was_enabled:
            gc.enable()


async def _enqueue(url: str, image: bytes, first: int, count: int) -> None:
    from florence2_serve.server.redis_pipe import PipelinedRedis

    pipe = PipelinedRedis(url)
    templates = rq_bridge.JobTemplates(rq_bridge.JobOptions(timeout=3600, ttl=3600, max_retries=2))

    async def one(i: int) -> None:
        record = layout.JobRecord(job_id=f"soak-{i}", model="nop", task="<OD>", request_id=f"request-{i}")
        await rq_bridge.enqueue(pipe, record, image, "fingerprint", ttl=3600, max_depth=10 ** 6,
                                templates=templates, priority=0)

    try:
        for start in range(first, first + count, 32):
            await asyncio.gather(*[one(i) for i in range(start, min(start + 32, first + count))])
    finally:
        await pipe.close()


@pytest.mark.slow
def test_worker_memory_stays_flat_over_thousands_of_jobs(valkey, worker_factory):
    """A no-op worker decoding a real 640x480 JPEG per job: RSS at rest after 1,000 jobs and after
    4,000 more differ by less than 3 MB per 1,000 jobs (the reference cycle grew it ~30 MB per 1,000)."""
    import redis

    worker = worker_factory(valkey.connection_url, "nop=noop", "--kind", "noop", worker_id="soak-w")
    connection = redis.Redis.from_url(valkey.connection_url)
    image = CAR.read_bytes()

    def run(first: int, count: int) -> float:
        asyncio.run(_enqueue(valkey.connection_url, image, first, count))
        wait_for(lambda: int(connection.hget(layout.worker_key("soak-w"), "jobs_done") or 0) >= first + count,
                 timeout=120, message=f"{first + count} jobs done")
        time.sleep(1.0)  # at rest: the last batch's buffers are released
        return rss_mb(worker.process.pid)

    warm = run(0, 1000)
    end = run(1000, 4000)
    assert end - warm < 12, f"worker RSS grew {end - warm:.1f} MB over 4,000 jobs ({warm:.1f} -> {end:.1f} MB)"
    assert all(e.type.value != "FAILED" for e in layout.read_events(connection, "soak-4999"))


@pytest.mark.slow
def test_an_ended_job_keeps_under_2_kb_in_redis_and_reads_back_whole(noop_stack, tiny_png):
    """Submit (with a request id) + run to DONE: Redis keeps <= 2 KB per ended job beyond its result's
    bytes; its events still read back whole (Watch, resume after an id, GetJob) and rq still shows it."""
    client, connection = noop_stack.client, noop_stack.redis
    warm = [client.submit(job_spec(tiny_png, "nop", "OD")).job_id for _ in range(50)]
    client.wait(warm[-1])
    wait_for(lambda: all(layout.read_events(connection, j)[-1].type.value == "DONE" for j in warm),
             message="warm-up jobs done")
    before = connection.info("memory")["used_memory"]
    ids = [client.submit(job_spec(tiny_png, "nop", "OD")).job_id for _ in range(1000)]
    wait_for(lambda: connection.hget(layout.job_key(ids[-1]), "state") == b"SUCCEEDED", timeout=60,
             message="jobs done")
    wait_for(lambda: all(connection.hget(layout.job_key(j), "state") == b"SUCCEEDED" for j in ids), timeout=60,
             message="every job done")
    after = connection.info("memory")["used_memory"]
    result_bytes = len(layout.encode_result(client.wait(ids[0]).SerializeToString()))
    per_job = (after - before) / len(ids) - result_bytes
    assert per_job <= 2048, f"{per_job:.0f} bytes kept per ended job beyond its result"

    job_id = ids[0]
    assert not connection.exists(layout.events_key(job_id))  # folded into the job's record
    events = list(client.watch(job_id))
    assert [pb.EventType.Name(e.type) for e in events] == [
        "EVENT_TYPE_QUEUED", "EVENT_TYPE_STARTED", "EVENT_TYPE_RESULT", "EVENT_TYPE_DONE"]
    resumed = list(client.watch(job_id, after_event_id=events[1].event_id))
    assert [e.event_id for e in resumed] == [e.event_id for e in events[2:]]
    assert client.get_job(job_id).state == pb.JOB_STATE_SUCCEEDED
    assert client.wait(job_id).image_width == 16
    job = Job.fetch(job_id, connection=connection, serializer=JSONSerializer)
    assert job.get_status() == JobStatus.FINISHED and job.ended_at is not None


@pytest.mark.slow
def test_a_full_redis_refuses_new_jobs_and_still_finishes_every_accepted_one(valkey, front_end_factory,
                                                                             worker_factory):
    """maxmemory with noeviction: Submit answers QUEUE_FULL (retryable), never evicts a queued job, and the
    workers' writes (ending jobs is what frees memory) are never refused for lack of it."""
    import io
    import os

    import redis
    from PIL import Image

    from florence2_serve.client import NO_RETRY, Florence2Client
    from florence2_serve.client.errors import RpcError

    connection = redis.Redis.from_url(valkey.connection_url)
    front = front_end_factory(valkey.connection_url)
    worker = worker_factory(valkey.connection_url, "nop=noop", "--kind", "noop", "--batch-size", "4", worker_id="full-w")
    buffer = io.BytesIO()
    Image.frombytes("RGB", (600, 600), os.urandom(600 * 600 * 3)).save(buffer, format="PNG")  # ~1 MB, incompressible
    image = buffer.getvalue()
    worker.process.send_signal(signal.SIGSTOP)  # nothing ends while Redis fills
    try:
        connection.config_set("maxmemory", connection.info("memory")["used_memory"] + 8 * len(image))
        connection.config_set("maxmemory-policy", "noeviction")
        accepted, refusal = [], None
        with Florence2Client(f"127.0.0.1:{front.port}", timeout=30, retry=NO_RETRY) as client:
            for _ in range(40):
                try:
                    accepted.append(client.submit(job_spec(image, "nop", "OD")).job_id)
                except RpcError as exc:
                    refusal = exc
                    break
    finally:
        worker.process.send_signal(signal.SIGCONT)
    assert refusal is not None and refusal.reason == "QUEUE_FULL" and "memory limit" in refusal.message, refusal
    assert refusal.retry_delay_s is not None and 3 <= len(accepted) <= 12
    with Florence2Client(f"127.0.0.1:{front.port}", timeout=30) as client:
        for job_id in accepted:
            assert client.wait(job_id, timeout=60).image_width == 600
        assert client.wait(client.submit(job_spec(image, "nop", "OD")).job_id, timeout=60).image_width == 600
    assert connection.config_get("maxmemory-policy")["maxmemory-policy"] == "noeviction"


class _SlowToCloseService(pb_grpc.Florence2ServiceServicer):
    """Watch sends a job's terminal event, then takes `close_after_s` to end the stream (a busy front
    end), and records whether the client cancelled the stream in between. A blocking grpc server in
    this process: no second event loop beside the clients' own."""

    def __init__(self, close_after_s: float):
        self.close_after_s = close_after_s
        self.outcomes: list[str] = []

    def Watch(self, request, context):
        yield pb.WatchResponse(event=pb.JobEvent(job_id=request.job_id, event_id="1-0", type=pb.EVENT_TYPE_DONE,
                                                 state=pb.JOB_STATE_SUCCEEDED))
        time.sleep(self.close_after_s)
        self.outcomes.append("closed by the server" if context.is_active() else "cancelled by the client")


@pytest.fixture
def slow_to_close_server():
    from concurrent.futures import ThreadPoolExecutor

    service = _SlowToCloseService(close_after_s=0.3)
    server = grpc.server(ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_Florence2ServiceServicer_to_server(service, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield service, f"127.0.0.1:{port}"
    server.stop(None)


def test_clients_let_the_server_close_a_finished_stream(slow_to_close_server):
    """Cancelling a stream between its last message and its status leaks ~80 native bytes per stream
    in grpc.aio (grpc/grpc#43360): the soak's front end grew ~45 bytes per job until the clients, on a
    job's terminal event, waited for the server's status instead of cancelling."""
    from florence2_serve.client import AsyncFlorence2Client, Florence2Client

    service, address = slow_to_close_server
    with Florence2Client(address, timeout=10) as client:
        events = list(client.watch("j" * 26))
    assert [e.type for e in events] == [pb.EVENT_TYPE_DONE]

    async def watch_async():
        async with AsyncFlorence2Client(address, timeout=10) as client:
            return [e async for e in client.watch("j" * 26)]

    assert [e.type for e in asyncio.run(watch_async())] == [pb.EVENT_TYPE_DONE]
    assert wait_for(lambda: len(service.outcomes) == 2, timeout=5)
    assert service.outcomes == ["closed by the server"] * 2


def test_an_idle_worker_gives_its_image_memory_back():
    """The pixel-block cache fills to what the busiest batch had in flight (up to 2 x batch + 4 blocks):
    RSS at rest would then depend on history. Releasing it when the worker goes idle puts RSS back at its
    baseline (the soak benchmark's at-rest marks)."""
    import os

    from PIL import Image

    from florence2_serve.common.images import release_image_memory, reuse_image_memory

    kept = Image.core.get_blocks_max()
    try:
        reuse_image_memory(24)
        release_image_memory()
        before = rss_mb(os.getpid())
        images = [Image.new("RGB", (1280, 960), (i, i, i)) for i in range(24)]  # ~4.9 MB each, touched
        del images
        cached = rss_mb(os.getpid())
        release_image_memory()
        after = rss_mb(os.getpid())
    finally:
        Image.core.set_blocks_max(kept)
    assert cached - before > 60, (before, cached)  # the blocks stayed with Pillow
    assert after - before < 15, (before, cached, after)


def test_an_idle_worker_keeps_no_image_of_its_last_batch(valkey, worker_factory):
    """Nothing of the last batch stays referenced while the worker waits for work (the model loop's and
    the finisher's locals, the fetcher's last take), and the pixel cache is released: a worker that
    decoded eight 6 MP photos (~24 MB each in memory) is back near its RSS from before them."""
    import io

    import redis
    from PIL import Image

    worker = worker_factory(valkey.connection_url, "nop=noop", "--kind", "noop", "--batch-size", "8",
                            worker_id="idle-w")
    connection = redis.Redis.from_url(valkey.connection_url)
    small, big = io.BytesIO(), io.BytesIO()
    Image.new("RGB", (64, 48), (10, 20, 30)).save(small, "JPEG")
    Image.new("RGB", (3000, 2000), (200, 120, 40)).save(big, "JPEG")

    def done(count: int) -> bool:
        return int(connection.hget(layout.worker_key("idle-w"), "jobs_done") or 0) >= count

    asyncio.run(_enqueue(valkey.connection_url, small.getvalue(), 0, 8))
    wait_for(lambda: done(8), timeout=60, message="the small jobs done")
    time.sleep(1.5)  # idle for longer than the wake timeout: released
    before = rss_mb(worker.process.pid)
    asyncio.run(_enqueue(valkey.connection_url, big.getvalue(), 8, 8))
    wait_for(lambda: done(16), timeout=60, message="the big jobs done")
    time.sleep(1.5)
    after = rss_mb(worker.process.pid)
    assert after - before < 40, f"RSS at rest {before:.0f} MB before eight 6 MP images, {after:.0f} MB after"
