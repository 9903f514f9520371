"""OpenTelemetry traces of jobs: optional (the `tracing` extra), off and import-free without it.

One trace per job: the front end's RPC span (Submit or Run) is the root; its context travels in the
job record (W3C traceparent) to the worker, which records a `florence2.job` span with the job's
stages as children (queue_wait, preprocess, generate, postprocess), timed from the job's own clock.

Tracing is on when opentelemetry is installed and either a tracer provider was set by the host
process or the standard variables ask for an exporter (OTEL_TRACES_EXPORTER other than `none`, or
OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT); `setup_tracing` at an entry point then installs the OTLP/HTTP
exporter, configured by the OTEL_* variables as usual.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os

TRACER_NAME = "florence2_serve"
_ENV = ("OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")


def available() -> bool:
    try:
        return importlib.util.find_spec("opentelemetry.trace") is not None
    except (ImportError, ValueError):  # not installed, or blocked (sys.modules entry None)
        return False


def setup_tracing(service_name: str, environ=None) -> bool:
    """Install the OTLP exporter when the environment asks for tracing; whether tracing is on."""
    environ = os.environ if environ is None else environ
    wanted = any(environ.get(name) for name in _ENV) and environ.get("OTEL_TRACES_EXPORTER", "") != "none"
    if not wanted or not available():
        return False
    from opentelemetry import trace
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": environ.get("OTEL_SERVICE_NAME",
                                                                                     service_name)}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    return True


def _tracer():
    """The tracer, or None when tracing is off (nothing of opentelemetry is imported then)."""
    if not available():
        return None
    from opentelemetry import trace

    provider = trace.get_tracer_provider()
    if type(provider).__name__ in ("ProxyTracerProvider", "NoOpTracerProvider"):
        return None
    return trace.get_tracer(TRACER_NAME)


@contextlib.contextmanager
def rpc_span(method: str, **attributes):
    """The root span of an RPC; yields a carrier dict to store with the job (empty when off)."""
    tracer = _tracer()
    if tracer is None:
        yield {}
        return
    from opentelemetry import propagate, trace

    with tracer.start_as_current_span(f"florence2.{method}", kind=trace.SpanKind.SERVER) as span:
        for key, value in attributes.items():
            span.set_attribute(f"florence2.{key}", value)
        carrier: dict = {}
        propagate.inject(carrier)
        yield carrier


def job_spans(carrier: dict, job_id: str, model: str, task: str, created: float, started: float, timings,
              ended: float, outcome: str) -> None:
    """Record a finished job's span and its stage spans under the RPC that submitted it."""
    tracer = _tracer()
    if tracer is None or not carrier:
        return
    from opentelemetry import propagate, trace

    def ns(seconds: float) -> int:
        return int(seconds * 1e9)

    parent = propagate.extract(carrier)
    job = tracer.start_span("florence2.job", context=parent, kind=trace.SpanKind.CONSUMER, start_time=ns(created),
                            attributes={"florence2.job_id": job_id, "florence2.model": model, "florence2.task": task,
                                        "florence2.outcome": outcome})
    context = trace.set_span_in_context(job)
    stages = [("queue_wait", created, started)]
    cursor = started
    for name, ms in (("preprocess", timings.preprocess_ms), ("generate", timings.generate_ms),
                     ("postprocess", timings.postprocess_ms)):
        stages.append((name, cursor, cursor + ms / 1000))
        cursor += ms / 1000
    for name, begin, end in stages:
        tracer.start_span(f"florence2.{name}", context=context, start_time=ns(begin)).end(end_time=ns(end))
    job.end(end_time=ns(max(ended, cursor)))
