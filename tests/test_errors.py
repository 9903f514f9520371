"""The error vocabulary, its encodings, and what a model's workers say it can do (unit tests)."""

from __future__ import annotations

import asyncio

import grpc
from google.rpc import error_details_pb2, status_pb2

from conftest import REPO
from florence2_serve.common.errors import DOMAIN, JobError, Reason, quote
from florence2_serve.common.tasks import Task
from florence2_serve.server.capabilities import ModelCapabilities, TokenCounter
from florence2_serve.server.errors import ServiceError, invalid, unavailable
from florence2_serve.v1 import florence2_pb2 as pb


def test_job_error_round_trips_through_its_redis_encoding():
    error = JobError("TOKEN_LIMIT", "text is 900 tokens, over the limit", {"limit": "600"})
    assert JobError.decode(error.encode()) == error
    assert JobError.decode("") is None
    assert JobError.decode("plain text from an older version") == JobError("INTERNAL", "plain text from an older version")


def test_lua_written_errors_decode_to_reasons():
    lua = (REPO / "common" / "rq_functions.lua").read_text()
    for reason, message in (("CANCELLED", "cancelled before it ran"), ("DEADLINE_EXCEEDED",
                            "deadline passed before the job ran; it was not run"), ("CANCELLED", "cancelled while queued")):
        encoded = JobError(reason, message).encode()
        assert f"'{encoded}'" in lua, encoded


def test_quote_keeps_messages_short():
    assert quote("abc") == '"abc"'
    assert quote("a\x00b") == '"a\\u0000b"'  # escaped as JSON escapes it, not a Python repr
    assert len(quote("x" * 100_000)) < 50


def test_service_error_is_a_google_rpc_status_with_details():
    status = invalid("job.generation.num_beams", "num_beams must be between 1 and 16", limit=16).to_status()
    assert status.code == grpc.StatusCode.INVALID_ARGUMENT
    (key, value), = status.trailing_metadata
    assert key == "grpc-status-details-bin"
    decoded = status_pb2.Status.FromString(value)
    info, bad = error_details_pb2.ErrorInfo(), error_details_pb2.BadRequest()
    assert decoded.details[0].Unpack(info) and decoded.details[1].Unpack(bad)
    assert (info.reason, info.domain, dict(info.metadata)) == ("INVALID_FIELD", DOMAIN, {"limit": "16"})
    assert bad.field_violations[0].field == "job.generation.num_beams"
    retry = error_details_pb2.RetryInfo()
    assert status_pb2.Status.FromString(unavailable(Reason.QUEUE_FULL, "full").to_status().trailing_metadata[0][1]
                                        ).details[1].Unpack(retry)
    assert isinstance(invalid("x", "y"), ServiceError)


def test_the_readme_lists_every_reason():
    readme = (REPO / "README.md").read_text()
    missing = [reason.value for reason in Reason if f"`{reason.value}`" not in readme]
    assert not missing, missing


def test_a_model_serves_what_all_its_workers_serve():
    florence = {"kind": "native", "tasks": "OD,CAPTION,OCR", "max_new_tokens": "1024", "max_text_tokens": "400",
                "tokenizer": "abc"}
    smaller = dict(florence, tasks="OD,CAPTION", max_new_tokens="512", tokenizer="def")
    model = ModelCapabilities.of_workers([florence, smaller])
    assert model.tasks == {Task.OD, Task.CAPTION} and model.max_new_tokens == 512 and model.max_text_tokens == 400
    assert model.kind == pb.MODEL_KIND_FLORENCE2 and model.tokenizer == ""  # two tokenizers: count bytes
    mixed = ModelCapabilities.of_workers([florence, {"kind": "yolo", "tasks": "DETECT"}])
    assert mixed.kind == pb.MODEL_KIND_UNSPECIFIED and mixed.tasks == frozenset()


def test_token_counter_uses_the_published_tokenizer_and_falls_back_to_bytes():
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({"car": 0, "red": 1, "[UNK]": 2}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    published = {"t1": tokenizer.to_str().encode()}

    async def fetch(digest):
        return published.get(digest)

    async def main():
        counter = TokenCounter(fetch)
        return (await counter.count("red car red car", "t1"), await counter.count("red car", "missing"),
                await counter.count("red car", ""))

    assert asyncio.run(main()) == (4, 7, 7)
