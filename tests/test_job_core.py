"""The job core from the outside: real valkey, the real front end on port 0, workers as real processes.

One test per defect found by trying the service (issue #7); each failed before the rebuild. Most
use the no-op engine: it holds a job "running" for min_new_tokens ms, checking its stop flag at
every step like a real generate, so these tests run in seconds without a model.
"""

from __future__ import annotations

import random
import signal
import time

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from rq import Queue
from rq.serializers import JSONSerializer

from florence2_serve.client import NO_RETRY, Florence2Client, job_spec
from florence2_serve.common import redis_layout as layout
from florence2_serve.v1 import florence2_pb2 as pb
from service_helpers import hold, types_of, wait_for

pytestmark = pytest.mark.slow

NOOP = ("--kind", "noop")


def stream_types(connection, job_id: str) -> list[str]:
    return [e.type.value for e in layout.read_events(connection, job_id)]


def nothing_stranded(connection, model: str) -> None:
    """No job of `model` is held by rq for a worker that no longer runs."""
    for name in layout.queue_names(model):
        assert Queue(name, connection=connection, serializer=JSONSerializer).started_job_registry.get_job_ids() == []


# -- 1. SIGTERM never strands a job ----------------------------------------------------------------

def test_sigterm_while_a_batch_is_being_collected_finishes_the_job(valkey, front_end_factory, worker_factory,
                                                                    tiny_png):
    import redis

    front = front_end_factory(valkey.connection_url, max_retries=0)
    worker = worker_factory(valkey.connection_url, "nop=noop", *NOOP, "--batch-size", "8", "--batch-wait-ms", "2000",
                            worker_id="collector")
    connection = redis.Redis.from_url(valkey.connection_url)
    with Florence2Client(f"127.0.0.1:{front.port}", timeout=30) as client:
        warm = [client.submit(job_spec(tiny_png, "nop", "CAPTION")).job_id for _ in range(2)]
        for job_id in warm:  # a batch of two: the worker now waits up to 2 s to fill the next one
            assert types_of(client.watch(job_id))[-1] == "DONE"
        job_id = client.submit(job_spec(tiny_png, "nop", "CAPTION")).job_id
        wait_for(lambda: connection.llen(layout.rq_queue_key("nop")) == 0, message="the worker to take the job")
        time.sleep(0.2)  # inside the batch-collection window
        assert worker.stop(signal.SIGTERM, timeout=20) == 0
        assert types_of(client.watch(job_id, timeout=10)) == ["QUEUED", "STARTED", "RESULT", "DONE"]
    nothing_stranded(connection, "nop")


def test_sigterm_at_any_instant_leaves_every_job_finished_or_queued(valkey, front_end_factory, worker_factory,
                                                                     tiny_png):
    import redis

    front = front_end_factory(valkey.connection_url, max_retries=0)
    connection = redis.Redis.from_url(valkey.connection_url)
    rng = random.Random(7)
    submitted: list[str] = []
    with Florence2Client(f"127.0.0.1:{front.port}", timeout=30) as client:
        for round_ in range(6):
            worker = worker_factory(valkey.connection_url, "nop=noop", *NOOP, "--batch-size", "4", "--batch-wait-ms",
                                    "20", worker_id=f"term-{round_}")
            submitted += [client.submit(job_spec(tiny_png, "nop", "CAPTION", **hold(rng.choice([0, 5, 30])))).job_id
                          for _ in range(rng.randint(3, 9))]
            time.sleep(rng.uniform(0, 0.05))
            assert worker.stop(signal.SIGTERM, timeout=20) == 0
            nothing_stranded(connection, "nop")
            for job_id in submitted:  # ended, or back in (or still in) its queue: never held by nobody
                state = connection.hget(layout.job_key(job_id), "state").decode()
                queued = connection.lpos(layout.rq_queue_key("nop"), job_id) is not None
                assert layout.JobState(state).terminal or (state == "QUEUED" and queued), (job_id, state)
        worker_factory(valkey.connection_url, "nop=noop", *NOOP, worker_id="term-last")
        for job_id in submitted:
            assert types_of(client.watch(job_id, timeout=30))[-1] == "DONE"
            assert stream_types(connection, job_id).count("STARTED") == 1


# -- 3, 11, 12. Redis outages: UNAVAILABLE meanwhile, everything recovers, nothing lost --------------

def _rpcs(client, job_id, tiny_png):
    return {
        "Submit": lambda: client.submit(job_spec(tiny_png, "nop", "CAPTION")),
        "Run": lambda: list(client.run(job_spec(tiny_png, "nop", "CAPTION"))),
        "GetJob": lambda: client.get_job(job_id),
        "Watch": lambda: list(client.watch(job_id)),
        "CancelJob": lambda: client.cancel(job_id),
        "ListModels": lambda: client.list_models(),
    }


def test_redis_outage_answers_unavailable_and_everything_recovers(valkey_factory, front_end_factory, worker_factory,
                                                                  tiny_png, tmp_path):
    server = valkey_factory(data_dir=tmp_path / "redis")
    url, port = server.connection_url, server.port
    front = front_end_factory(url)
    worker = worker_factory(url, "nop=noop", *NOOP, worker_id="outage-w")
    with Florence2Client(f"127.0.0.1:{front.port}", timeout=10, retry=NO_RETRY) as client:
        long_job = client.submit(job_spec(tiny_png, "nop", "CAPTION", **hold(1500))).job_id
        wait_for(lambda: client.get_job(long_job).state == pb.JOB_STATE_RUNNING, message="the long job to start")
        server.stop()  # while the worker is running the job (12)
        for name, call in _rpcs(client, long_job, tiny_png).items():
            with pytest.raises(grpc.RpcError) as error:
                call()
            assert error.value.code() == grpc.StatusCode.UNAVAILABLE, name
            details = error.value.details()
            assert "unreachable" in details and "retry" in details, (name, details)
            assert not any(leak in details for leak in ("Error 111", "<class", "redis.exceptions", "Traceback")), details
        wait_for(lambda: client.health() == "NOT_SERVING", timeout=10, message="NOT_SERVING")
        time.sleep(3)  # the job has finished inside the worker meanwhile; its writes are waiting
        assert worker.process.poll() is None, worker.log()
        valkey_factory(port=port, data_dir=tmp_path / "redis")
        wait_for(lambda: client.health() == "SERVING", timeout=15, message="SERVING again")
        assert types_of(client.watch(long_job, timeout=30)) == ["QUEUED", "STARTED", "RESULT", "DONE"]
        assert types_of(client.run(job_spec(tiny_png, "nop", "CAPTION"), timeout=30))[-1] == "DONE"
    assert worker.process.poll() is None


def test_workers_reregister_after_their_registration_is_lost(noop_stack, tiny_png):
    noop_stack.redis.flushall()  # an empty Redis after a failover, or an outage longer than the TTL
    wait_for(lambda: [m.live_workers for m in noop_stack.client.list_models() if m.name == "nop"] == [1],
             timeout=10, message="the worker to register again")
    assert types_of(noop_stack.client.run(job_spec(tiny_png, "nop", "CAPTION")))[-1] == "DONE"


@pytest.mark.parametrize("command", [
    ["serve", "--address", "127.0.0.1:0"],
    ["worker", "--model", "x=noop", "--kind", "noop"],
    ["up", "--model", "x=noop", "--kind", "noop", "--address", "127.0.0.1:0"],
])
def test_unreachable_redis_url_is_one_line_and_a_non_zero_exit(command):
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = dict(os.environ, REDIS_URL="redis://127.0.0.1:1/0")
    result = subprocess.run([str(Path(sys.executable).parent / "florence2"), *command], capture_output=True,
                            text=True, timeout=60, env=env)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "cannot reach Redis at redis://127.0.0.1:1/0" in lines[0], result.stderr


# -- 4, 5. Timeouts: the job's own, Run's call deadline, the worker-side job timeout ----------------

def test_submit_call_deadline_never_limits_the_job(valkey, front_end_factory, worker_factory, tiny_png):
    front = front_end_factory(valkey.connection_url)
    worker_factory(valkey.connection_url, "one=noop", *NOOP, "--batch-size", "1", worker_id="one-w")
    with Florence2Client(f"127.0.0.1:{front.port}", timeout=30) as client:
        blocker = client.submit(job_spec(tiny_png, "one", "CAPTION", **hold(1500))).job_id
        job_id = client.submit(job_spec(tiny_png, "one", "CAPTION"), timeout=0.5).job_id
        assert types_of(client.watch(blocker))[-1] == "DONE"
        assert types_of(client.watch(job_id)) == ["QUEUED", "STARTED", "RESULT", "DONE"]
        assert not client.get_job(job_id).HasField("deadline")


def test_job_timeout_expires_queued_and_running_jobs(valkey, front_end_factory, worker_factory, tiny_png):
    front = front_end_factory(valkey.connection_url)
    worker_factory(valkey.connection_url, "one=noop", *NOOP, "--batch-size", "1", worker_id="one-w")
    with Florence2Client(f"127.0.0.1:{front.port}", timeout=30) as client:
        blocker = client.submit(job_spec(tiny_png, "one", "CAPTION", **hold(1500))).job_id
        queued = job_spec(tiny_png, "one", "CAPTION")
        queued.timeout.CopyFrom(Duration(nanos=300_000_000))
        queued_id = client.submit(queued).job_id
        assert types_of(client.watch(blocker))[-1] == "DONE"
        events = list(client.watch(queued_id))
        assert types_of(events) == ["QUEUED", "EXPIRED"] and "before the job ran" in events[-1].error.message
        assert client.get_job(queued_id).state == pb.JOB_STATE_EXPIRED

        running = job_spec(tiny_png, "one", "CAPTION", **hold(3000))
        running.timeout.CopyFrom(Duration(nanos=500_000_000))
        started = time.monotonic()
        events = list(client.watch(client.submit(running).job_id))
        assert types_of(events) == ["QUEUED", "STARTED", "EXPIRED"] and "while running" in events[-1].error.message
        assert events[-1].state == pb.JOB_STATE_EXPIRED and time.monotonic() - started < 2.5

        for bad in (Duration(seconds=-1), Duration(seconds=0)):
            spec = job_spec(tiny_png, "one", "CAPTION")
            spec.timeout.CopyFrom(bad)
            with pytest.raises(grpc.RpcError) as error:
                client.submit(spec)
            assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "timeout" in error.value.details()


def test_server_job_timeout_stops_a_running_job_and_names_the_limit(valkey, front_end_factory, worker_factory,
                                                                    tiny_png):
    front = front_end_factory(valkey.connection_url, job_timeout_s=1)
    worker_factory(valkey.connection_url, "nop=noop", *NOOP, worker_id="t-w")
    with Florence2Client(f"127.0.0.1:{front.port}", timeout=30) as client:
        started = time.monotonic()
        events = list(client.run(job_spec(tiny_png, "nop", "CAPTION", **hold(4000))))
        assert types_of(events) == ["QUEUED", "STARTED", "FAILED"]
        assert "job timeout of 1 s" in events[-1].error.message and events[-1].state == pb.JOB_STATE_FAILED
        assert events[-1].error.reason == "JOB_TIMEOUT"
        assert time.monotonic() - started < 3.0


def test_job_timeout_setting_comes_from_the_environment():
    from florence2_serve.server.settings import ServerSettings

    assert ServerSettings.from_env({"FLORENCE2_JOB_TIMEOUT": "7"}).job_timeout_s == 7


# -- 6. Priority: highest level first, submission order within a level, range enforced -------------

def test_priority_runs_highest_first_and_in_order_within_a_level(valkey, front_end_factory, worker_factory,
                                                                 tiny_png):
    import redis

    front = front_end_factory(valkey.connection_url)
    worker_factory(valkey.connection_url, "one=noop", *NOOP, "--batch-size", "1", worker_id="one-w")
    connection = redis.Redis.from_url(valkey.connection_url)
    with Florence2Client(f"127.0.0.1:{front.port}", timeout=30) as client:
        blocker = client.submit(job_spec(tiny_png, "one", "CAPTION", **hold(3000))).job_id
        wait_for(lambda: client.get_job(blocker).state == pb.JOB_STATE_RUNNING, message="blocker to start")
        prefetched = client.submit(job_spec(tiny_png, "one", "CAPTION")).job_id  # the worker holds one batch ahead
        wait_for(lambda: connection.llen(layout.rq_queue_key("one")) == 0, message="the next batch to be taken")
        # STARTED events in the order they are written (one worker call may write several in one
        # millisecond, so stream ids can tie; the notifications keep the order).
        pubsub = connection.pubsub(ignore_subscribe_messages=True)
        pubsub.subscribe(layout.NOTIFY_CHANNEL)
        jobs = {}
        for name, priority in [("a", 0), ("b", 5), ("c", 1), ("d", 5), ("e", 9), ("f", 0)]:
            jobs[name] = client.submit(job_spec(tiny_png, "one", "CAPTION", priority=priority)).job_id
        assert client.get_job(blocker).state == pb.JOB_STATE_RUNNING  # all six were queued before any could run
        for job_id in jobs.values():
            assert types_of(client.watch(job_id))[-1] == "DONE"
        wanted = {prefetched, *jobs.values()}
        started, quiet_since = [], time.monotonic()
        while time.monotonic() - quiet_since < 0.5:
            message = pubsub.get_message(timeout=0.1)
            if message is not None:
                quiet_since = time.monotonic()
                started += [job_id for job_id, event in layout.notification_events(message["data"], wanted)
                            if event.type is layout.EventType.STARTED]
        pubsub.close()
        names = {job_id: name for name, job_id in jobs.items()}
        assert started == [prefetched] + [jobs[name] for name in ["e", "b", "d", "c", "a", "f"]], \
            [names.get(job_id, "prefetched") for job_id in started]
        for bad in (-1, 10):
            with pytest.raises(grpc.RpcError) as error:
                client.submit(job_spec(tiny_png, "one", "CAPTION", priority=bad))
            assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "priority must be between 0 and 9" in error.value.details()


# -- 7. CancelJob's reply is what is true when it returns ------------------------------------------

def test_cancel_reply_agrees_with_the_job(noop_stack, tiny_png):
    client = noop_stack.client
    running = client.submit(job_spec(tiny_png, "nop", "CAPTION", **hold(3000))).job_id
    wait_for(lambda: client.get_job(running).state == pb.JOB_STATE_RUNNING, message="the job to run")
    reply = client.cancel(running)
    assert reply.cancelled and reply.state == pb.JOB_STATE_CANCELLED
    assert client.get_job(running).state == pb.JOB_STATE_CANCELLED
    for _ in range(25):  # cancel right behind submit: queued, being taken, or already done
        job_id = client.submit(job_spec(tiny_png, "nop", "CAPTION", **hold(random.choice([0, 20])))).job_id
        reply = client.cancel(job_id)
        now = client.get_job(job_id).state
        assert reply.state == now, (pb.JobState.Name(reply.state), pb.JobState.Name(now))
        final = list(client.watch(job_id))[-1].state
        assert final == now if now in (pb.JOB_STATE_CANCELLED, pb.JOB_STATE_SUCCEEDED) else final == \
            pb.JOB_STATE_CANCELLED
        assert reply.cancelled == (final == pb.JOB_STATE_CANCELLED)


# -- 8. A busy port is one clear line, never a silent second stack --------------------------------

def test_busy_ports_are_refused_with_one_line(valkey):
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    exe = str(Path(sys.executable).parent / "florence2")
    env = dict(os.environ, REDIS_URL=valkey.connection_url)
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    try:
        for command, needle in [
            (["serve", "--address", f"127.0.0.1:{port}"], f"cannot listen on 127.0.0.1:{port}"),
            (["serve", "--address", "127.0.0.1:0", "--metrics-port", str(port)], f"metrics on port {port}"),
            (["up", "--model", "x=noop", "--kind", "noop", "--address", f"127.0.0.1:{port}"],
             f"cannot listen on 127.0.0.1:{port}"),
        ]:
            result = subprocess.run([exe, *command], capture_output=True, text=True, timeout=60, env=env)
            lines = [line for line in result.stderr.splitlines() if line.strip()]
            assert result.returncode != 0 and len(lines) == 1 and needle in lines[0], result.stderr
    finally:
        holder.close()


def test_grpc_server_refuses_a_port_another_server_holds(valkey, front_end_factory):
    from florence2_serve.server.app import AddressInUse, create_server
    from florence2_serve.server.settings import ServerSettings

    import asyncio

    running = front_end_factory(valkey.connection_url)
    settings = ServerSettings.from_env(environ={}, redis_url=valkey.connection_url)

    async def second():  # grpc.aio servers are made inside an event loop
        create_server(settings, f"127.0.0.1:{running.port}")

    with pytest.raises(AddressInUse, match=f"127.0.0.1:{running.port}"):
        asyncio.run(second())


# -- 14. A dead worker's job re-runs within seconds (ahead of newer work: tests/test_rq_contract.py) -

def test_dead_workers_job_reruns_within_seconds_with_default_settings(valkey, front_end_factory, worker_factory,
                                                                      tiny_png):
    import redis

    front = front_end_factory(valkey.connection_url)
    connection = redis.Redis.from_url(valkey.connection_url)
    first = worker_factory(valkey.connection_url, "two=noop", *NOOP, "--batch-size", "1", worker_id="w-a")
    with Florence2Client(f"127.0.0.1:{front.port}", timeout=30) as client:
        victim = client.submit(job_spec(tiny_png, "two", "CAPTION", **hold(4000))).job_id
        wait_for(lambda: client.get_job(victim).state == pb.JOB_STATE_RUNNING, message="the job to run")
        worker_factory(valkey.connection_url, "two=noop", *NOOP, "--batch-size", "1", worker_id="w-b")
        first.stop(signal.SIGKILL)
        killed = time.time()
        events = list(client.watch(victim, timeout=30))
        assert types_of(events) == ["QUEUED", "STARTED", "QUEUED", "STARTED", "RESULT", "DONE"]
        assert "stopped heartbeating" in events[2].error.message and events[2].error.reason == "WORKER_LOST"
        rerun = events[3].time.ToNanoseconds() / 1e9
        # heartbeat TTL 4 s (expiry read in whole seconds) + maintenance every 1 s + an idle worker's 0.5 s wait
        assert rerun - killed < 9.0, f"re-run {rerun - killed:.1f} s after its worker died"
        assert events[-2].result.worker_id == "w-b"
    assert len(layout.read_events(connection, victim)) == 6
