"""The CLI as people use it: detect/submit on a real stack (CliRunner and real subprocesses), drawings,
Ctrl-C, help, JSON conventions, model paths, doctor."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from PIL import Image

from florence2_serve.client import Florence2Client, job_spec
from florence2_serve.client.cli import cli
from florence2_serve.client.draw import draw_result
from florence2_serve.common.tasks import Task
from florence2_serve.v1 import florence2_pb2 as pb
from service_helpers import wait_for

EXE = str(Path(sys.executable).parent / "florence2")


@pytest.fixture
def photos(tmp_path, monkeypatch):
    """img000.jpg, img000.png and sub/img000.png: three inputs one naive naming scheme would merge."""
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "photos"
    (root / "sub").mkdir(parents=True)
    for name, color in (("img000.jpg", (200, 0, 0)), ("img000.png", (0, 200, 0)), ("sub/img000.png", (0, 0, 200))):
        Image.new("RGB", (64, 48), color).save(root / name)
    return root


def _detect(stack, *args):
    return CliRunner().invoke(cli, ["detect", "--server", stack.address, "--model", "nop", *args])


def _json_lines(output: str) -> list[dict]:
    return [json.loads(line) for line in output.splitlines() if line.startswith("{")]


def test_drawings_keep_relative_paths_and_tasks_and_never_clobber(noop_stack, photos, tmp_path):
    out = tmp_path / "drawn"
    for task in ("OD", "CAPTION"):
        result = _detect(noop_stack, "photos", "--task", task, "--json", "--draw", str(out))
        assert result.exit_code == 0, result.output
    names = sorted(str(p.relative_to(out)) for p in out.rglob("*.png"))
    assert names == ["photos/img000.jpg.caption.png", "photos/img000.jpg.od.png", "photos/img000.png.caption.png",
                     "photos/img000.png.od.png", "photos/sub/img000.png.caption.png", "photos/sub/img000.png.od.png"]
    again = _detect(noop_stack, "photos", "--draw", str(out))
    assert again.exit_code == 0 and "3 beside existing files" in again.output
    assert len(list(out.rglob("*.od-2.png"))) == 3
    replaced = _detect(noop_stack, "photos", "--draw", str(out), "--overwrite")
    assert replaced.exit_code == 0 and len(list(out.rglob("*.od-3.png"))) == 0


def test_every_line_has_the_job_id_and_a_summary_follows(noop_stack, photos):
    result = _detect(noop_stack, "photos", "--json")
    lines = _json_lines(result.output)
    assert len(lines) == 3 and all(len(line["job_id"]) == 32 and line["result"]["task"] == "CAPTION" or
                                   line["result"]["task"] == "OD" for line in lines)
    assert lines[0]["result"]["text"] == "" and "raw_text" in lines[0]["result"]  # zero values present
    assert "3 images: 3 succeeded, 0 failed" in result.output and "images/s" in result.output
    text = _detect(noop_stack, "photos/img000.jpg")
    assert "job " in text.output and "nothing found" in text.output


def test_fail_fast_stops_at_the_first_failure(noop_stack, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for i in range(30):  # named as images, but not images: the server refuses each
        (tmp_path / f"{i:02d}.png").write_bytes(b"not a png at all")
    result = _detect(noop_stack, str(tmp_path), "--concurrency", "2", "--fail-fast", "--json")
    assert result.exit_code == 1
    failures = [line for line in _json_lines(result.output) if "error" in line]
    assert failures[0]["error"]["reason"] == "IMAGE_UNREADABLE" and len(failures) < 30
    assert "--fail-fast" in result.output and "not run" in result.output


def test_submit_prints_job_ids_and_waits_when_asked(noop_stack, photos):
    result = CliRunner().invoke(cli, ["submit", "photos", "--server", noop_stack.address, "--model", "nop"])
    lines = _json_lines(result.output)
    assert result.exit_code == 0 and len(lines) == 3 and all(line["created"] and line["job_id"] for line in lines)
    for line in lines:
        assert noop_stack.client.wait(line["job_id"]).image_width == 64
    waited = CliRunner().invoke(cli, ["submit", "photos/img000.jpg", "--server", noop_stack.address, "--model", "nop",
                                      "--task", "CAPTION", "--wait"])
    (line,) = _json_lines(waited.output)
    assert line["result"]["task"] == "CAPTION" and line["result"]["image_width"] == 64


@pytest.mark.slow
def test_ctrl_c_cancels_the_runs_jobs_on_the_server_and_exits_130(noop_stack, worker_factory, tmp_path):
    client = noop_stack.client
    # One job at a time, held by a long job: the run's jobs wait in the queue.
    worker_factory(noop_stack.url, "one=noop", "--kind", "noop", "--batch-size", "1", worker_id="one-w")
    blocker = client.submit(job_spec(_png(), "one", "CAPTION", min_new_tokens=4000, max_new_tokens=4000)).job_id
    wait_for(lambda: client.get_job(blocker).state == pb.JOB_STATE_RUNNING, message="blocker running")
    for i in range(40):
        Image.new("RGB", (16, 16)).save(tmp_path / f"{i:02d}.png")
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    process = subprocess.Popen([EXE, "detect", str(tmp_path), "--server", noop_stack.address, "--model", "one",
                                "--json", "--concurrency", "8"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=env)
    wait_for(lambda: sum(m.queue_depth for m in client.list_models()) >= 7, timeout=30, message="jobs queued")
    started = time.monotonic()
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=30)
    assert process.returncode == 130, err
    assert time.monotonic() - started < 10
    assert "cancelling this run's jobs" in err and "40 images" in err and "not run" in err
    cancelled = [line for line in _json_lines(out) if line.get("error", {}).get("reason") == "CANCELLED"]
    assert len(cancelled) >= 7
    for line in cancelled:
        assert client.get_job(line["job_id"]).state == pb.JOB_STATE_CANCELLED
    assert sum(m.queue_depth for m in client.list_models()) == 0  # nothing of the run left behind
    client.cancel(blocker)


def _png() -> bytes:
    import io

    buffer = io.BytesIO()
    Image.new("RGB", (16, 16)).save(buffer, format="PNG")
    return buffer.getvalue()


# -- drawings ----------------------------------------------------------------------------------------

def test_text_results_are_drawn_and_empty_region_results_show_the_region():
    image = Image.new("RGB", (200, 150), (40, 120, 40))
    caption = draw_result(image, {"text": "A red car parked on the street.", "boxes": [], "polygons": [], "ocr": []})
    assert caption.crop((0, 120, 200, 150)).getcolors(10000) != image.crop((0, 120, 200, 150)).getcolors(10000)
    empty = draw_result(image, {"text": "", "boxes": [], "polygons": [], "ocr": []}, region=(50, 40, 150, 110))
    assert min(empty.getpixel((50, 90))) > 200  # the white region outline
    assert empty.crop((50, 0, 200, 40)).getcolors(10000) != image.crop((50, 0, 200, 40)).getcolors(10000)  # its label


def test_region_tasks_show_their_region_beside_what_they_found_and_boxes_are_drawn_normalised():
    image = Image.new("RGB", (200, 150), (40, 120, 40))
    region = (20, 20, 60, 60)
    found = draw_result(image, {"text": "", "polygons": [], "ocr": [], "boxes": [
        {"x1": 150, "y1": 120, "x2": 100, "y2": 80, "label": "inverted"},  # x2 < x1, y2 < y1 as generated
        {"x1": 170, "y1": 10, "x2": 170, "y2": 60, "label": "flat"}]}, region=region)
    assert min(found.getpixel((20, 40))) > 200  # the asked-about region, in white, though something was found
    assert found.getpixel((100, 100)) != image.getpixel((100, 100))  # the inverted box, drawn at x 100..150
    assert found.getpixel((125, 100)) == image.getpixel((125, 100))  # outline only: its inside untouched
    assert found.getpixel((170, 40)) == image.getpixel((170, 40))  # a box with no area is not drawn


def test_outlines_have_a_halo_and_polygons_a_translucent_fill():
    red = Image.new("RGB", (120, 120), (230, 25, 75))  # the first palette colour: a same-coloured object
    drawn = draw_result(red, {"boxes": [{"x1": 20, "y1": 20, "x2": 100, "y2": 100, "label": "x"}],
                              "polygons": [], "ocr": [], "text": ""})
    column = [drawn.getpixel((20 + dx, 60)) for dx in range(-3, 4)]
    assert any(sum(p) < 100 for p in column)  # the dark halo shows on a same-coloured object
    white = Image.new("RGB", (120, 120), (255, 255, 255))
    filled = draw_result(white, {"polygons": [{"label": "a", "rings": [{"points": [10, 10, 110, 10, 110, 110, 10, 110]}]}],
                                 "boxes": [], "ocr": [], "text": ""})
    inside = filled.getpixel((60, 80))
    assert inside != (255, 255, 255) and min(inside) > 100  # tinted, not painted over


def test_labels_do_not_overlap():
    image = Image.new("RGB", (300, 200), (255, 255, 255))
    boxes = [{"x1": 50 + i, "y1": 60, "x2": 120 + i, "y2": 150, "label": f"label {i}"} for i in range(0, 12, 3)]
    from florence2_serve.client.draw import _Canvas

    canvas = _Canvas(image)
    for box in boxes:
        canvas.label(box["x1"], box["y1"], box["label"], (0, 0, 0))
    canvas.finish()
    rects = canvas.labels
    assert len(rects) == 4
    for i, a in enumerate(rects):
        assert all(0 <= v for v in a) and a[2] <= 300 and a[3] <= 200
        for b in rects[i + 1:]:
            assert not (a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3])


# -- help, verbosity, JSON, model paths, doctor ------------------------------------------------------

def _commands(group: click.Group, prefix: str = ""):
    for name, command in group.commands.items():
        yield f"{prefix}{name}", command
        if isinstance(command, click.Group):
            yield from _commands(command, f"{prefix}{name} ")


def test_every_command_and_option_has_help():
    missing = []
    for name, command in _commands(cli):
        if not (command.help or command.short_help):
            missing.append(name)
        for param in command.params:
            if isinstance(param, click.Option) and not param.help:
                missing.append(f"{name} {param.opts[0]}")
    assert not missing, missing
    detect_help = CliRunner().invoke(cli, ["detect", "--help"]).output
    assert all(task.name in detect_help.replace("\n", " ").replace(" ", "") for task in Task)


def test_verbose_goes_after_the_subcommand_too(noop_stack):
    result = CliRunner().invoke(cli, ["models", "-v", "--server", noop_stack.address, "--json"])
    assert result.exit_code == 0, result.output
    (model,) = json.loads(result.stdout)
    assert model["queue_depth"] == 0 and model["kind"] == "NOOP" and "CAPTION" in model["tasks"]


def test_a_local_looking_model_path_that_does_not_exist_fails_at_once(tmp_path, valkey):
    (tmp_path / "models").mkdir()
    started = time.monotonic()
    result = subprocess.run([EXE, "worker", "--model", "x=models/tinyy", "--redis-url", valkey.connection_url],
                            capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 2 and "no such model directory: models/tinyy" in result.stderr
    assert time.monotonic() - started < 30
    assert result.stderr.count("no such model directory") == 1


def test_doctor_checks_redis_and_a_running_server(noop_stack):
    result = subprocess.run([EXE, "doctor", "--json", "--redis-url", noop_stack.url, "--server", noop_stack.address],
                            capture_output=True, text=True, timeout=120)
    report = json.loads(result.stdout)
    assert report["redis"]["version"].startswith(("7", "8", "9")) and report["redis"]["persistent"] is False
    assert report["server"]["health"] == "SERVING" and report["server"]["models"]["nop"]["live_workers"] == 1
    assert set(report["extras"]) == {"yolo", "legacy", "tracing"}


def test_client_from_the_package_with_the_environment_address(noop_stack, monkeypatch):
    monkeypatch.setenv("FLORENCE2_SERVER", noop_stack.address)
    with Florence2Client() as client:
        assert client.health() == "SERVING"
