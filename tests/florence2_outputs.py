"""What a Florence-2 checkpoint computes on fixed inputs: generated tokens (greedy and beams 3) and
teacher-forced logits, per image and task, plus one padded batch.

Run as a script (`python florence2_outputs.py CHECKPOINT OUT.pt`) it loads a Microsoft-format checkpoint
with its own code (trust_remote_code, on whatever transformers PYTHONPATH gives: the legacy line in CI)
and saves inputs and outputs with torch.save (tensors and lists only); `replay` runs a native model on
the same inputs. With `--texts CASES.json` it instead answers each case as a user of Microsoft's code
does (processor -> generate -> `batch_decode(skip_special_tokens=False)`) and saves the raw texts.
"""

from __future__ import annotations

import sys

TASKS = ["<OD>", "<CAPTION>", "<OCR>", "<CAPTION_TO_PHRASE_GROUNDING>a red car"]
NEW_TOKENS = 20


def images():
    from PIL import Image, ImageDraw

    scene = Image.new("RGB", (320, 240), (135, 180, 230))
    ImageDraw.Draw(scene).rectangle([20, 80, 300, 200], fill=(200, 30, 30))
    tall = Image.new("RGB", (120, 300), (40, 160, 60))
    ImageDraw.Draw(tall).ellipse([10, 40, 110, 200], fill=(240, 200, 150))
    sign = Image.new("RGB", (256, 256), (250, 250, 250))
    ImageDraw.Draw(sign).text((90, 120), "STOP", fill=(200, 0, 0))
    return [scene, tall, sign]


def load(path: str):
    import transformers
    from transformers import AutoModelForCausalLM, AutoProcessor

    from florence2_serve.worker import flash_attn_shim

    flash_attn_shim.install()
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, attn_implementation="eager")
    # The reference resizes with PIL, as transformers < 4.50 does (5 defaults to torchvision).
    pil = {"backend": "pil"} if int(transformers.__version__.split(".")[0]) >= 5 else {}
    processor = AutoProcessor.from_pretrained(path, trust_remote_code=True, **pil)
    return model.float().eval(), processor


def texts(model, processor, cases: list[dict]) -> list[dict]:
    """Each case ({"image", "prompt", "new_tokens"}: an image index, a task token with its input) answered
    with Microsoft's recipe: 3 beams, no sampling, the checkpoint's other generation defaults."""
    import torch

    answers, pictures = [], images()
    with torch.inference_mode():
        for case in cases:
            inputs = processor(text=case["prompt"], images=pictures[case["image"]], return_tensors="pt")
            generated = model.generate(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"],
                                       max_new_tokens=case["new_tokens"], num_beams=3, do_sample=False)
            raw = processor.batch_decode(generated, skip_special_tokens=False)[0]
            answers.append({**case, "raw_text": raw, "pixel_values": inputs["pixel_values"]})
    return answers


def outputs(model, processor) -> dict:
    """The reference side: inputs from the checkpoint's own processor, and what the model makes of them."""
    import torch

    cases = []
    with torch.inference_mode():
        for index, image in enumerate(images()):
            for task in TASKS:
                inputs = dict(processor(text=[task], images=[image], return_tensors="pt"))
                cases.append({"image": index, "task": task, **inputs, **_run(model, inputs)})
        batch = dict(processor(text=TASKS, images=images()[:1] * len(TASKS), return_tensors="pt", padding=True))
        batch.update(_run(model, batch))
    return {"cases": cases, "batch": batch}


def replay(model, reference: dict, image_token_id: int, image_tokens: int) -> dict:
    """The native side on the reference's own inputs: its text ids behind the image placeholders."""
    import torch

    def native_inputs(inputs):
        rows = inputs["input_ids"].shape[0]
        placeholders = torch.full((rows, image_tokens), image_token_id, dtype=torch.long)
        return {"input_ids": torch.cat([placeholders, inputs["input_ids"]], dim=1),
                "attention_mask": torch.cat([torch.ones(rows, image_tokens, dtype=torch.long),
                                             inputs["attention_mask"]], dim=1),
                "pixel_values": inputs["pixel_values"]}

    with torch.inference_mode():
        cases = [{**case, **_run(model, native_inputs(case))} for case in reference["cases"]]
        batch = {**reference["batch"], **_run(model, native_inputs(reference["batch"]))}
    return {"cases": cases, "batch": batch}


def _run(model, inputs) -> dict:
    inputs = {key: inputs[key] for key in ("input_ids", "attention_mask", "pixel_values")}
    greedy = model.generate(**inputs, max_new_tokens=NEW_TOKENS, num_beams=1, do_sample=False)
    beams = model.generate(**inputs, max_new_tokens=NEW_TOKENS, num_beams=3, do_sample=False)
    logits = model(**inputs, decoder_input_ids=beams).logits
    return {"greedy": greedy.tolist(), "beams": beams.tolist(), "logits": logits}


def main(path: str, out: str, cases_path: str | None = None) -> None:
    import json

    import torch

    model, processor = load(path)
    if cases_path:
        with open(cases_path) as handle:
            torch.save(texts(model, processor, json.load(handle)), out)
    else:
        torch.save(outputs(model, processor), out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[4] if sys.argv[3:4] == ["--texts"] else None)
