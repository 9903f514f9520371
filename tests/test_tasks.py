import pytest

from florence2_serve.common.tasks import (
    FLORENCE_TASKS, SPECS, Input, Task, build_prompt, dequantize, quantize, region_tokens,
)


def test_fourteen_design_tasks_and_region_ocr_are_defined():
    names = {t.value for t in FLORENCE_TASKS}
    for token in ["<CAPTION>", "<DETAILED_CAPTION>", "<MORE_DETAILED_CAPTION>", "<OD>", "<DENSE_REGION_CAPTION>",
                  "<REGION_PROPOSAL>", "<CAPTION_TO_PHRASE_GROUNDING>", "<REFERRING_EXPRESSION_SEGMENTATION>",
                  "<REGION_TO_SEGMENTATION>", "<OPEN_VOCABULARY_DETECTION>", "<REGION_TO_CATEGORY>",
                  "<REGION_TO_DESCRIPTION>", "<OCR>", "<OCR_WITH_REGION>"]:
        assert token in names
    assert set(SPECS) == set(Task)


@pytest.mark.parametrize("value", ["<OD>", "OD", "od", " <od> "])
def test_parse_task_forms(value):
    assert Task.parse(value) is Task.OD


def test_parse_unknown_task_names_choices():
    with pytest.raises(ValueError, match="unknown task 'FOO'.*CAPTION"):
        Task.parse("FOO")


def test_prompts_for_every_task():
    for task in FLORENCE_TASKS:
        spec = SPECS[task]
        if spec.input is Input.TEXT:
            prompt = build_prompt(task, text="a red car")
            assert "a red car" in prompt
        elif spec.input is Input.REGION:
            prompt = build_prompt(task, region=(0, 0, 320, 240), image_size=(640, 480))
            assert "<loc_0><loc_0><loc_500><loc_500>" in prompt
        else:
            assert build_prompt(task) == spec.template
            assert "<" not in build_prompt(task)


def test_region_quantization_matches_florence_bins():
    assert region_tokens((34.24, 160.08, 597.44, 371.76), (640, 480)) == "<loc_53><loc_333><loc_933><loc_774>"
    assert region_tokens((0, 0, 640, 480), (640, 480)) == "<loc_0><loc_0><loc_999><loc_999>"
    assert quantize(639.99, 640) == 999 and dequantize(53, 640) == pytest.approx(34.24)


@pytest.mark.parametrize("task,text,region,message", [
    (Task.CAPTION_TO_PHRASE_GROUNDING, "", None, "needs text"),
    (Task.CAPTION, "hello", None, "takes no text"),
    (Task.REGION_TO_CATEGORY, "", None, "needs a region"),
    (Task.REGION_TO_CATEGORY, "", (1, 2, 3), "4 numbers"),
    (Task.REGION_TO_CATEGORY, "", (10, 10, 5, 20), "empty"),
    (Task.REGION_TO_CATEGORY, "", (0, 0, 700, 20), "outside"),
    (Task.OD, "", (0, 0, 1, 1), "takes no region"),
    (Task.OPEN_VOCABULARY_DETECTION, "a <OD> car", None, "task token"),
])
def test_bad_inputs_are_clear_errors(task, text, region, message):
    with pytest.raises(ValueError, match=message):
        build_prompt(task, text=text, region=region, image_size=(640, 480))
