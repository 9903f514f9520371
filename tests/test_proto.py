"""The .proto contract: lint, generated stubs in sync, importable without path tricks."""

import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "protos"))
from generate import GENERATED, PROTO_DIR, generate, googleapis_protos  # noqa: E402

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
    from florence2_serve.common.proto_enums import task_from_proto, task_name, task_to_proto
    from florence2_serve.common.tasks import Task
    from florence2_serve.v1 import florence2_pb2 as pb

    for task in Task:
        assert task_from_proto(task_to_proto(task)) is task and task_name(task_to_proto(task)) == task.name
    assert len(pb.TaskType.values()) == len(Task) + 1  # and UNSPECIFIED


def test_every_language_has_its_packaging_options():
    options = (PROTO_DIR / "florence2.proto").read_text()
    for option in ("go_package", "java_package", "java_multiple_files", "java_outer_classname", "csharp_namespace",
                   "objc_class_prefix", "php_namespace", "ruby_package"):
        assert f"option {option} = " in options, option
    assert "enum Task {" not in options  # clashes with System.Threading.Tasks.Task in C#


def _buf() -> str | None:
    local = REPO / "node_modules" / ".bin" / "buf"
    return str(local) if local.exists() else shutil.which("buf")


def _need_buf() -> str:
    buf = _buf()
    if buf is None:
        assert not os.environ.get("CI"), "CI must check the proto: .ci/run installs buf with npm"
        pytest.skip("buf not installed (npm install; .ci/run does)")
    return buf


RELEASED = REPO / "protos" / "released" / "florence2-v1.binpb"
OURS = "api/florence2/v1/florence2.proto"


def _workspace(root) -> "os.PathLike":
    """protos/ as a buf workspace that needs no network: the googleapis dependency buf.yaml names comes from
    the installed googleapis-common-protos, as a second module that is neither linted nor compared."""
    shutil.copytree(REPO / "protos" / "florence2", root / "api" / "florence2",
                    ignore=shutil.ignore_patterns("*.py", "*.pyi", "__pycache__"))
    (root / "googleapis" / "google").mkdir(parents=True)
    shutil.copytree(googleapis_protos() / "google" / "api", root / "googleapis" / "google" / "api",
                    ignore=shutil.ignore_patterns("*.py", "*.pyi", "__pycache__"))
    config = (REPO / "protos" / "buf.yaml").read_text().split("deps:")[0]
    rules = (REPO / "protos" / "buf.yaml").read_text().split("lint:", 1)[1]
    (root / "buf.yaml").write_text(config + "modules:\n  - path: api\n  - path: googleapis\nlint:" + rules)
    return root


def _buf_run(root, *args):
    only_ours = ["--path", OURS] if args[0] == "lint" else []  # breaking: the released image names other paths
    return subprocess.run([_need_buf(), *args, *only_ours], cwd=root, capture_output=True, text=True)


def test_buf_lint_clean(tmp_path):
    result = _buf_run(_workspace(tmp_path), "lint")
    assert result.returncode == 0, result.stdout + result.stderr


def test_no_breaking_change_against_the_released_proto(tmp_path):
    result = _buf_run(_workspace(tmp_path), "breaking", "--against", f"{RELEASED}")
    assert result.returncode == 0, "wire/API-breaking change against v1 as released:\n" + result.stdout + result.stderr


def test_every_method_has_an_http_rule():
    from google.api import annotations_pb2

    from florence2_serve.v1 import florence2_pb2 as pb

    for method in pb.DESCRIPTOR.services_by_name["Florence2Service"].methods:
        rule = method.GetOptions().Extensions[annotations_pb2.http]
        assert rule.WhichOneof("pattern") in ("get", "post"), method.name


@pytest.mark.parametrize("change", [
    ("  TaskType task = 2;\n", "  int64 task = 2;\n"),  # a field's type
    ("  string model = 1;\n  TaskType task = 2;", "  string model = 11;\n  TaskType task = 2;"),  # a field number
    ("  EVENT_TYPE_EXPIRED = 7;\n", ""),  # an enum value removed
])
def test_buf_breaking_catches_a_wire_breaking_change(tmp_path, change):
    root = _workspace(tmp_path)
    proto = root / OURS
    text = proto.read_text()
    assert change[0] in text
    proto.write_text(text.replace(change[0], change[1], 1))
    result = _buf_run(root, "breaking", "--against", f"{RELEASED}")
    assert result.returncode != 0 and "florence2.proto" in result.stdout, result.stdout + result.stderr
