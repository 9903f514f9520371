"""The HTTP/JSON port: the proto's google.api.http routes on a real front end, a real worker and real Redis,
driven by a real HTTP client (requests). Its bounds, tokens, CORS and TLS: tests/test_http_guards.py."""

from __future__ import annotations

import base64
import json
import socket
import time

import pytest
import requests

from http_helpers import CAR, EVENTS, reason, sse, stack, violations  # noqa: F401 - stack: the module's fixture
from service_helpers import serve_process, start_front_end


# -- the happy paths --------------------------------------------------------------------------------------

def test_multipart_run_streams_server_sent_events_with_event_ids(stack):
    with CAR.open("rb") as image:
        response = requests.post(f"{stack.base}/v1/jobs:run", files={"image": ("car.jpg", image, "image/jpeg")},
                                 data={"model": "nop", "task": "OD", "max_new_tokens": "8"}, stream=True, timeout=30)
    assert response.status_code == 200 and response.headers["Content-Type"].startswith("text/event-stream")
    events = [e for e in sse(response) if "data" in e]
    messages = [json.loads(e["data"])["event"] for e in events]
    assert [m["type"] for m in messages] == EVENTS
    assert [e["id"] for e in events] == [m["eventId"] for m in messages]
    done = messages[-1]
    assert done["state"] == "JOB_STATE_SUCCEEDED" and done["result"]["imageWidth"] == 640
    job = stack.client.get_job(done["jobId"])  # the same job, seen over gRPC
    assert job.state == 3 and job.model == "nop"


def test_json_submit_with_base64_image_then_get_lookup_and_cancel(stack):
    body = {"model": "nop", "task": "<OD>", "image": base64.b64encode(CAR.read_bytes()).decode(),
            "requestId": "http-json-1", "generation": {"maxNewTokens": 5}}
    first = requests.post(f"{stack.base}/v1/jobs", json=body, timeout=30)
    assert first.status_code == 200, first.text
    submitted = first.json()
    assert submitted["created"] is True and submitted["state"] == "JOB_STATE_QUEUED" and submitted["moreJobIds"] == []
    again = requests.post(f"{stack.base}/v1/jobs", data=json.dumps(body), timeout=30).json()  # curl -d: no JSON type
    assert again["jobId"] == submitted["jobId"] and again["created"] is False
    deadline = time.monotonic() + 20
    while True:
        job = requests.get(f"{stack.base}/v1/jobs/{submitted['jobId']}", timeout=10).json()["job"]
        if job["state"] == "JOB_STATE_SUCCEEDED" or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert job["state"] == "JOB_STATE_SUCCEEDED" and job["requestId"] == "http-json-1"
    assert job["result"]["task"] == "TASK_TYPE_OD"
    found = requests.get(f"{stack.base}/v1/jobs:lookup", params={"request_id": "http-json-1"}, timeout=10).json()
    assert found["job"]["jobId"] == submitted["jobId"]
    cancelled = requests.post(f"{stack.base}/v1/jobs/{submitted['jobId']}:cancel", timeout=10).json()
    assert cancelled == {"jobId": submitted["jobId"], "state": "JOB_STATE_SUCCEEDED", "cancelled": False}


def test_watch_resumes_after_last_event_id_as_grpc_watch_does(stack):
    from florence2_serve.client import job_spec

    submitted = stack.client.submit(job_spec(CAR.read_bytes(), "nop", "OD", max_new_tokens=3))
    grpc_events = list(stack.client.watch(submitted.job_id))
    url = f"{stack.base}/v1/jobs/{submitted.job_id}/events"
    whole = [e for e in sse(requests.get(url, stream=True, timeout=30)) if "data" in e]
    assert [e["id"] for e in whole] == [e.event_id for e in grpc_events]
    after = grpc_events[1].event_id
    for resumed in (requests.get(url, headers={"Last-Event-ID": after}, stream=True, timeout=30),
                    requests.get(url, params={"after_event_id": after}, stream=True, timeout=30)):
        ids = [e["id"] for e in sse(resumed) if "data" in e]
        assert ids == [e.event_id for e in grpc_events[2:]]
    nothing_left = requests.get(url, headers={"Last-Event-ID": whole[-1]["id"]}, stream=True, timeout=30)
    assert nothing_left.status_code == 200 and [e for e in sse(nothing_left) if "data" in e] == []
    done = json.loads(whole[-1]["data"])["event"]
    assert done["type"] == "EVENT_TYPE_DONE" and done["result"]["task"] == "TASK_TYPE_OD"


def test_a_quiet_stream_sends_keep_alive_comments_and_closes_when_the_job_ends(stack):
    with CAR.open("rb") as image:
        response = requests.post(f"{stack.base}/v1/jobs:run", files={"image": image},
                                 data={"model": "nop", "task": "OD", "min_new_tokens": "1000"}, stream=True,
                                 timeout=30)
    events = sse(response)
    assert {"comment": "keep-alive"} in events  # the 1 s job is quiet for longer than the 0.3 s keep-alive
    assert json.loads([e for e in events if "data" in e][-1]["data"])["event"]["type"] == "EVENT_TYPE_DONE"


def test_models_health_and_readiness(stack):
    models = requests.get(f"{stack.base}/v1/models", timeout=10).json()
    (nop,) = models["models"]
    assert nop["name"] == "nop" and nop["liveWorkers"] == 1 and nop["kind"] == "MODEL_KIND_NOOP"
    assert models["limits"]["maxImageBytes"] == str(30 * 1024 * 1024)  # int64: a string in protobuf JSON
    assert requests.get(f"{stack.base}/healthz", timeout=10).json() == {"status": "SERVING"}
    assert requests.get(f"{stack.base}/readyz", timeout=10).status_code == 200
    assert requests.get(f"{stack.base}/readyz", params={"model": "nop"}, timeout=10).status_code == 200
    missing = requests.get(f"{stack.base}/readyz", params={"model": "nope"}, timeout=10)
    assert missing.status_code == 503 and reason(missing.json()) == "NO_LIVE_WORKER"


def test_readiness_follows_redis_and_liveness_does_not(valkey):
    from conftest import unused_port

    front = start_front_end(valkey.connection_url, health_port=unused_port())
    base = f"http://127.0.0.1:{front.front_end.http_port}"
    probes = f"http://127.0.0.1:{front.front_end.health_port}"
    try:
        valkey.stop()
        for where in (base, probes):  # the API port and the probe port say the same
            ready = requests.get(f"{where}/readyz", timeout=10)
            assert ready.status_code == 503 and reason(ready.json()) == "STORE_UNAVAILABLE"
            assert requests.get(f"{where}/healthz", timeout=10).status_code == 200
        models = requests.get(f"{base}/v1/models", timeout=10)
        assert models.status_code == 503 and reason(models.json()) == "STORE_UNAVAILABLE"
        assert any(d["@type"].endswith("RetryInfo") for d in models.json()["details"])
    finally:
        front.stop()


# -- errors: the gRPC reasons, with the HTTP status of their code -----------------------------------------

@pytest.mark.parametrize("form, status, expected_reason, field", [
    ({"model": "nop", "task": "OD", "num_beams": "99"}, 400, "INVALID_FIELD", "job.generation.num_beams"),
    ({"model": "nobody", "task": "OD"}, 400, "UNKNOWN_MODEL", None),
    ({"model": "nop", "task": "NOT_A_TASK"}, 400, "MALFORMED_REQUEST", "job.task"),
    ({"model": "nop", "task": "OD", "colour": "red"}, 400, "INVALID_FIELD", "job.colour"),
    ({"model": "nop", "task": "REGION_TO_CATEGORY", "region": "1,2,3"}, 400, "INVALID_FIELD", "job.region"),
    ({"model": "nop", "task": "REGION_TO_CATEGORY", "region": "1,2,9999,3"}, 400, "REGION_OUT_OF_BOUNDS", None),
])
def test_form_errors_carry_the_grpc_reasons(stack, form, status, expected_reason, field):
    with CAR.open("rb") as image:
        response = requests.post(f"{stack.base}/v1/jobs", files={"image": image}, data=form, timeout=30)
    body = response.json()
    assert response.status_code == status and reason(body) == expected_reason, body
    if field:
        assert field in violations(body)
    assert "Traceback" not in body["message"] and "ParseError" not in body["message"]


def test_json_errors_name_the_field_and_never_show_library_text(stack):
    cases = [
        ("not json", "MALFORMED_REQUEST", None),
        ("[1, 2]", "MALFORMED_REQUEST", None),
        (json.dumps({"model": "nop", "task": "OD", "image": "***"}), "MALFORMED_REQUEST", "job.image"),
        (json.dumps({"model": "nop", "task": "OD", "priorty": 3}), "MALFORMED_REQUEST", "job.priorty"),
        (json.dumps({"model": "nop", "task": "OD"}), "IMAGE_UNREADABLE", None),
    ]
    for text, expected, field in cases:
        response = requests.post(f"{stack.base}/v1/jobs", data=text, headers={"Content-Type": "application/json"},
                                 timeout=10)
        body = response.json()
        assert response.status_code == 400 and reason(body) == expected, (text, body)
        if field:
            assert violations(body) == [field], body
        assert "Failed to parse" not in body["message"] and "Expecting value" not in body["message"]


def test_paths_verbs_and_parameters(stack):
    unknown_job = requests.get(f"{stack.base}/v1/jobs/{'0' * 32}", timeout=10)
    assert unknown_job.status_code == 404 and reason(unknown_job.json()) == "JOB_NOT_FOUND"
    bad_id = requests.get(f"{stack.base}/v1/jobs/xyz", timeout=10)
    assert bad_id.status_code == 400 and violations(bad_id.json()) == ["job_id"]
    wrong_verb = requests.delete(f"{stack.base}/v1/models", timeout=10)
    assert wrong_verb.status_code == 405 and reason(wrong_verb.json()) == "NO_SUCH_METHOD"
    assert wrong_verb.headers["Allow"] == "GET"
    nowhere = requests.get(f"{stack.base}/v2/models", timeout=10)
    assert nowhere.status_code == 404 and reason(nowhere.json()) == "NO_SUCH_METHOD"
    extra = requests.get(f"{stack.base}/v1/models", params={"verbose": "1"}, timeout=10)
    assert extra.status_code == 400 and "verbose" in extra.json()["message"]
    bad_event = requests.get(f"{stack.base}/v1/jobs/{'0' * 32}/events", headers={"Last-Event-ID": "abc"}, timeout=10)
    assert bad_event.status_code == 400 and violations(bad_event.json()) == ["after_event_id"]


def test_every_http_call_is_counted_as_its_grpc_method(stack):
    from florence2_serve.server.metrics import REQUESTS

    before = REQUESTS.labels("ListModels", "OK")._value.get()
    refused = REQUESTS.labels("Submit", "INVALID_ARGUMENT")._value.get()
    requests.get(f"{stack.base}/v1/models", timeout=10)
    requests.post(f"{stack.base}/v1/jobs", json={"model": "nop", "task": "OD"}, timeout=10)
    assert REQUESTS.labels("ListModels", "OK")._value.get() == before + 1
    assert REQUESTS.labels("Submit", "INVALID_ARGUMENT")._value.get() == refused + 1


# -- the contract ------------------------------------------------------------------------------------------

def test_openapi_document_validates_and_matches_the_proto(stack):
    from google.api import annotations_pb2
    from openapi_spec_validator import validate

    from florence2_serve.v1 import florence2_pb2 as pb

    document = requests.get(f"{stack.base}/v1/openapi.json", timeout=10).json()
    validate(document)
    declared = set()
    for method in pb.DESCRIPTOR.services_by_name["Florence2Service"].methods:
        rule = method.GetOptions().Extensions[annotations_pb2.http]
        for each in (rule, *rule.additional_bindings):
            verb = each.WhichOneof("pattern")
            declared.add((getattr(each, verb), verb))
    documented = {(path, verb) for path, item in document["paths"].items() for verb in item
                  if path.startswith("/v1/")}
    assert documented == declared
    spec = document["components"]["schemas"]["florence2.v1.JobSpec"]["properties"]
    assert set(spec) == {field.json_name for field in pb.JobSpec.DESCRIPTOR.fields}
    assert spec["task"]["enum"] == list(pb.TaskType.keys()) and spec["image"]["contentEncoding"] == "base64"
    for path, verb in declared:  # and the server routes every one of them
        concrete = path.replace("{job_id}", "0" * 32)
        response = requests.request(verb.upper(), f"{stack.base}{concrete}", timeout=10)
        assert response.status_code not in (404, 405) or reason(response.json()) != "NO_SUCH_METHOD", path


def test_serve_prints_both_addresses_and_refuses_a_busy_http_port(stack, tmp_path):
    import subprocess
    import sys

    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    try:
        port = busy.getsockname()[1]
        command = [sys.executable, "-m", "florence2_serve.client.cli", "serve", "--redis-url", stack.url,
                   "--address", "127.0.0.1:0", "--http-port", str(port)]
        refused = subprocess.run(command, capture_output=True, text=True, timeout=60)
        assert refused.returncode == 1 and f"cannot serve HTTP on 127.0.0.1:{port}: the port is in use" in refused.stderr
    finally:
        busy.close()
    process, line = serve_process(stack.url)
    try:
        assert "; HTTP at http://127.0.0.1:" in line, line
        http = line.rsplit(" ", 1)[1].strip()
        assert requests.get(f"{http}/healthz", timeout=10).ok
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_a_dropped_run_stream_cancels_its_job_only_when_asked(stack):
    def run_and_drop(cancel: str) -> str:
        with CAR.open("rb") as image:
            response = requests.post(f"{stack.base}/v1/jobs:run", files={"image": image}, stream=True, timeout=30,
                                     data={"model": "nop", "task": "OD", "min_new_tokens": "1000",
                                           "max_new_tokens": "1000", "cancel_on_disconnect": cancel})
        first = next(line for line in response.iter_lines(decode_unicode=True) if line.startswith("data: "))
        response.close()  # the client goes away while its job runs
        return json.loads(first[len("data: "):])["event"]["jobId"]

    from florence2_serve.v1 import florence2_pb2 as pb

    dropped, kept = run_and_drop("true"), run_and_drop("false")
    deadline = time.monotonic() + 15
    while stack.client.get_job(dropped).state != pb.JOB_STATE_CANCELLED and time.monotonic() < deadline:
        time.sleep(0.05)
    assert stack.client.get_job(dropped).state == pb.JOB_STATE_CANCELLED
    events = list(stack.client.watch(kept))  # the other runs on, and Watch resumes it
    assert events[-1].type == pb.EVENT_TYPE_DONE


def test_the_http_port_setting():
    from florence2_serve.server.settings import ServerSettings

    assert ServerSettings().http_port == 8080  # beside gRPC's 50051
    assert ServerSettings(address="127.0.0.1:0").http_port == 0  # a free one beside a free gRPC port
    assert ServerSettings.from_env(environ={"FLORENCE2_HTTP_PORT": "9000"}).http_port == 9000
    assert ServerSettings.from_env(environ={"FLORENCE2_HTTP_PORT": "9000"}, http_port=-1).http_port == -1  # --no-http
    with pytest.raises(ValueError, match="http_port"):
        ServerSettings(http_port=70000)


@pytest.mark.parametrize("fields", [
    {"task": "CAPTION_TO_PHRASE_GROUNDING", "text": "a red car"},
    {"task": "REGION_TO_DESCRIPTION", "region": "34,160,597,371"},
    {"task": "OCR_WITH_REGION"},
])
def test_tasks_with_text_or_region_run_from_a_form(stack, fields):
    with CAR.open("rb") as image:
        response = requests.post(f"{stack.base}/v1/jobs:run", files={"image": image}, stream=True, timeout=30,
                                 data={"model": "nop", **fields})
    assert response.status_code == 200, response.text
    done = json.loads([e for e in sse(response) if "data" in e][-1]["data"])["event"]
    assert done["type"] == "EVENT_TYPE_DONE" and done["result"]["task"] == f"TASK_TYPE_{fields['task']}"
