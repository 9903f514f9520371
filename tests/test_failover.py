"""Redis is no single point of failure: a Sentinel-managed valkey (primary, replica, three sentinels on
loopback), the front end and a worker over its redis+sentinel:// URL, jobs flowing from several clients
while the primary is SIGKILLed. With --redis-wait-replicas 1 every job whose Submit returned OK ends DONE
exactly once; clients see only UNAVAILABLE (with RetryInfo) in the gap and retry through it."""

from __future__ import annotations

import threading
import time

import grpc
import pytest

from florence2_serve.client import Florence2Client, RetryPolicy, job_spec
from florence2_serve.client.errors import RpcError
from florence2_serve.common.redis_url import connect, parse_sentinel_url
from florence2_serve.v1 import florence2_pb2 as pb
from florence2_serve.v1 import florence2_pb2_grpc as pb_grpc
from sentinel_helpers import SentinelSet
from service_helpers import start_front_end, wait_for


@pytest.fixture
def sentinels(tmp_path):
    group = SentinelSet(tmp_path).start()
    yield group
    group.stop()


def test_a_failover_loses_no_acknowledged_job_with_wait(sentinels, worker_factory, tiny_png, capsys):
    target = parse_sentinel_url(sentinels.url)
    assert target.master == "florence2" and len(target.sentinels) == 3 and target.db == 0
    direct = connect(sentinels.url, socket_timeout=2)  # redis-py through the sentinels: the master
    direct.set("probe", "1")
    assert sentinels.node(sentinels.primary_port).get("probe") == b"1"
    front = start_front_end(sentinels.url, redis_wait_replicas=1, redis_wait_timeout_ms=500)
    worker_factory(sentinels.url, "nop=noop", "--kind", "noop", "--batch-size", "8", worker_id="fo-w1")
    address = f"127.0.0.1:{front.port}"
    acknowledged: list[str] = []
    codes: set[str] = set()
    stop = threading.Event()
    lock = threading.Lock()

    def client_loop(index: int) -> None:
        retry = RetryPolicy(max_attempts=200, initial_backoff_s=0.05, max_backoff_s=0.5, max_elapsed_s=60)
        with Florence2Client(address, timeout=10, retry=retry) as client:
            n = 0
            while not stop.is_set():
                n += 1
                try:
                    response = client.submit(job_spec(tiny_png, "nop", "CAPTION", request_id=f"c{index}-{n}"))
                except grpc.RpcError as exc:
                    with lock:
                        codes.add(exc.code().name)
                    continue
                with lock:
                    acknowledged.append(response.job_id)

    refusals: list[tuple[str, str, float | None]] = []  # what a client without retries is told in the gap

    def probe_loop() -> None:
        channel = grpc.insecure_channel(address)
        stub = pb_grpc.Florence2ServiceStub(channel)
        n = 0
        while not stop.is_set():
            n += 1
            try:
                stub.Submit(pb.SubmitRequest(job=job_spec(tiny_png, "nop", "CAPTION", request_id=f"probe-{n}")),
                            timeout=5)
            except grpc.RpcError as exc:
                error = RpcError.from_grpc(exc)
                with lock:
                    refusals.append((error.code().name, error.reason, error.retry_delay_s))
                time.sleep(0.05)
        channel.close()

    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(3)]
    threads.append(threading.Thread(target=probe_loop))
    try:
        for thread in threads:
            thread.start()
        wait_for(lambda: len(acknowledged) >= 60, timeout=60, message="jobs flowing")
        before = len(acknowledged)
        sentinels.kill_primary()
        killed_at = time.monotonic()
        gap = sentinels.wait_failover()
        # With WAIT on, a write is acknowledged only once a replica holds it: the old primary comes back as
        # the new master's replica (as a restarted pod would) before Submit answers OK again.
        rejoined = sentinels.restart_old_primary()
        wait_for(lambda: len(acknowledged) > before + 3, timeout=60, message="Submit answering after the failover")
        resumed_s = time.monotonic() - killed_at
        wait_for(lambda: len(acknowledged) >= before + 60, timeout=60, message="jobs flowing after the failover")
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
        finished_at = time.monotonic()
        with Florence2Client(address, timeout=60) as client:
            wait_for(lambda: client.health() == "SERVING", timeout=30, message="health SERVING again")
            states = {job_id: pb.JobState.Name(client.get_job(job_id).state) for job_id in acknowledged}
            for job_id in [j for j, s in states.items() if s != "JOB_STATE_SUCCEEDED"]:
                client.wait(job_id, timeout=60)
                states[job_id] = pb.JobState.Name(client.get_job(job_id).state)
        drained_s = time.monotonic() - finished_at
        assert len(set(acknowledged)) == len(acknowledged)  # each Submit its own job (distinct request ids)
        assert all(state == "JOB_STATE_SUCCEEDED" for state in states.values()), set(states.values())
        assert codes <= {"UNAVAILABLE"}, codes
        # Unretried, the gap is answered UNAVAILABLE with RetryInfo (what the clients' retries follow), only.
        assert refusals, "the probe saw no refusal: the gap was not observed"
        assert {code for code, _, _ in refusals} == {"UNAVAILABLE"}, refusals
        assert all(delay is not None and delay > 0 for _, _, delay in refusals), refusals
        with capsys.disabled():
            print(f"\nfailover: sentinels promoted the replica {gap:.1f} s after the kill, the old primary rejoined "
                  f"as a replica {rejoined:.1f} s later, Submit answered again "
                  f"{resumed_s:.1f} s after it; {len(acknowledged)} jobs acknowledged ({before} before), all DONE "
                  f"({drained_s:.1f} s to drain); non-OK codes seen: {sorted(codes) or 'none'}; an unretried probe "
                  f"was refused {len(refusals)} times, all UNAVAILABLE with RetryInfo "
                  f"({sorted({reason for _, reason, _ in refusals})})")
    finally:
        stop.set()
        front.stop()


def test_sentinel_urls_parse_and_name_the_master_for_plain_url_tools():
    from florence2_serve.common.redis_url import is_sentinel, redact

    target = parse_sentinel_url("rediss+sentinel://app:p%40ss@s1:26380,s2,[::1]:26381/jobs/3"
                                "?sentinel_password=sp&ssl_ca_certs=/ca.pem")
    assert target.sentinels == (("s1", 26380), ("s2", 26379), ("::1", 26381))
    assert (target.master, target.db, target.username, target.password) == ("jobs", 3, "app", "p@ss")
    assert target.sentinel_password == "sp" and target.tls and dict(target.query) == {"ssl_ca_certs": "/ca.pem"}
    assert is_sentinel("redis+sentinel://h/m") and not is_sentinel("redis://h:6379/0")
    assert redact("redis+sentinel://:secret@s1,s2/m/0") == "redis+sentinel://:***@s1,s2/m/0"
    for bad in ("redis+sentinel:///m/0", "redis+sentinel://s1:26379", "redis+sentinel://s1:x/m"):
        with pytest.raises(ValueError):
            parse_sentinel_url(bad)
