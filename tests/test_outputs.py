"""Outputs people feed to other tools: CSV and COCO exports, JSON numbers without float32 noise, OpenCV
(BGR) arrays taken in their own order, and a client-side timeout that says which job runs on."""

from __future__ import annotations

import csv
import io
import json

import grpc
import numpy as np
import pytest
from PIL import Image

from florence2_serve.client import JobFailed, RpcError, job_spec, to_json
from florence2_serve.client.export import CocoDocument, CsvRows
from florence2_serve.client.image_input import image_bytes
from florence2_serve.v1 import florence2_pb2 as pb

RESULT = {
    "image_width": 200, "image_height": 100, "text": "",
    "boxes": [{"x1": 10.0, "y1": 20.0, "x2": 50.0, "y2": 60.0, "label": "car", "score": 0.9},
              {"x1": 80.0, "y1": 70.0, "x2": 60.0, "y2": 30.0, "label": "dog"}],  # inverted, as generated
    "polygons": [{"label": "car", "rings": [{"points": [0, 0, 10, 0, 10, 10, 0, 10]}]}],
    "ocr": [{"text": "STOP, now", "points": [1, 2, 3, 4, 5, 6, 7, 8]}],
}


def test_csv_has_one_row_per_box_polygon_and_quad_and_quotes_text():
    rows = CsvRows()
    lines = [rows.header(), *rows.lines("a.jpg", "j1", "OD", RESULT), *rows.lines("b.jpg", "j2", "OD", None, "bad")]
    table = list(csv.DictReader(io.StringIO("\n".join(lines))))
    assert [r["kind"] for r in table] == ["box", "box", "polygon", "ocr", "error"]
    assert table[0]["label"] == "car" and float(table[0]["score"]) == 0.9 and table[1]["score"] == ""
    assert table[3]["text"] == "STOP, now" and table[3]["points"] == "1 2 3 4 5 6 7 8"
    assert table[4]["image"] == "b.jpg" and table[4]["text"] == "bad"


def test_coco_document_numbers_categories_by_label_and_normalises_boxes():
    document = CocoDocument()
    document.add("a.jpg", RESULT)
    data = json.loads(document.document())
    assert data["images"] == [{"id": 1, "file_name": "a.jpg", "width": 200, "height": 100}]
    assert data["categories"] == [{"id": 1, "name": "car"}, {"id": 2, "name": "dog"}]
    car, dog, mask = data["annotations"]
    assert car["bbox"] == [10.0, 20.0, 40.0, 40.0] and car["area"] == 1600.0 and car["score"] == 0.9
    assert dog["bbox"] == [60.0, 30.0, 20.0, 40.0] and "score" not in dog  # x2 < x1 as generated: normalised
    assert mask["category_id"] == 1 and mask["area"] == 100.0 and mask["segmentation"] == [[0, 0, 10, 0, 10, 10, 0, 10]]


def test_json_numbers_are_the_decimals_float32_stands_for():
    result = pb.Result(boxes=[pb.Box(x1=34.24, y1=0.1, x2=100.5, y2=7, label="car", score=0.87)], task=pb.TASK_TYPE_OD)
    assert result.boxes[0].x1 != 34.24  # float32 underneath
    box = to_json(result)["boxes"][0]
    assert (box["x1"], box["y1"], box["x2"], box["score"]) == (34.24, 0.1, 100.5, 0.87)
    assert to_json(result)["task"] == "OD"


def test_bgr_arrays_are_sent_in_rgb_order():
    bgr = np.zeros((4, 4, 3), dtype=np.uint8)
    bgr[:, :, 0] = 255  # blue, in OpenCV's order
    sent = Image.open(io.BytesIO(image_bytes(bgr, channels="bgr")))
    assert sent.getpixel((0, 0)) == (0, 0, 255)
    assert Image.open(io.BytesIO(image_bytes(bgr))).getpixel((0, 0)) == (255, 0, 0)  # RGB by default
    bgra = np.zeros((2, 2, 4), dtype=np.uint8)
    bgra[:, :, 2], bgra[:, :, 3] = 255, 128  # red, half transparent
    assert Image.open(io.BytesIO(image_bytes(bgra, channels="bgr"))).getpixel((0, 0)) == (255, 0, 0, 128)
    spec = job_spec(bgr, "m", "OD", channels="bgr")
    assert Image.open(io.BytesIO(spec.image)).getpixel((0, 0)) == (0, 0, 255)
    with pytest.raises(ValueError, match="channels"):
        image_bytes(bgr, channels="bgra")


def test_a_client_timeout_says_what_became_of_the_job(noop_stack, tiny_png):
    client = noop_stack.client
    hold = {"min_new_tokens": 3000, "max_new_tokens": 3000, "num_beams": 1}
    with pytest.raises((RpcError, JobFailed)) as timed_out:  # Run: the call's deadline is the job's too
        client.detect(tiny_png, "nop", "OD", timeout=0.5, **hold)
    error = timed_out.value  # whichever came first: our deadline, or the job's EXPIRED event
    assert error.reason == "DEADLINE_EXCEEDED" and error.job_id
    if isinstance(error, RpcError):
        assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert f"job {error.job_id} had the same deadline and ends EXPIRED" in error.details()
    else:
        assert error.state == "EXPIRED"
    job_id = client.submit(job_spec(tiny_png, "nop", "OD", **hold)).job_id
    with pytest.raises(RpcError) as waited:  # Watch: the job runs on
        client.wait(job_id, timeout=0.5)
    assert waited.value.job_id == job_id and f"job {job_id} runs on" in waited.value.details()
    assert client.get_job(job_id).state in (pb.JOB_STATE_QUEUED, pb.JOB_STATE_RUNNING)
    client.cancel(job_id)
