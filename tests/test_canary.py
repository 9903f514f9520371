"""The start-up canary: a worker serves with the decode engine only where it gives generate's tokens."""

from __future__ import annotations

import logging

import pytest

from florence2_serve.worker.canary import check_decode_engine
from florence2_serve.worker.decoding.engine import DecodeEngine, DecodeOptions
from florence2_serve.worker.engine import Florence2Engine
from florence2_serve.worker.settings import WorkerSettings


@pytest.fixture(scope="module")
def engines(tiny_loaded):
    return DecodeEngine(tiny_loaded, DecodeOptions(rows=6)), Florence2Engine(tiny_loaded)


class OffByOne(DecodeEngine):
    """A decode engine with a bug: its last beam-search token is wrong (results look plausible)."""

    def run_batch(self, requests):
        outcomes = super().run_batch(requests)
        for outcome in outcomes:
            if outcome.request.generation.num_beams > 1 and outcome.result is not None:
                outcome.result.raw_text += "<loc_1>"
        return outcomes


class Broken(DecodeEngine):
    def run_batch(self, requests):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")


def test_the_decode_engine_passes_where_it_matches_generate(engines):
    fast, reference = engines
    report = check_decode_engine(fast, reference)
    assert report.engine == "decode" and report.note == "" and 0 < report.seconds < 30


@pytest.mark.parametrize("engine_class, words", [(OffByOne, "differ from transformers' generate"),
                                                 (Broken, "failed the start-up canary")])
def test_a_mismatch_or_a_failure_falls_back_to_generate_with_one_error(tiny_loaded, caplog, engine_class, words):
    from florence2_serve.worker import service

    settings = WorkerSettings(model_name="tiny", model_path="x")
    with caplog.at_level(logging.ERROR, logger="florence2_serve.worker.canary"):
        engine, note = service._checked_engine(engine_class(tiny_loaded, DecodeOptions(rows=6)), tiny_loaded, settings)
    assert type(engine) is Florence2Engine and words in note
    assert service.engine_name(engine) == "generate"
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "serving with generate instead" in errors[0].getMessage()
    description = service.describe(settings, tiny_loaded, engine, engine_note=note)
    assert description["engine"] == "generate" and description["engine_note"] == note


def test_no_canary_keeps_the_decode_engine_unchecked(tiny_loaded):
    from florence2_serve.worker import service

    settings = WorkerSettings(model_name="tiny", model_path="x", canary=False)
    engine, note = service._checked_engine(Broken(tiny_loaded, DecodeOptions(rows=6)), tiny_loaded, settings)
    assert isinstance(engine, Broken) and note == ""


def test_gpu_check_is_one_command_that_refuses_cleanly_without_cuda():
    import hashlib
    import subprocess
    import sys
    from pathlib import Path

    import torch

    repo = Path(__file__).resolve().parent.parent
    script = repo / "bench" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    if torch.cuda.is_available():
        pytest.skip("a CUDA machine runs the script itself")
    results = (repo / "bench" / "RESULTS.md").read_bytes()
    done = subprocess.run(["bash", str(script)], capture_output=True, text=True, env={"PYTHON": sys.executable,
                                                                                      "PATH": "/usr/bin:/bin"})
    assert done.returncode == 2 and "no CUDA device" in done.stderr
    assert hashlib.sha256((repo / "bench" / "RESULTS.md").read_bytes()).digest() == hashlib.sha256(results).digest()


def test_a_noop_worker_never_imports_torch_for_its_engine_checks():
    """engine_name and the canary decision must not import the decode engine (torch: ~400 MB of RSS)."""
    import subprocess
    import sys

    code = ("import sys\n"
            "from florence2_serve.worker import noop, service\n"
            "from florence2_serve.worker.settings import WorkerSettings\n"
            "engine = noop.NoopEngine(noop.load_noop())\n"
            "assert service.engine_name(engine) == 'noop'\n"
            "assert service._checked_engine(engine, engine.loaded, WorkerSettings(model_name='n', model_path='noop'))"
            "[0] is engine\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
