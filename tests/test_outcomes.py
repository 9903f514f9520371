"""How a batch's engine outcomes end its jobs: pure functions of the batch and the clock."""

from __future__ import annotations

import time

from florence2_serve.common.redis_layout import JobRecord
from florence2_serve.common.errors import JobError
from florence2_serve.common.rq_bridge import TakenJob
from florence2_serve.worker.inference import InferenceOutcome, InferenceRequest
from florence2_serve.v1 import florence2_pb2 as pb
from florence2_serve.worker.outcomes import Batch, Held, batch_endings, stopped


def held(deadline=None, run_timeout_s=0.0, started_at=None) -> Held:
    record = JobRecord(job_id="j", model="m", task="<CAPTION>", created=time.time() - 1, deadline=deadline,
                       run_timeout_s=run_timeout_s)
    now = time.time()
    return Held(TakenJob("rq:queue:florence2:m", "j", "x1", record, b""), taken_at=now - 0.5,
                started_at=started_at or now - 0.2)


def test_a_stopped_job_says_why_cancel_first_then_deadline_then_timeout():
    now = time.time()
    both = held(deadline=now - 1, run_timeout_s=0.1)
    both.cancel.set()
    assert stopped(both, now).state == "CANCELLED" and stopped(both, now).outcome == "stopped"
    late = held(deadline=now - 1, run_timeout_s=0.1)
    assert stopped(both, now).error.reason == "CANCELLED"
    assert (stopped(late, now).state, stopped(late, now).error) == (
        "EXPIRED", JobError("DEADLINE_EXCEEDED", "deadline exceeded while running; stopped"))
    slow = held(run_timeout_s=0.1)
    ending = stopped(slow, now)
    assert ending.state == "FAILED" and ending.error.reason == "JOB_TIMEOUT"
    assert "job timeout of 0.1 s" in ending.error.message and ending.error.metadata == {"timeout_s": "0.1"}


def test_batch_endings_stamp_results_and_requeue_only_when_stopping_now():
    ok, interrupted, broken = held(), held(), held()
    result = pb.Result(task=pb.TASK_TYPE_CAPTION, image_width=4, image_height=4)
    boom = JobError("INFERENCE_FAILED", "inference failed on the worker")
    outcomes = [InferenceOutcome(InferenceRequest(None, None), result=result),
                InferenceOutcome(InferenceRequest(None, None), cancelled=True),
                InferenceOutcome(InferenceRequest(None, None), error=boom)]
    ended, requeue = [], []
    worked = batch_endings(Batch([ok, interrupted, broken], outcomes), "w-1", True, ended, requeue)
    assert [e.outcome for e in ended] == ["ok", "failed"] and requeue == [interrupted.job]
    stored = pb.Result.FromString(ended[0].result.SerializeToString())
    assert stored.worker_id == "w-1" and 700 < stored.timings.queue_ms < 1500
    assert ended[1].error == boom and worked > 0.5
    ended, requeue = [], []
    batch_endings(Batch([interrupted], outcomes[1:2]), "w-1", False, ended, requeue)
    assert requeue == [] and ended[0].error.message == "stopped"
