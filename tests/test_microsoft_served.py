"""A Microsoft-format checkpoint laid out as the hub's are (BART's plain tokenizer; the processor adds
Florence-2's tokens) served through `florence2 up`: the raw text of every task family equals what
Microsoft's recipe gives with the checkpoint's own code (legacy transformers in CI), and the typed results
are that text's boxes, polygons and quads.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import python_env
from florence2_outputs import images
from florence2_serve.client import Florence2Client
from florence2_serve.common.postprocess import parse_generation
from florence2_serve.common.tasks import Task, region_tokens
from service_helpers import wait_for
from test_conversion import _legacy_path
from test_up import Up

pytestmark = pytest.mark.slow
TESTS = Path(__file__).parent
NEW_TOKENS = 40
# (task, text, region as fractions of the image) for every task family Florence-2 has.
FAMILIES = [
    ("CAPTION", "", None), ("DETAILED_CAPTION", "", None), ("MORE_DETAILED_CAPTION", "", None),
    ("OD", "", None), ("DENSE_REGION_CAPTION", "", None), ("REGION_PROPOSAL", "", None),
    ("CAPTION_TO_PHRASE_GROUNDING", "a red car", None), ("REFERRING_EXPRESSION_SEGMENTATION", "the red car", None),
    ("OPEN_VOCABULARY_DETECTION", "car", None), ("OCR", "", None), ("OCR_WITH_REGION", "", None),
    ("REGION_TO_SEGMENTATION", "", (0.1, 0.2, 0.8, 0.7)), ("REGION_TO_CATEGORY", "", (0.05, 0.3, 0.9, 0.85)),
    ("REGION_TO_DESCRIPTION", "", (0.2, 0.1, 0.6, 0.9)), ("REGION_TO_OCR", "", (0.3, 0.4, 0.7, 0.6)),
]


def _cases() -> list[dict]:
    cases = []
    for index, image in enumerate(images()[:2]):
        width, height = image.size
        for task, text, fractions in FAMILIES:
            region = None
            if fractions:
                region = (fractions[0] * width, fractions[1] * height, fractions[2] * width, fractions[3] * height)
            user_input = text or (region_tokens(region, image.size) if region else "")
            cases.append({"image": index, "task": task, "text": text, "region": region,
                          "prompt": f"<{task}>{user_input}", "new_tokens": NEW_TOKENS})
    return cases


@pytest.fixture(scope="module")
def reference_texts(remote_code_dir, tmp_path_factory):
    """Microsoft's recipe on the fixture, by its own code: processor, generate (3 beams), batch_decode."""
    work = tmp_path_factory.mktemp("reference-texts")
    (work / "cases.json").write_text(json.dumps(_cases()))
    legacy = _legacy_path()
    env = python_env(HF_HUB_OFFLINE=1, **({"PYTHONPATH": legacy} if legacy else {}))
    result = subprocess.run([sys.executable, str(TESTS / "florence2_outputs.py"), str(remote_code_dir),
                             str(work / "texts.pt"), "--texts", str(work / "cases.json")],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(work / "texts.pt", weights_only=True)


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_every_task_family_answers_as_microsofts_code_through_up(remote_code_dir, reference_texts, tmp_path):
    env = {**os.environ, "FLORENCE2_CONVERT_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    up = Up("--model", f"ms={remote_code_dir}", "--device", "cpu", "--in-memory", env=env)
    try:
        with Florence2Client(up.address, timeout=120) as client:
            wait_for(lambda: any(m.workers for m in client.list_models()), timeout=120, message="the worker is live")
            pngs = [_png(image) for image in images()]
            served = [client.detect(pngs[case["image"]], "ms", case["task"], text=case["text"],
                                    region=case["region"], max_new_tokens=NEW_TOKENS, num_beams=3)
                      for case in reference_texts]
    finally:
        up.process.send_signal(signal.SIGTERM)
        code, stderr = up.wait()
    assert code == 0, stderr[-2000:]
    shapes = {"boxes": 0, "polygons": 0, "ocr": 0}
    for case, result in zip(reference_texts, served, strict=True):
        where = f"{case['task']} on image {case['image']}"
        assert result.raw_text == case["raw_text"].replace("<pad>", ""), where
        expected = parse_generation(Task.parse(case["task"]), case["raw_text"], images()[case["image"]].size)
        for field in shapes:
            assert list(getattr(result, field)) == list(getattr(expected, field)), f"{field} of {where}"
            shapes[field] += len(getattr(result, field))
        assert result.text == expected.text, where
    # Location tokens are served as such: the comparison covers boxes, polygons and quads, not empty lists.
    assert all(count > 0 for count in shapes.values()), shapes


def test_the_converted_tokenizer_has_microsofts_ids(remote_code_dir, tmp_path):
    from florence2_serve.worker.conversion import convert_checkpoint
    from florence2_serve.worker.task_tokens import FLORENCE_TOKENS
    from transformers import AutoProcessor

    plain = json.loads((remote_code_dir / "tokenizer.json").read_text())
    assert not any(t["content"].startswith("<loc_") for t in plain["added_tokens"]), "the fixture ships BART's plain tokenizer"
    report = convert_checkpoint(remote_code_dir, tmp_path / "native")
    size = len(plain["model"]["vocab"]) + sum(t["content"] not in plain["model"]["vocab"] for t in plain["added_tokens"])
    assert (report.task_token_first_id, report.task_tokens_added) == (size, len(FLORENCE_TOKENS))
    processor = AutoProcessor.from_pretrained(tmp_path / "native")
    tokenizer = processor.tokenizer
    assert tokenizer.convert_tokens_to_ids(FLORENCE_TOKENS) == list(range(size, size + len(FLORENCE_TOKENS)))
    config = json.loads((remote_code_dir / "config.json").read_text())
    assert size + len(FLORENCE_TOKENS) == config["text_config"]["vocab_size"]
    assert tokenizer("<loc_100>", add_special_tokens=False).input_ids == [size + 4 + 100]
    assert tokenizer.decode([size, size + 4, size + 1]) == "<od><loc_0></od>"


def test_converted_checkpoint_preprocesses_images_as_the_reference(remote_code_dir, reference_texts, tmp_path):
    """Pixels bit-equal to the reference's (transformers < 4.50 resizes with PIL); torchvision on request."""
    from florence2_serve.worker.loader import LoadOptions, load_model

    options = {"device": "cpu", "convert_cache": str(tmp_path / "cache")}
    loaded = load_model(str(remote_code_dir), LoadOptions(**options))
    by_image = {case["image"]: case["pixel_values"] for case in reference_texts}
    for index, expected in by_image.items():
        pixels = loaded.processor.image_processor([images()[index]], return_tensors="pt")["pixel_values"]
        assert torch.equal(pixels, expected), f"image {index}"
    fast = load_model(str(remote_code_dir), LoadOptions(image_backend="torchvision", **options))
    assert type(fast.processor.image_processor).__name__ == "CLIPImageProcessor"
    assert type(loaded.processor.image_processor).__name__ == "CLIPImageProcessorPil"
