"""Bad input that used to reach library text or pass unchecked: malformed bodies, bad Durations,
non-ASCII event ids, the bearer scheme's case, control characters in echoed ids, token limits."""

from __future__ import annotations

import logging

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration

from florence2_serve.client import NO_RETRY, Florence2Client, RpcError, job_spec
from florence2_serve.v1 import florence2_pb2 as pb
from service_helpers import reason_of, start_front_end

SUBMIT = "/florence2.v1.Florence2Service/Submit"
WATCH = "/florence2.v1.Florence2Service/Watch"


@pytest.fixture
def front(valkey):
    front = start_front_end(valkey.connection_url)
    yield front
    front.stop()


def _raw_call(port: int, method: str, body: bytes, streaming: bool = False, metadata=()):
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        if streaming:
            call = channel.unary_stream(method)(body, timeout=10, metadata=metadata)
            try:
                list(call)
            except grpc.RpcError as exc:
                return exc
        else:
            try:
                channel.unary_unary(method)(body, timeout=10, metadata=metadata)
            except grpc.RpcError as exc:
                return exc
    raise AssertionError("the call was not refused")


@pytest.mark.parametrize("method,body,streaming", [
    (SUBMIT, b"\xff" * 64, False),
    # field 1 (job), field 1 inside it (model) holding invalid UTF-8
    (SUBMIT, b"\x0a\x04\x0a\x02\xc3\x28", False),
    (WATCH, b"\xff" * 64, True),
])
def test_a_malformed_body_is_invalid_argument_with_one_log_line(front, caplog, method, body, streaming):
    with caplog.at_level(logging.WARNING, logger="florence2_serve.server.registration"):
        errors = [_raw_call(front.port, method, body, streaming) for _ in range(5)]
    for error in errors:
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
        assert "DecodeError" not in error.details() and "Unexpected" not in error.details()
        assert reason_of(error) == "MALFORMED_REQUEST"
    lines = [r for r in caplog.records if "malformed" in r.getMessage()]
    assert len(lines) <= 1 and not any(r.exc_info for r in caplog.records)


@pytest.mark.parametrize("duration,message", [
    (Duration(seconds=1, nanos=2_000_000_000), "not a valid Duration"),
    (Duration(seconds=5, nanos=-1), "not a valid Duration"),
    (Duration(seconds=10**12), "over the limit of 604800 s"),
    (Duration(seconds=0, nanos=0), "must be positive"),
])
def test_job_timeouts_are_valid_bounded_durations(front, tiny_png, duration, message):
    spec = job_spec(tiny_png, "nop", "CAPTION")
    spec.timeout.CopyFrom(duration)
    with Florence2Client(f"127.0.0.1:{front.port}", retry=NO_RETRY) as client, pytest.raises(RpcError) as caught:
        client.submit(spec)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and caught.value.reason == "INVALID_FIELD"
    assert message in caught.value.details()


def test_max_new_tokens_over_the_service_range_is_token_limit(front, tiny_png):
    with Florence2Client(f"127.0.0.1:{front.port}", retry=NO_RETRY) as client, pytest.raises(RpcError) as caught:
        client.submit(job_spec(tiny_png, "nop", "CAPTION", max_new_tokens=5000))
    assert caught.value.reason == "TOKEN_LIMIT" and "4096" in caught.value.details()


def test_event_ids_take_ascii_digits_only(front):
    with Florence2Client(f"127.0.0.1:{front.port}", retry=NO_RETRY) as client, pytest.raises(RpcError) as caught:
        list(client.watch("0" * 32, after_event_id="١-٠"))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and caught.value.reason == "INVALID_FIELD"


def test_an_echoed_id_is_not_a_python_repr(front):
    error = _raw_call(front.port, "/florence2.v1.Florence2Service/GetJob",
                      pb.GetJobRequest(job_id="ab\x00cd").SerializeToString())
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert '"ab\\u0000cd"' in error.details() and "'ab\\x00cd'" not in error.details()


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER"])
def test_the_bearer_scheme_is_case_insensitive(valkey, scheme):
    front = start_front_end(valkey.connection_url, token="s3cret")
    try:
        with grpc.insecure_channel(f"127.0.0.1:{front.port}") as channel:
            list_models = channel.unary_unary("/florence2.v1.Florence2Service/ListModels",
                                              request_serializer=pb.ListModelsRequest.SerializeToString,
                                              response_deserializer=pb.ListModelsResponse.FromString)
            list_models(pb.ListModelsRequest(), timeout=10, metadata=[("authorization", f"{scheme} s3cret")])
            with pytest.raises(grpc.RpcError) as caught:
                list_models(pb.ListModelsRequest(), timeout=10, metadata=[("authorization", f"{scheme} S3CRET")])
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        front.stop()


@pytest.mark.parametrize(("options", "task", "field"), [
    ({"confidence": 1.5}, "DETECT", "job.detection.confidence"),
    ({"confidence": float("nan")}, "DETECT", "job.detection.confidence"),
    ({"iou": 0.0}, "DETECT", "job.detection.iou"),
    ({"max_detections": 1001}, "DETECT", "job.detection.max_detections"),
    ({"max_detections": 5}, "OD", "job.detection"),  # a Florence-2 task takes no detector options
])
def test_detection_options_are_bounded_and_for_detect_only(options, task, field, tiny_png):
    from florence2_serve.server.errors import ServiceError
    from florence2_serve.server.validation import check_spec

    with pytest.raises(ServiceError) as refused:
        check_spec(job_spec(tiny_png, "m", task, **options), 1 << 20)
    assert [v[0] for v in refused.value.violations] == [field]
    checked = check_spec(job_spec(tiny_png, "m", "DETECT", confidence=0.5, max_detections=10), 1 << 20)
    assert checked.detection == {"confidence": 0.5, "max_detections": 10}
    assert check_spec(job_spec(tiny_png, "m", "DETECT"), 1 << 20).detection == {}
