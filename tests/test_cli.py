"""The florence2 CLI: argument handling with CliRunner, the service commands through the real entry point."""

from __future__ import annotations

import json
import os
import re
import socket
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from conftest import REPO
from florence2_serve.client.cli import cli
from florence2_serve.client.draw import draw_result
from florence2_serve.client.inputs import expand_inputs

EXE = str(Path(sys.executable).parent / "florence2")


def test_expand_inputs_files_dirs_globs(tmp_path):
    (tmp_path / "a").mkdir()
    for name in ("a/1.jpg", "a/2.PNG", "a/notes.txt", "3.webp"):
        (tmp_path / name).write_bytes(b"x")
    found = expand_inputs([str(tmp_path / "a"), str(tmp_path / "*.webp"), str(tmp_path / "a" / "1.jpg")])
    assert [p.path.name for p in found] == ["1.jpg", "2.PNG", "3.webp"]
    assert found[0].relative == (tmp_path / "a" / "1.jpg").relative_to("/")
    with pytest.raises(FileNotFoundError, match="no such file"):
        expand_inputs([str(tmp_path / "missing*.jpg")])


def test_draw_result_marks_boxes_and_polygons():
    image = Image.new("RGB", (100, 100), (255, 255, 255))
    drawn = draw_result(image, {"boxes": [{"x1": 10, "y1": 20, "x2": 60, "y2": 80, "label": "car"}],
                                "polygons": [{"rings": [{"points": [70, 70, 90, 70, 90, 90]}], "label": ""}]})
    assert drawn.getpixel((10, 50)) != (255, 255, 255)  # box edge
    assert image.getpixel((10, 50)) == (255, 255, 255)  # original untouched


@pytest.mark.parametrize("args,message", [
    (["detect", "nope.jpg"], "no such file"),
    (["detect", "--task", "FLY", "x.jpg"], "unknown task"),
    (["detect", "--region", "1,2,3", str(REPO / "examples" / "car.jpg")], "4 numbers"),
    (["detect", "--embedded", "--model", "bad name=x", str(REPO / "examples" / "car.jpg")], "letters, digits"),
    (["detect", "--embedded", str(REPO / "examples" / "car.jpg")], "--embedded needs --model"),
])
def test_detect_argument_errors(args, message):
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2 and message in result.output


def test_worker_rejects_bad_model_argument():
    result = CliRunner().invoke(cli, ["worker", "--model", "bad name=/x"])
    assert result.exit_code == 2 and "letters, digits" in result.output


def test_worker_with_unloadable_model_exits_with_clear_error(tmp_path, valkey):
    result = subprocess.run([EXE, "worker", "--model", f"x={tmp_path}", "--redis-url", valkey.connection_url],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "no config.json" in result.stderr


def run_cli(*args, timeout=120):
    return subprocess.run([EXE, *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_up_detect_draw_models_job_health_through_the_entry_point(tiny_model_dir, tmp_path):
    env = dict(os.environ)
    env.pop("REDIS_URL", None)
    up = subprocess.Popen([EXE, "up", "--model", f"uptest={tiny_model_dir}", "--workers", "2", "--device", "cpu",
                           "--address", "127.0.0.1:0", "--in-memory"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=env)
    try:
        address = up.stdout.readline().strip()
        assert address.startswith("127.0.0.1:"), up.stderr.read() if up.poll() is not None else address

        images = tmp_path / "images"
        images.mkdir()
        for name in ("car.jpg", "sign.png"):
            (images / name).write_bytes((REPO / "examples" / name).read_bytes())
        drawn = tmp_path / "drawn"
        result = run_cli("detect", str(images), "--server", address, "--json", "--draw", str(drawn))
        assert result.returncode == 0, result.stderr
        lines = sorted((json.loads(line) for line in result.stdout.splitlines()), key=lambda line: line["image"])
        assert [Path(line["image"]).name for line in lines] == ["car.jpg", "sign.png"]  # in completion order
        car = lines[0]["result"]
        assert [b["label"] for b in car["boxes"]] == ["car", "door handle", "wheel", "wheel"]
        assert car["boxes"][0]["x1"] == pytest.approx(34.24, abs=0.01)
        drawings = sorted(drawn.rglob("*.png"))
        assert [p.name for p in drawings] == ["car.jpg.od.png", "sign.png.od.png"]
        assert drawings[0].parent.name == "images" and Image.open(drawings[0]).size == (640, 480)
        assert all(line["job_id"] and line["task"] == "OD" for line in lines)

        caption = run_cli("detect", str(images / "car.jpg"), "--server", address, "--task", "CAPTION")
        assert caption.returncode == 0 and "A red car parked on the street." in caption.stdout

        models = run_cli("models", "--server", address, "--json")
        listed = json.loads(models.stdout)
        assert listed[0]["name"] == "uptest" and listed[0]["live_workers"] == 2

        text_models = run_cli("models", "--server", address)
        assert "uptest: FLORENCE2, 2 live workers" in text_models.stdout and "random weights" in text_models.stdout
        assert "NATIVE checkpoint" in text_models.stdout

        assert run_cli("health", "--server", address).stdout.strip() == "SERVING"

        bad = run_cli("detect", str(images / "car.jpg"), "--server", address, "--model", "nope", "--json")
        assert bad.returncode == 1 and "FAILED_PRECONDITION" in bad.stdout

        from florence2_serve.client import Florence2Client, job_spec

        with Florence2Client(address) as client:
            job_id = client.submit(job_spec((images / "car.jpg").read_bytes(), "uptest", "OD")).job_id
        watched = run_cli("job", "watch", job_id, "--server", address)
        assert [json.loads(l)["type"] for l in watched.stdout.splitlines()][-1] == "DONE"
        got = json.loads(run_cli("job", "get", job_id, "--server", address).stdout)
        assert (got["state"], got["task"]) == ("SUCCEEDED", "OD") and len(got["result"]["boxes"]) == 4
        assert got["result"]["raw_text"].startswith("</s>") and got["result"]["text"] == ""  # zero values present
        cancelled = json.loads(run_cli("job", "cancel", job_id, "--server", address).stdout)
        assert cancelled == {"job_id": job_id, "cancelled": False, "state": "SUCCEEDED"}
    finally:
        up.send_signal(signal.SIGTERM)
        code = up.wait(timeout=60)
    stderr = up.stderr.read()
    assert code == 0, stderr
    redis_port = int(re.search(r"redis redis://127\.0\.0\.1:(\d+)", stderr).group(1))
    with pytest.raises(OSError):  # the embedded valkey-server is gone too
        socket.create_connection(("127.0.0.1", redis_port), timeout=2).close()
    time.sleep(0.5)
    leftovers = subprocess.run(["pgrep", "-f", f"uptest={tiny_model_dir}"], capture_output=True, text=True).stdout.split()
    assert leftovers == [], "up left processes running"
    assert run_cli("health", "--server", address, timeout=30).returncode != 0


@pytest.mark.slow
def test_detect_embedded_runs_the_whole_stack_with_a_bare_model_path(tiny_model_dir):
    result = run_cli("detect", str(REPO / "examples" / "car.jpg"), "--embedded", "--model", str(tiny_model_dir),
                     "--json")
    assert result.returncode == 0, result.stderr
    line = json.loads(result.stdout)
    assert len(line["result"]["boxes"]) == 4 and line["result"]["raw_text"].startswith("</s><s>car")


@pytest.mark.slow
def test_workers_and_redis_stop_when_up_is_killed(tiny_model_dir, tmp_path):
    from service_helpers import wait_for

    up = subprocess.Popen([EXE, "up", "--model", f"orphan={tiny_model_dir}", "--device", "cpu", "--address",
                           "127.0.0.1:0", "--data-dir", str(tmp_path / "redis")],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert up.stdout.readline().startswith("127.0.0.1:")
    redis_port = None
    while redis_port is None:
        found = re.search(r"redis redis://127\.0\.0\.1:(\d+)", up.stderr.readline())
        redis_port = int(found.group(1)) if found else None
    up.kill()
    up.wait()

    def redis_gone() -> bool:
        try:
            socket.create_connection(("127.0.0.1", redis_port), timeout=1).close()
            return False
        except OSError:
            return True

    wait_for(lambda: not subprocess.run(["pgrep", "-f", f"orphan={tiny_model_dir}"], capture_output=True).stdout,
             timeout=30, message="workers to exit after up was killed")
    wait_for(redis_gone, timeout=40, message="the embedded Redis to stop after up was killed")
    wait_for(lambda: not subprocess.run(["pgrep", "-f", f"embedded_redis --data-dir {tmp_path}"],
                                        capture_output=True).stdout, timeout=15, message="the Redis keeper to exit")
