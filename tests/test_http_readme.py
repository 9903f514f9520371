"""README's HTTP example, run verbatim (bash + curl) against a live front end and a worker serving "base"."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import pytest

from conftest import REPO

MARKER = "<!-- http-example:"


def readme_block() -> str:
    text = (REPO / "README.md").read_text()
    after = text[text.index(MARKER):]
    match = re.search(r"```bash\n(.*?)```", after, re.S)
    assert match, "README's HTTP example block is missing"
    return match.group(1)


def test_readme_http_example_runs_verbatim(valkey, front_end_factory, worker_factory):
    if shutil.which("curl") is None:
        assert not os.environ.get("CI"), "CI has curl"
        pytest.skip("curl is not installed")
    front = front_end_factory(valkey.connection_url)
    worker_factory(valkey.connection_url, "base=noop", "--kind", "noop", worker_id="readme-w")
    script = readme_block()
    assert "http://127.0.0.1:8080" in script  # what a reader's stack prints; the test points it at its own
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=REPO, capture_output=True, text=True,
                            timeout=120, env=dict(os.environ, FLORENCE2_HTTP=front.front_end.http_url))
    assert result.returncode == 0, result.stderr
    output = result.stdout
    assert '"code": ' not in output, output  # no call answered with an error Status
    streamed = [json.loads(line[len("data: "):])["event"] for line in output.splitlines() if line.startswith("data: ")]
    assert [e["type"] for e in streamed].count("EVENT_TYPE_DONE") == 2  # the Run stream and the Watch stream
    assert '"cancelled":false' in output and '"state":"JOB_STATE_SUCCEEDED"' in output
    assert '"created":true' in output and '"name":"base"' in output and output.rstrip().endswith('{"status": "SERVING"}')
