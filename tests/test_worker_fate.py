"""A worker's jobs under starvation and death: a paused worker keeps them, a dead one's run next elsewhere.

Real valkey, the real front end, no-op workers as real processes (worker/lost_jobs.py judges).
"""

from __future__ import annotations

import signal
import time

import pytest

from florence2_serve.client import Florence2Client, job_spec
from florence2_serve.common import redis_layout as layout
from florence2_serve.v1 import florence2_pb2 as pb
from service_helpers import hold, wait_for

pytestmark = pytest.mark.slow

NOOP = ("--kind", "noop")
HEARTBEAT_TTL_S = 4  # the workers' default job heartbeat TTL


def held_by_workers(connection, model: str) -> list[str]:
    from rq import Queue
    from rq.serializers import JSONSerializer

    return [job_id for name in layout.queue_names(model)
            for job_id in Queue(name, connection=connection, serializer=JSONSerializer).started_job_registry
            .get_job_ids()]


def kinds(connection, job_id: str) -> list[str]:
    return [e.type.value for e in layout.read_events(connection, job_id)]


@pytest.mark.parametrize("judge", [False, True], ids=["alone", "beside-another-worker"])
def test_a_worker_paused_for_3_heartbeat_ttls_keeps_its_jobs(valkey, front_end_factory, worker_factory, tiny_png,
                                                              judge):
    """SIGSTOP (a worker starved of CPU, at the extreme) for 3x the heartbeat TTL: its connection stays
    open, so neither another worker nor its own maintenance, when it wakes, declares its jobs lost."""
    import redis

    front = front_end_factory(valkey.connection_url)
    connection = redis.Redis.from_url(valkey.connection_url)
    paused = worker_factory(valkey.connection_url, "fate=noop", *NOOP, "--batch-size", "4", worker_id="w-paused")
    with Florence2Client(f"127.0.0.1:{front.port}", timeout=30) as client:
        ids = [client.submit(job_spec(tiny_png, "fate", "CAPTION", **hold(2000))).job_id for _ in range(4)]
        # One runs at once (an idle worker takes a lone job); the other three wait in its hands for the next batch.
        wait_for(lambda: len(held_by_workers(connection, "fate")) == 4, message="the worker holding all four")
        if judge:
            worker_factory(valkey.connection_url, "fate=noop", *NOOP, "--batch-size", "4", worker_id="w-judge")
        paused.process.send_signal(signal.SIGSTOP)
        try:
            time.sleep(3 * HEARTBEAT_TTL_S + 1)
        finally:
            paused.process.send_signal(signal.SIGCONT)
        for job_id in ids:
            assert client.wait(job_id, timeout=60).worker_id == "w-paused"
    for job_id in ids:
        assert kinds(connection, job_id) == ["QUEUED", "STARTED", "RESULT", "DONE"], (job_id, kinds(connection, job_id))
    assert "lost its worker" not in paused.log()


def test_a_killed_workers_jobs_start_elsewhere_within_5_s_ahead_of_newer_work(valkey, front_end_factory,
                                                                               worker_factory, tiny_png):
    import redis

    front = front_end_factory(valkey.connection_url)
    connection = redis.Redis.from_url(valkey.connection_url)
    doomed = worker_factory(valkey.connection_url, "fate=noop", *NOOP, "--batch-size", "2", worker_id="w-doomed")
    with Florence2Client(f"127.0.0.1:{front.port}", timeout=30) as client:
        victims = [client.submit(job_spec(tiny_png, "fate", "CAPTION", **hold(4000))).job_id for _ in range(2)]
        wait_for(lambda: len(held_by_workers(connection, "fate")) == 2, message="the doomed worker holding both")
        worker_factory(valkey.connection_url, "fate=noop", *NOOP, "--batch-size", "4", worker_id="w-survivor")
        newer = [client.submit(job_spec(tiny_png, "fate", "CAPTION", **hold(1000))).job_id for _ in range(8)]
        wait_for(lambda: any(client.get_job(j).state == pb.JOB_STATE_RUNNING for j in newer),
                 message="the survivor busy with newer work")
        doomed.stop(signal.SIGKILL)
        killed = time.time()
        for job_id in victims + newer:
            client.wait(job_id, timeout=60)
    lost, restarts, requeues = [], [], []
    for job_id in victims + newer:
        events = layout.read_events(connection, job_id)
        names = [e.type.value for e in events]
        assert names.count("RESULT") == 1 and names[-1] == "DONE", names
        if any(e.error and "WORKER_LOST" in e.error for e in events):
            # Running, or taken for its next batch, when its worker died: back in the queue, run once more.
            assert names[-4:] == ["QUEUED", "STARTED", "RESULT", "DONE"], names
            lost.append(job_id)
            requeues.append(events[-4].time)
            restarts.append(events[-3].time)
    assert set(victims) <= set(lost)
    assert max(restarts) - killed < 5.0, f"a lost job started {max(restarts) - killed:.1f} s after its worker died"
    for job_id in set(newer) - set(lost):  # work that starts once the loss is known waits behind the lost jobs
        started = [e.time for e in layout.read_events(connection, job_id) if e.type is layout.EventType.STARTED][-1]
        if started >= min(requeues):
            assert started >= max(restarts), f"newer job started {max(restarts) - started:.2f} s before a lost one"
