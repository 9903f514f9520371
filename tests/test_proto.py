"""The .proto contract: lint, generated stubs in sync, importable without path tricks."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "protos"))
from generate import GENERATED, PROTO_DIR, generate  # noqa: E402

sys.path.pop(0)


def test_generated_stubs_match_the_proto(tmp_path):
    generate(tmp_path)
    for name in GENERATED:
        fresh = (tmp_path / name).read_text()
        committed = (PROTO_DIR / name).read_text()
        assert fresh == committed, f"{name} drifted from florence2.proto: run python protos/generate.py"


def test_stubs_import_through_the_namespace_in_a_clean_interpreter():
    code = ("from florence2_serve.v1 import florence2_pb2 as pb, florence2_pb2_grpc as g;"
            "assert g.Florence2ServiceStub and pb.DESCRIPTOR.package == 'florence2.v1';"
            "import sys; assert not any(p.endswith('protos') for p in sys.path)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert result.returncode == 0, result.stderr


def test_task_enum_covers_every_task():
    from florence2_serve.common.tasks import Task
    from florence2_serve.server.convert import task_from_proto, task_to_proto

    for task in Task:
        assert task_from_proto(task_to_proto(task)) is task


def _buf() -> str | None:
    local = REPO / "node_modules" / ".bin" / "buf"
    return str(local) if local.exists() else shutil.which("buf")


def test_buf_lint_clean():
    buf = _buf()
    if buf is None:
        assert not os.environ.get("CI"), "CI must lint the proto: .ci/run installs buf with npm"
        pytest.skip("buf not installed (npm install; .ci/run does)")
    result = subprocess.run([buf, "lint"], cwd=REPO / "protos", capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
