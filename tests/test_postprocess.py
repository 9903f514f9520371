"""Generated text -> typed results, from hand-made raw text for every task family."""

import pytest

from florence2_serve.common.postprocess import parse_generation
from florence2_serve.common.tasks import FLORENCE_TASKS, Task

GOLDEN_OD = (
    "</s><s>car<loc_53><loc_333><loc_933><loc_774>door handle<loc_425><loc_503><loc_474><loc_515>"
    "wheel<loc_709><loc_576><loc_865><loc_772>wheel<loc_150><loc_584><loc_309><loc_773></s>"
)
GOLDEN_BOXES = [[34.24, 160.08, 597.44, 371.76], [272.32, 241.68, 303.68, 247.44],
                [454.08, 276.72, 553.92, 370.80], [96.32, 280.56, 198.08, 371.28]]


def _boxes(result):
    return [b.as_list() for b in result.boxes]


def test_golden_od_keeps_fractions():
    result = parse_generation(Task.OD, GOLDEN_OD, (640, 480))
    assert [b.label for b in result.boxes] == ["car", "door handle", "wheel", "wheel"]
    for got, want in zip(_boxes(result), GOLDEN_BOXES):
        assert got == pytest.approx(want, abs=0.01)
    assert result.image_width == 640 and result.image_height == 480 and result.raw_text == GOLDEN_OD


def test_dense_region_caption_multiword_labels():
    raw = "</s><s>a red car<loc_0><loc_0><loc_999><loc_999>the front wheel<loc_100><loc_500><loc_300><loc_900></s>"
    result = parse_generation(Task.DENSE_REGION_CAPTION, raw, (1000, 2000))
    assert [b.label for b in result.boxes] == ["a red car", "the front wheel"]
    assert _boxes(result)[1] == pytest.approx([100.5, 1001.0, 300.5, 1801.0])


def test_region_proposal_has_empty_labels():
    raw = "</s><s><loc_10><loc_20><loc_30><loc_40><loc_50><loc_60><loc_70><loc_80></s>"
    result = parse_generation(Task.REGION_PROPOSAL, raw, (1000, 1000))
    assert _boxes(result) == [[10.5, 20.5, 30.5, 40.5], [50.5, 60.5, 70.5, 80.5]]
    assert [b.label for b in result.boxes] == ["", ""]


def test_phrase_grounding_phrase_with_several_boxes():
    raw = ("</s><s>A green car<loc_10><loc_10><loc_20><loc_20>wheels<loc_1><loc_2><loc_3><loc_4>"
           "<loc_5><loc_6><loc_7><loc_8></s>")
    result = parse_generation(Task.CAPTION_TO_PHRASE_GROUNDING, raw, (1000, 1000))
    assert [b.label for b in result.boxes] == ["A green car", "wheels", "wheels"]
    assert _boxes(result)[2] == [5.5, 6.5, 7.5, 8.5]


def test_segmentation_polygons_with_separator():
    raw = ("</s><s><loc_0><loc_0><loc_100><loc_0><loc_100><loc_100><sep>"
           "<loc_200><loc_200><loc_300><loc_200><loc_300><loc_300><loc_250></s>")
    result = parse_generation(Task.REFERRING_EXPRESSION_SEGMENTATION, raw, (1000, 500))
    assert len(result.polygons) == 2
    assert result.polygons[0].points == [0.5, 0.25, 100.5, 0.25, 100.5, 50.25]
    assert len(result.polygons[1].points) == 6  # the odd trailing coordinate is dropped


def test_region_to_segmentation_same_parser():
    raw = "</s><s><loc_1><loc_1><loc_2><loc_1><loc_2><loc_2></s>"
    assert len(parse_generation(Task.REGION_TO_SEGMENTATION, raw, (100, 100)).polygons) == 1


def test_open_vocabulary_boxes_or_polygons():
    boxes = parse_generation(Task.OPEN_VOCABULARY_DETECTION, "</s><s>a car<loc_1><loc_2><loc_3><loc_4></s>", (1000, 1000))
    assert [b.label for b in boxes.boxes] == ["a car"] and not boxes.polygons
    raw = "</s><s>a car<poly><loc_1><loc_1><loc_9><loc_1><loc_9><loc_9></poly><poly><loc_5><loc_5><loc_6><loc_5><loc_6><loc_6></poly></s>"
    polys = parse_generation(Task.OPEN_VOCABULARY_DETECTION, raw, (1000, 1000))
    assert [p.label for p in polys.polygons] == ["a car", "a car"] and not polys.boxes


def test_ocr_with_region_quads():
    raw = ("</s><s>STOP<loc_350><loc_460><loc_560><loc_460><loc_560><loc_520><loc_350><loc_520>"
           "Main St<loc_0><loc_0><loc_10><loc_0><loc_10><loc_10><loc_0><loc_10></s>")
    result = parse_generation(Task.OCR_WITH_REGION, raw, (1000, 1000))
    assert [q.text for q in result.ocr] == ["STOP", "Main St"]
    assert result.ocr[0].points == [350.5, 460.5, 560.5, 460.5, 560.5, 520.5, 350.5, 520.5]
    assert result.text == "STOP Main St"


@pytest.mark.parametrize("task", [Task.CAPTION, Task.DETAILED_CAPTION, Task.MORE_DETAILED_CAPTION, Task.OCR])
def test_pure_text_tasks(task):
    result = parse_generation(task, "</s><s>A red car parked on   the street.</s><pad><pad>", (10, 10))
    assert result.text == "A red car parked on the street." and not result.boxes


def test_region_to_category_strips_and_keeps_the_echoed_box():
    result = parse_generation(Task.REGION_TO_CATEGORY, "</s><s>car<loc_53><loc_333><loc_933><loc_774></s>", (640, 480))
    assert result.text == "car"
    assert _boxes(result)[0] == pytest.approx(GOLDEN_BOXES[0], abs=0.01)


@pytest.mark.parametrize("task", FLORENCE_TASKS)
@pytest.mark.parametrize("raw", ["", "</s><s></s>", "garbage <loc_5> <loc_x> <<<>>> <loc_99999><loc_1>", "<poly></poly><sep>",
                                 "car<loc_1><loc_2>", "\x00\xff", "<loc_1>" * 3])
def test_empty_or_garbage_gives_empty_result_never_raises(task, raw):
    result = parse_generation(task, raw, (640, 480))
    assert result.boxes == [] and result.polygons == [] and result.ocr == []
