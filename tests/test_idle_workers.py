"""Idle workers first: a busy worker never takes a queued job that an idle worker of its model could run now.

Script-level checks of the idle registry (rq_bridge TAKE and PROGRESS), then the behaviour a user sees:
two single-job workers, two jobs submitted back to back, and each runs at once on its own worker.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from florence2_serve.client import Florence2Client, job_spec
from florence2_serve.common import redis_layout as layout
from florence2_serve.common import rq_bridge
from florence2_serve.common.redis_layout import JobRecord
from florence2_serve.v1 import florence2_pb2 as pb
from service_helpers import enqueue_directly, hold, types_of, wait_for

MODEL = "idlers"
OPTIONS = rq_bridge.JobOptions(timeout=600, ttl=3600, max_retries=2)


@pytest.fixture
def submit(valkey, tiny_png):
    def do(count: int, priority: int = 0) -> list[str]:
        return [enqueue_directly(valkey.connection_url,
                                 JobRecord(job_id=f"job-{time.monotonic_ns()}", model=MODEL, task="<CAPTION>",
                                           priority=priority),
                                 tiny_png, OPTIONS) for _ in range(count)]
    return do


def take(connection, worker: str, max_jobs: int, mode: str, idle_ttl: float = 5.0,
         leave_per_idle: int = 1) -> rq_bridge.Taken:
    return rq_bridge.take(connection, MODEL, worker_name=worker, worker_id=worker, max_jobs=max_jobs, heartbeat_ttl=30,
                          result_ttl=OPTIONS.ttl, execution_prefix=f"{worker}-x", mode=mode, idle_ttl=idle_ttl,
                          leave_per_idle=leave_per_idle)


def idle_workers(connection) -> set[str]:
    return {member.decode() for member in connection.zrange(layout.idle_key(MODEL), 0, -1)}


def test_a_busy_worker_leaves_as_many_queued_jobs_as_there_are_idle_workers(connection, submit):
    for worker in ("idle-a", "idle-b"):
        assert take(connection, worker, 4, "idle") == []  # nothing queued: registered as idle
    assert idle_workers(connection) == {"idle-a", "idle-b"}
    queued = submit(3)
    busy = take(connection, "busy", 4, "busy")
    assert [job.job_id for job in busy] == queued[2:] and busy.deferred == 2  # the first two are theirs
    assert connection.llen(layout.wake_key(MODEL)) == 1  # the idle workers are woken for them
    again = take(connection, "busy", 4, "busy")
    assert again == [] and again.deferred == 2
    first = take(connection, "idle-a", 1, "idle")
    assert [job.job_id for job in first] == queued[:1] and first.deferred == 0
    assert idle_workers(connection) == {"idle-b"}  # taking ends the registration
    second = take(connection, "idle-b", 4, "idle")
    assert [job.job_id for job in second] == queued[1:2]
    assert idle_workers(connection) == set()


def test_a_busy_worker_leaves_a_batch_to_each_idle_worker_and_takes_the_rest(connection, submit):
    take(connection, "idle-a", 4, "idle")
    queued = submit(10)
    busy = take(connection, "busy", 8, "busy", leave_per_idle=4)
    assert [job.job_id for job in busy] == queued[4:] and busy.deferred == 2  # 4 left: 2 fewer than it could take
    idle = take(connection, "idle-a", 4, "idle")
    assert [job.job_id for job in idle] == queued[:4]
    assert take(connection, "idle-a", 4, "idle") == []  # idle again
    fewer = submit(3)
    held_back = take(connection, "busy", 8, "busy", leave_per_idle=4)
    assert held_back == [] and held_back.deferred == 3  # all of them fit the idle worker's batch
    assert [job.job_id for job in take(connection, "idle-a", 4, "idle")] == fewer


def test_the_jobs_left_to_idle_workers_are_the_first_in_priority_order(connection, submit):
    """A busy worker would run what it takes after its running batch: the urgent jobs go to the idle worker."""
    take(connection, "idle-a", 2, "idle")
    low = submit(3)
    urgent = submit(1, priority=9)
    busy = take(connection, "busy", 8, "busy", leave_per_idle=2)
    assert [job.job_id for job in busy] == low[1:] and busy.deferred == 2
    assert [job.job_id for job in take(connection, "idle-a", 2, "idle")] == urgent + low[:1]


def test_a_busy_worker_takes_everything_when_no_worker_is_idle(connection, submit):
    queued = submit(3)
    taken = take(connection, "busy", 8, "busy")
    assert [job.job_id for job in taken] == queued and taken.deferred == 0
    assert connection.llen(layout.wake_key(MODEL)) == 0


def test_a_lapsed_idle_registration_is_not_waited_for(connection, submit):
    assert take(connection, "gone", 4, "idle", idle_ttl=-1.0) == []  # registered, but lapsed already
    queued = submit(2)
    taken = take(connection, "busy", 8, "busy")
    assert [job.job_id for job in taken] == queued and taken.deferred == 0
    assert idle_workers(connection) == set()  # and swept away


def test_an_idle_take_sweeps_away_the_registrations_of_workers_that_died_idle(connection):
    assert take(connection, "died", 4, "idle", idle_ttl=-1.0) == []
    assert take(connection, "alive", 4, "idle") == []
    assert idle_workers(connection) == {"alive"}


def test_a_plain_take_neither_registers_nor_defers(connection, submit):
    assert take(connection, "plain", 4, "") == []
    assert idle_workers(connection) == set()
    take(connection, "idle-a", 4, "idle")
    queued = submit(1)
    assert [job.job_id for job in take(connection, "plain", 4, "")] == queued


def test_a_worker_whose_model_finished_its_last_job_registers_as_idle(connection, submit):
    submit(1)
    (job,) = take(connection, "w", 4, "busy")
    assert idle_workers(connection) == set()
    ended = [rq_bridge.Finished(job, "ok", layout.JobState.SUCCEEDED.value, result=pb.Result())]
    rq_bridge.progress(connection, ended, ttl=OPTIONS.ttl, worker_name="w", worker_id="w", worked_s=0.1,
                       idle=(layout.idle_key(MODEL), 5.0))
    assert idle_workers(connection) == {"w"}
    assert [e.type.value for e in layout.read_events(connection, job.job_id)][-1] == "DONE"


def test_a_worker_that_took_a_job_meanwhile_is_not_registered_as_idle(connection, submit):
    """The finisher finds the model idle, then the fetcher takes a job before the progress call lands."""
    submit(2)
    first, second = take(connection, "w", 1, "busy"), take(connection, "w", 1, "busy")
    ended = [rq_bridge.Finished(first[0], "ok", layout.JobState.SUCCEEDED.value, result=pb.Result())]
    rq_bridge.progress(connection, ended, ttl=OPTIONS.ttl, worker_name="w", worker_id="w", worked_s=0.1,
                       idle=(layout.idle_key(MODEL), 5.0))
    assert idle_workers(connection) == set()
    ended = [rq_bridge.Finished(second[0], "ok", layout.JobState.SUCCEEDED.value, result=pb.Result())]
    rq_bridge.progress(connection, ended, ttl=OPTIONS.ttl, worker_name="w", worker_id="w", worked_s=0.1,
                       idle=(layout.idle_key(MODEL), 5.0))
    assert idle_workers(connection) == {"w"}


@pytest.mark.slow
def test_two_jobs_submitted_together_run_at_once_on_two_single_job_workers(valkey, front_end_factory,
                                                                          worker_factory):
    front = front_end_factory(valkey.connection_url)
    workers = [worker_factory(valkey.connection_url, "pair=noop", "--kind", "noop", "--batch-size", "1",
                              worker_id=f"pair-w{i}") for i in (1, 2)]
    png = (Path(__file__).resolve().parent.parent / "examples" / "sign.png").read_bytes()
    with Florence2Client(f"127.0.0.1:{front.port}", timeout=30) as client:
        for round_ in range(6):
            jobs = [client.submit(job_spec(png, "pair", "CAPTION", **hold(600))).job_id for _ in range(2)]
            wait_for(lambda: all(client.get_job(j).state == pb.JOB_STATE_RUNNING for j in jobs), timeout=10,
                     message=f"round {round_}: both jobs running at once")
            assert {client.get_job(j).worker_id for j in jobs} == {w.worker_id for w in workers}
            for job_id in jobs:
                assert types_of(client.watch(job_id, timeout=30))[-1] == "DONE"
