"""Metrics of the front end and a worker scraped after real jobs, the dashboard built on them, and logs."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import REPO
from florence2_serve.client import NO_RETRY, Florence2Client, JobFailed, job_spec
from florence2_serve.v1 import florence2_pb2 as pb
from service_helpers import serve_process, wait_for

DASHBOARD = REPO / "docker" / "grafana" / "florence2-dashboard.json"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def scrape(port: int) -> dict[tuple, float]:
    """{(sample name, sorted labels): value} of one /metrics page."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def value(samples: dict, name: str, **labels) -> float:
    return sum(v for (n, got), v in samples.items()
               if n == name and all(dict(got).get(k) == str(want) for k, want in labels.items()))


def test_metrics_count_what_happened(valkey, front_end_factory, worker_factory, tiny_png):
    front_port, worker_port = _free_port(), _free_port()
    front = front_end_factory(valkey.connection_url, metrics_port=front_port)
    worker = worker_factory(valkey.connection_url, "metered=noop", "--kind", "noop", "--batch-size", "1",
                            "--metrics-port", str(worker_port), worker_id="metered-w")
    before = scrape(front_port)
    with Florence2Client(f"127.0.0.1:{front.port}", timeout=30, retry=NO_RETRY) as client:
        results = [client.detect(tiny_png, "metered", "CAPTION") for _ in range(5)]
        running = client.submit(job_spec(tiny_png, "metered", "OD", min_new_tokens=2000, max_new_tokens=2000)).job_id
        wait_for(lambda: client.get_job(running).state == pb.JOB_STATE_RUNNING, message="running")
        held = client.submit(job_spec(tiny_png, "metered", "OD")).job_id  # taken: the worker holds one ahead
        queued = client.submit(job_spec(tiny_png, "metered", "OD")).job_id
        wait_for(lambda: value(scrape(front_port), "florence2_queue_depth", model="metered") == 1,
                 message="queue depth 1")
        client.cancel(queued)  # cancelled while queued: ended by the front end
        client.cancel(running)  # cancelled while running: ended by the worker
        assert client.wait(held).image_width == 16
        with pytest.raises(JobFailed):
            client.wait(running)
        with pytest.raises(Exception):
            client.submit(job_spec(b"not an image", "metered", "OD"))
    after, work = scrape(front_port), scrape(worker_port)
    delta = lambda name, **labels: value(after, name, **labels) - value(before, name, **labels)  # noqa: E731
    assert delta("florence2_jobs_submitted_total", model="metered") == 8
    assert delta("florence2_requests_total", method="Run", code="OK") == 5
    assert delta("florence2_requests_total", method="Submit", code="INVALID_ARGUMENT") == 1
    assert delta("florence2_jobs_ended_total", model="metered", outcome="cancelled") == 1
    assert value(after, "florence2_live_workers", model="metered") == 1
    assert value(after, "florence2_queue_depth", model="metered") == 0
    # The worker counted the jobs it ran and their stages, and the batches it ran them in.
    assert value(work, "florence2_jobs_ended_total", model="metered", outcome="succeeded", task="CAPTION") == 5
    assert value(work, "florence2_jobs_ended_total", model="metered", outcome="succeeded", task="OD") == 1
    assert value(work, "florence2_jobs_ended_total", outcome="cancelled", reason="CANCELLED") == 1
    assert value(work, "florence2_job_stage_seconds_count", stage="end_to_end") == 6
    assert value(work, "florence2_batch_size_sum") == 7  # every job that ran was in one batch
    assert value(work, "florence2_batch_size_count") == 7  # of one job each (--batch-size 1)
    assert value(work, "florence2_worker_info", model="metered", kind="noop", worker_id="metered-w") == 1
    assert all(r.worker_id == "metered-w" for r in results)
    assert worker.process.poll() is None


def test_the_metrics_listener_binds_the_grpc_host_by_default():
    from florence2_serve.server.settings import ServerSettings

    assert ServerSettings(address="127.0.0.1:50051").metrics_bind_host == "127.0.0.1"
    assert ServerSettings(address="0.0.0.0:50051", metrics_host="10.0.0.5").metrics_bind_host == "10.0.0.5"


def _metric_names() -> set[str]:
    """Every series name the front end and the workers can export."""
    import florence2_serve.server.metrics as front
    import florence2_serve.worker.metrics as work

    names = {"florence2_queue_depth", "florence2_live_workers"}  # the front end's scrape-time collector
    for module in (front, work):
        for item in vars(module).values():
            describe = getattr(item, "describe", None)
            if callable(describe) and hasattr(item, "_name"):
                for family in describe():
                    names.add(family.name)
                    names.update(f"{family.name}{suffix}" for suffix in ("_total", "_bucket", "_sum", "_count"))
    return names


def test_the_grafana_dashboard_uses_only_metrics_that_exist():
    import re

    dashboard = json.loads(DASHBOARD.read_text())
    expressions = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    assert len(expressions) >= 8
    used = {name for expr in expressions for name in re.findall(r"\b(florence2_[a-z0-9_]+)", expr)}
    unknown = used - _metric_names()
    assert not unknown, unknown
    readme = (REPO / "README.md").read_text()
    undocumented = [name for name in _metric_names() if name.endswith(("_total", "_bucket", "_sum", "_count")) is False
                    and f"`{name}" not in readme]
    assert not undocumented, undocumented


def test_json_logs_carry_the_jobs_fields(valkey, front_end_factory, tmp_path, tiny_png):
    import os
    import subprocess
    import sys

    front = front_end_factory(valkey.connection_url)
    log_path = tmp_path / "worker.log"
    env = dict(os.environ, REDIS_URL=valkey.connection_url)
    env.pop("PYTHONPATH", None)
    with open(log_path, "wb") as log:
        worker = subprocess.Popen([sys.executable, "-m", "florence2_serve.client.cli", "worker", "--model", "logged=noop",
                                   "--kind", "noop", "--worker-id", "log-w", "-v", "--log-format", "json"],
                                  env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        with Florence2Client(f"127.0.0.1:{front.port}", timeout=60) as client:
            wait_for(lambda: any(m.name == "logged" and m.live_workers for m in client.list_models()), timeout=60,
                     message="worker registered")
            spec = job_spec(tiny_png, "logged", "CAPTION", request_id="req-42")
            job_id = client.submit(spec).job_id
            client.wait(job_id)
            wait_for(lambda: job_id in log_path.read_text(), message="a log line about the job")
    finally:
        worker.terminate()
        worker.wait(timeout=30)
    lines = [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]
    assert lines and all({"time", "level", "logger", "message"} <= set(line) for line in lines)
    about = [line for line in lines if line.get("job_id") == job_id]
    assert about and about[0]["model"] == "logged" and about[0]["task"] == "CAPTION"
    assert about[0]["request_id"] == "req-42"
    assert not [line for line in lines if line["logger"].startswith("rq") and line["level"] == "INFO"]


def test_text_logs_append_the_jobs_fields():
    import logging

    from florence2_serve.common.log_setup import _TextWithJob, job_fields

    record = logging.LogRecord("w", logging.INFO, __file__, 1, "job %s cancelled", ("j1",), None)
    for key, item in job_fields("j1", "base", "OD", "r1").items():
        setattr(record, key, item)
    assert _TextWithJob("%(message)s").format(record) == "job j1 cancelled [job_id=j1 model=base task=OD request_id=r1]"


def test_each_hugging_face_warning_is_logged_once(capsys):
    import logging

    import transformers  # noqa: F401 - imported first, as in a worker: it installs its own handler

    from florence2_serve.common.log_setup import configure_logging

    logging.getLogger("transformers").addHandler(logging.StreamHandler())  # as transformers' own setup does
    logging.getLogger("transformers").propagate = False
    configure_logging(logging.INFO, "text")
    try:
        for _ in range(3):
            logging.getLogger("transformers.modeling_utils").warning("Some weights were not initialized")
            logging.getLogger("florence2_serve.worker").warning("our own warning")
        err = capsys.readouterr().err
        assert err.count("Some weights were not initialized") == 1 and err.count("our own warning") == 3
    finally:
        logging.getLogger().handlers.clear()


def _serve_process(redis_url: str, metrics_port: int) -> tuple[subprocess.Popen, int]:
    """`florence2 serve` in a process of its own (each front end has its own metrics registry)."""
    process, line = serve_process(redis_url, "--no-http", "--metrics-port", str(metrics_port))
    return process, int(re.search(r"listening on port (\d+)", line).group(1))


def _page(port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()


def test_cluster_wide_metrics_add_up_over_two_front_ends(valkey, worker_factory, tiny_png):
    """Two front ends on one Redis both export the queue depth and live workers: the dashboard's and
    KEDA's expressions, evaluated over both scrapes, give the true numbers (a `sum` would double them)."""
    import redis
    import yaml

    from florence2_serve.common import redis_layout as layout
    from promql_lite import evaluate, instant, samples_of

    ports = [_free_port(), _free_port()]
    fronts = [_serve_process(valkey.connection_url, port) for port in ports]
    worker_port = _free_port()
    try:
        worker_factory(valkey.connection_url, "base=noop", "--kind", "noop", "--batch-size", "1",
                       "--metrics-port", str(worker_port), worker_id="cluster-w")
        with Florence2Client(f"127.0.0.1:{fronts[0][1]}", timeout=30, retry=NO_RETRY) as client:
            running = client.submit(job_spec(tiny_png, "base", "OD", min_new_tokens=2000, max_new_tokens=2000))
            wait_for(lambda: client.get_job(running.job_id).state == pb.JOB_STATE_RUNNING, message="running")
            for priority in (0, 0, 0, 3, 3):
                client.submit(job_spec(tiny_png, "base", "OD", priority=priority))
            connection = redis.Redis.from_url(valkey.connection_url)
            true_depth = lambda: {p: connection.llen(layout.rq_queue_key("base", p))  # noqa: E731
                                  for p in range(layout.MIN_PRIORITY, layout.MAX_PRIORITY + 1)}
            wait_for(lambda: sum(true_depth().values()) == 4, message="4 queued (one taken ahead by the worker)")
            depth = true_depth()
            pages = {f"front-{i}": _page(port) for i, port in enumerate(ports)}
            pages["worker"] = _page(worker_port)
            client.cancel(running.job_id)
        samples = samples_of(pages)
        # Each front end reports the whole queue: a naive sum counts every job twice.
        assert evaluate('sum(florence2_queue_depth{model="base"})', samples)[0][1] == 2 * sum(depth.values())

        dashboard = json.loads(DASHBOARD.read_text())
        panels = {panel["title"]: [t["expr"] for t in panel.get("targets", [])] for panel in dashboard["panels"]}
        by_priority = {labels["priority"]: value for labels, value in evaluate(panels["Queue depth"][0], samples)
                       if labels["model"] == "base"}
        assert {int(p): v for p, v in by_priority.items() if v} == {p: n for p, n in depth.items() if n}
        assert evaluate(panels["Live workers"][0], samples) == [({"model": "base"}, 1.0)]
        running_now = evaluate(panels["Running jobs"][0], samples)
        assert running_now == [({"model": "base"}, 1.0)]
        # Every instant expression of the dashboard evaluates; none sums a cluster-wide series.
        for expr in (e for exprs in panels.values() for e in exprs if instant(e)):
            evaluate(expr, samples)
            assert not re.search(r"sum[^()]*\(\s*florence2_(queue_depth|live_workers)", expr), expr

        scaled = next(doc for doc in yaml.safe_load_all((REPO / "deploy" / "kubernetes" / "keda-base.yaml").read_text())
                      if doc["kind"] == "ScaledObject")
        query = next(t["metadata"]["query"] for t in scaled["spec"]["triggers"] if t["type"] == "prometheus")
        assert evaluate(query, samples) == [({}, sum(depth.values()) + 1.0)]  # waiting + running, once
    finally:
        for process, _ in fronts:
            process.terminate()
            process.wait(timeout=30)


def test_the_client_spreads_calls_over_every_front_end_it_resolves(valkey):
    """Round robin (the client's default) over a target with two front ends: both answer calls, as the
    pods behind the headless Service florence2-frontend-grpc would."""
    ports = [_free_port(), _free_port()]
    fronts = [_serve_process(valkey.connection_url, port) for port in ports]
    try:
        target = "ipv4:" + ",".join(f"127.0.0.1:{grpc_port}" for _, grpc_port in fronts)
        with Florence2Client(target, timeout=30) as client:
            for _ in range(20):
                client.list_models()
        answered = [value(scrape(port), "florence2_requests_total", method="ListModels") for port in ports]
        assert all(count >= 5 for count in answered), answered
        with Florence2Client(target, timeout=30, load_balancing="pick_first") as client:
            for _ in range(10):
                client.list_models()
        after = [value(scrape(port), "florence2_requests_total", method="ListModels") for port in ports]
        assert sorted(b - a for a, b in zip(answered, after)) == [0, 10]  # one connection, one front end
    finally:
        for process, _ in fronts:
            process.terminate()
            process.wait(timeout=30)
