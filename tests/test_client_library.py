"""The Python client as its users call it: public imports, any image input, own errors, retries,
resumption across a front-end restart, detect_many (sync and asyncio), cancel_on_disconnect."""

from __future__ import annotations

import asyncio
import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from PIL import Image

from conftest import REPO
from florence2_serve.client import (
    NO_RETRY, AsyncFlorence2Client, Florence2Client, Florence2Error, JobFailed, RetryPolicy, RpcError, job_spec)
from florence2_serve.client.image_input import image_bytes
from florence2_serve.client.retry import Attempts
from florence2_serve.v1 import florence2_pb2 as pb
from service_helpers import wait_for


def test_public_api_and_type_marker():
    import florence2_serve.client as package

    assert {"Florence2Client", "AsyncFlorence2Client", "JobFailed", "RpcError", "RetryPolicy"} <= set(package.__all__)
    assert (Path(package.__file__).parent / "py.typed").exists()


def _picture() -> Image.Image:
    image = Image.new("RGB", (23, 17))
    image.putdata([(x * 11 % 256, y * 15 % 256, (x * y) % 256) for y in range(17) for x in range(23)])
    return image


def test_every_kind_of_image_input_encodes_losslessly(tmp_path):
    import numpy as np

    picture = _picture()
    path = tmp_path / "p.png"
    picture.save(path)
    encoded = {
        "bytes": path.read_bytes(), "str": image_bytes(str(path)), "Path": image_bytes(path),
        "PIL": image_bytes(picture), "numpy": image_bytes(np.asarray(picture)),
        "file": image_bytes(open(path, "rb")), "grey numpy": image_bytes(np.asarray(picture.convert("L"))),
    }
    for name, data in encoded.items():
        decoded = Image.open(io.BytesIO(data))
        reference = picture.convert("L") if name == "grey numpy" else picture
        assert decoded.size == (23, 17) and list(decoded.convert(reference.mode).getdata()) == list(reference.getdata()), name
    for bad, message in [(3.5, "cannot send a float"), ("https://x/y.jpg", "URLs are not fetched"),
                         (np.zeros((4, 4), dtype=np.float32), "uint8"), (tmp_path / "none.jpg", "no such image file"),
                         (io.StringIO("x"), "binary mode")]:
        with pytest.raises((TypeError, FileNotFoundError), match=message):
            image_bytes(bad)


def test_several_tasks_make_one_spec_with_their_texts_and_regions():
    client = Florence2Client("127.0.0.1:1")
    spec = client.tasks_spec(b"img", "m", [("CAPTION_TO_PHRASE_GROUNDING", "a car"), "OD",
                                           ("REGION_TO_DESCRIPTION", "", (1, 2, 3, 4))], request_id="r")
    assert spec.task == pb.TASK_TYPE_CAPTION_TO_PHRASE_GROUNDING and spec.text == "a car" and not spec.HasField("region")
    assert [(t.task, t.text, t.HasField("region")) for t in spec.more_tasks] == [
        (pb.TASK_TYPE_OD, "", False), (pb.TASK_TYPE_REGION_TO_DESCRIPTION, "", True)]
    assert (spec.more_tasks[1].region.x1, spec.more_tasks[1].region.y2) == (1, 4)
    with pytest.raises(ValueError, match="at least one task"):
        client.tasks_spec(b"img", "m", [])
    client.close()


def test_retry_policy_backs_off_honours_retry_info_and_gives_up():
    policy = RetryPolicy(max_attempts=4, initial_backoff_s=0.1, max_backoff_s=0.3, max_elapsed_s=30)
    attempts = Attempts(policy)
    unavailable = RpcError(grpc.StatusCode.UNAVAILABLE, "x")
    delays = [attempts.next_delay(unavailable) for _ in range(4)]
    assert delays[3] is None and 0.08 <= delays[0] <= 0.12 and delays[2] <= 0.36
    assert Attempts(policy).next_delay(RpcError(grpc.StatusCode.UNAVAILABLE, "x", retry_delay_s=2.0)) >= 2.0
    assert Attempts(policy).next_delay(RpcError(grpc.StatusCode.INVALID_ARGUMENT, "x")) is None
    assert Attempts(NO_RETRY).next_delay(unavailable) is None


@pytest.fixture
def stack(noop_stack, tiny_png):
    noop_stack.image = tiny_png
    return noop_stack


def test_detect_takes_paths_pil_and_numpy_and_raises_the_clients_own_errors(stack, tmp_path):
    import numpy as np

    picture = _picture()
    path = tmp_path / "p.png"
    picture.save(path)
    client = stack.client
    for image in (str(path), path, picture, np.asarray(picture), open(path, "rb")):
        result = client.detect(image, "nop", "CAPTION")
        assert (result.image_width, result.image_height) == (23, 17)
    with pytest.raises(RpcError) as error:
        client.detect(b"not an image", "nop", "CAPTION")
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and error.value.reason == "IMAGE_UNREADABLE"
    assert isinstance(error.value, Florence2Error) and "_MultiThreadedRendezvous" not in repr(error.value)
    job_id = client.submit(job_spec(stack.image, "nop", "CAPTION", min_new_tokens=3000, max_new_tokens=3000)).job_id
    wait_for(lambda: client.get_job(job_id).state == pb.JOB_STATE_RUNNING, message="running")
    client.cancel(job_id)
    with pytest.raises(JobFailed) as failed:
        client.wait(job_id)
    assert (failed.value.state, failed.value.reason) == ("CANCELLED", "CANCELLED")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _serve(redis_url: str, port: int, log: Path) -> subprocess.Popen:
    env = dict(os.environ, REDIS_URL=redis_url)
    env.pop("PYTHONPATH", None)
    command = [sys.executable, "-m", "florence2_serve.client.cli", "serve", "--address", f"127.0.0.1:{port}"]
    return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=open(log, "ab"))


def test_a_front_end_restart_mid_job_costs_the_caller_nothing(valkey, worker_factory, tiny_png, tmp_path):
    port = _free_port()
    front = _serve(valkey.connection_url, port, tmp_path / "front.log")
    worker = worker_factory(valkey.connection_url, "nop=noop", "--kind", "noop", worker_id="resume-w")
    try:
        with Florence2Client(f"127.0.0.1:{port}", timeout=60) as client:
            wait_for(lambda: _healthy(client), timeout=30, message="front end up")
            outcome: dict = {}

            def run():
                try:
                    outcome["result"] = client.detect(tiny_png, "nop", "CAPTION", min_new_tokens=3000,
                                                      max_new_tokens=3000)
                except Exception as exc:  # noqa: BLE001
                    outcome["error"] = exc

            thread = threading.Thread(target=run)
            thread.start()
            wait_for(lambda: worker.stats().get("state") == "busy", timeout=30, message="the job running")
            front.send_signal(signal.SIGKILL)  # mid-job, streams cut
            front.wait()
            time.sleep(0.5)
            front = _serve(valkey.connection_url, port, tmp_path / "front.log")
            thread.join(timeout=60)
            assert "error" not in outcome, outcome.get("error")
            assert outcome["result"].generated_tokens == 3000
            assert sum(m.queue_depth for m in client.list_models()) == 0
    finally:
        front.send_signal(signal.SIGTERM)
        front.wait(timeout=30)


def _healthy(client) -> bool:
    with Florence2Client(client.address, timeout=2, retry=NO_RETRY) as probe:
        try:
            return probe.health() == "SERVING"
        except Florence2Error:
            return False


def test_detect_many_yields_as_completed_with_per_image_errors(stack, tmp_path):
    client = stack.client
    images = [stack.image, b"broken", stack.image, stack.image]
    outcomes = list(client.detect_many(images, "nop", "CAPTION", concurrency=2))
    assert sorted(o.index for o in outcomes) == [0, 1, 2, 3]
    by_index = {o.index: o for o in outcomes}
    assert not by_index[1].ok and by_index[1].error.reason == "IMAGE_UNREADABLE"
    assert all(by_index[i].ok and by_index[i].job_id and by_index[i].result.image_width == 16 for i in (0, 2, 3))


def test_detect_many_orders_by_completion_and_bounds_concurrency(stack):
    client = stack.client
    peak = [0]
    run = client.detect_many([stack.image] * 6, "nop", "CAPTION", concurrency=3, min_new_tokens=300, max_new_tokens=300)
    sampler_stop = threading.Event()

    def sample():
        while not sampler_stop.is_set():
            peak[0] = max(peak[0], len(run.in_flight.jobs))
            time.sleep(0.005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    outcomes = list(run)
    sampler_stop.set()
    sampler.join()
    assert len(outcomes) == 6 and all(o.ok for o in outcomes)
    assert 1 <= peak[0] <= 3


def test_async_detect_many_and_cancel(stack):
    async def main():
        async with AsyncFlorence2Client(stack.address, timeout=60) as client:
            done = [o async for o in client.detect_many([stack.image, b"bad", stack.image], "nop", "CAPTION",
                                                        concurrency=2)]
            run = client.detect_many([stack.image] * 4, "nop", "CAPTION", concurrency=2, min_new_tokens=4000,
                                     max_new_tokens=4000)
            iterator = run.__aiter__()
            waiting = asyncio.ensure_future(iterator.__anext__())
            await asyncio.sleep(1.0)
            cancelled = await run.cancel()
            first = await waiting
            rest = [o async for o in iterator]
            return done, cancelled, [first, *rest]

    done, cancelled, stopped = asyncio.run(main())
    assert sorted(o.ok for o in done) == [False, True, True]
    assert cancelled == 2  # the two in flight; the other two were never submitted
    assert len(stopped) == 2 and all(isinstance(o.error, JobFailed) and o.error.state == "CANCELLED" for o in stopped)


def test_cancel_on_disconnect_cancels_the_job_when_the_stream_is_dropped(stack):
    client = stack.client
    for flag, final in ((True, pb.JOB_STATE_CANCELLED), (False, pb.JOB_STATE_SUCCEEDED)):
        spec = job_spec(stack.image, "nop", "CAPTION", min_new_tokens=1500, max_new_tokens=1500,
                        cancel_on_disconnect=flag)
        call = client.stub.Run(pb.RunRequest(job=spec), timeout=30)
        job_id = next(call).event.job_id
        wait_for(lambda: client.get_job(job_id).state == pb.JOB_STATE_RUNNING, message="running")
        call.cancel()
        wait_for(lambda: client.get_job(job_id).state in (pb.JOB_STATE_CANCELLED, pb.JOB_STATE_SUCCEEDED),
                 timeout=20, message="the job to end")
        assert client.get_job(job_id).state == final


def test_cancel_on_disconnect_logs_what_the_cancel_did(stack, caplog):
    """A dropped stream of a job that had already succeeded is not logged as a cancellation; one that was
    running is, and the job ends CANCELLED as the log says."""
    import logging

    client = stack.client
    with caplog.at_level(logging.DEBUG, logger="florence2_serve.server.servicer"):
        quick = client.stub.Run(pb.RunRequest(job=job_spec(stack.image, "nop", "CAPTION", cancel_on_disconnect=True)),
                                timeout=30)
        done_id = next(quick).event.job_id
        wait_for(lambda: client.get_job(done_id).state == pb.JOB_STATE_SUCCEEDED, message="the quick job done")
        quick.cancel()
        slow = client.stub.Run(pb.RunRequest(job=job_spec(stack.image, "nop", "CAPTION", min_new_tokens=1500,
                                                          max_new_tokens=1500, cancel_on_disconnect=True)), timeout=30)
        running_id = next(slow).event.job_id
        wait_for(lambda: client.get_job(running_id).state == pb.JOB_STATE_RUNNING, message="running")
        slow.cancel()
        wait_for(lambda: client.get_job(running_id).state == pb.JOB_STATE_CANCELLED, timeout=20, message="cancelled")
        wait_for(lambda: any(running_id in r.getMessage() for r in caplog.records), message="the cancel logged")
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    assert not any(done_id in line for line in lines), lines
    assert any(running_id in line and "cancel" in line for line in lines), lines
    assert client.get_job(done_id).state == pb.JOB_STATE_SUCCEEDED


def test_readme_client_examples_run_as_written(valkey, front_end_factory, worker_factory):
    """The README's sync and asyncio examples, unchanged, against a stack serving a model named "base"."""
    import re

    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Python client"):]
    examples = re.findall(r"```python\n(.*?)```", section, flags=re.S)[:2]
    assert len(examples) == 2 and all(len(code.strip().splitlines()) <= 12 for code in examples)
    front = front_end_factory(valkey.connection_url)
    worker_factory(valkey.connection_url, "base=noop", "--kind", "noop", worker_id="readme-w")
    env = dict(os.environ, FLORENCE2_SERVER=f"127.0.0.1:{front.port}")
    env.pop("PYTHONPATH", None)
    for code in examples:
        result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip(), "the example printed nothing"



def test_a_graceful_front_end_shutdown_is_not_a_client_disconnect(valkey, worker_factory, tiny_png):
    """cancel_on_disconnect cancels when the client goes away, not when the front end stops under it."""
    from service_helpers import start_front_end

    worker_factory(valkey.connection_url, "nop=noop", "--kind", "noop", worker_id="graceful-w")
    front = start_front_end(valkey.connection_url)
    with Florence2Client(f"127.0.0.1:{front.port}", timeout=30, retry=NO_RETRY) as client:
        # Longer than the front end's 2 s shutdown grace: the stream is cut while the job runs.
        spec = job_spec(tiny_png, "nop", "CAPTION", min_new_tokens=4000, max_new_tokens=4000,
                        cancel_on_disconnect=True)
        call = client.stub.Run(pb.RunRequest(job=spec), timeout=30)
        job_id = next(call).event.job_id
        front.stop()
    again = start_front_end(valkey.connection_url)
    try:
        with Florence2Client(f"127.0.0.1:{again.port}", timeout=30) as client:
            assert client.wait(job_id).generated_tokens == 4000
    finally:
        again.stop()
