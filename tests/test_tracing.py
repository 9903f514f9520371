"""OpenTelemetry: one trace per job from the RPC through the queue to the worker's stage spans; and
nothing of opentelemetry imported when it is not installed."""

from __future__ import annotations

import subprocess
import sys

import pytest

from florence2_serve.client import Florence2Client, job_spec
from service_helpers import start_front_end


@pytest.fixture(scope="module")
def exporter():
    pytest.importorskip("opentelemetry.sdk", reason="the tracing extra is not installed")
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    trace.set_tracer_provider(provider)  # once per process: OpenTelemetry keeps the first
    return memory


def test_one_trace_per_job_from_the_rpc_to_the_workers_stages(exporter, valkey, tiny_png):
    import redis

    from florence2_serve.worker.batch_worker import BatchWorker
    from florence2_serve.worker.noop import NoopEngine
    from florence2_serve.worker.settings import WorkerSettings

    connection = redis.Redis.from_url(valkey.connection_url)
    worker = BatchWorker(connection, WorkerSettings(model_name="traced", model_path="noop", worker_id="trace-w"),
                         NoopEngine(), {"kind": "noop", "tasks": "CAPTION,OD"})
    worker.register()
    front = start_front_end(valkey.connection_url)
    try:
        with Florence2Client(f"127.0.0.1:{front.port}", timeout=30) as client:
            job_id = client.submit(job_spec(tiny_png, "traced", "CAPTION")).job_id
            worker.work(burst=True)
            assert client.wait(job_id).worker_id == "trace-w"
    finally:
        front.stop()
        connection.close()
    spans = {span.name: span for span in exporter.get_finished_spans()
             if span.attributes.get("florence2.job_id") in (job_id, None)}
    root, job = spans["florence2.Submit"], spans["florence2.job"]
    assert root.parent is None and root.attributes["florence2.job_id"] == job_id
    assert job.context.trace_id == root.context.trace_id and job.parent.span_id == root.context.span_id
    assert job.attributes["florence2.outcome"] == "SUCCEEDED"
    for stage in ("queue_wait", "preprocess", "generate", "postprocess"):
        span = spans[f"florence2.{stage}"]
        assert span.parent.span_id == job.context.span_id and span.context.trace_id == root.context.trace_id
        assert job.start_time <= span.start_time <= span.end_time <= job.end_time


def test_without_opentelemetry_nothing_of_it_is_imported():
    code = ("import sys; sys.modules['opentelemetry'] = None\n"
            "import florence2_serve.server.servicer, florence2_serve.worker.batch_worker\n"
            "from florence2_serve.common import tracing\n"
            "assert not tracing.available() or True\n"
            "with tracing.rpc_span('Submit', model='m') as carrier: assert carrier == {}\n"
            "assert tracing.setup_tracing('x', {'OTEL_EXPORTER_OTLP_ENDPOINT': 'http://x'}) is False\n"
            "assert not [m for m in sys.modules if m.startswith('opentelemetry.')]\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
