"""Generated text -> typed results, from hand-made raw text for every task family.

Expected values follow the rules of Microsoft's processing_florence2.py (the reference), except where
the README's "Differences from the reference" says otherwise (marked `differs` here).
"""

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
    return [[b.x1, b.y1, b.x2, b.y2] for b in result.boxes]


def _rings(polygon):
    return [list(ring.points) for ring in polygon.rings]


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


def test_segmentation_separator_gives_rings_of_one_object():
    raw = ("</s><s><loc_0><loc_0><loc_100><loc_0><loc_100><loc_100><sep>"
           "<loc_200><loc_200><loc_300><loc_200><loc_300><loc_300><loc_250></s>")
    result = parse_generation(Task.REFERRING_EXPRESSION_SEGMENTATION, raw, (1000, 500))
    assert len(result.polygons) == 1  # one object in two parts
    rings = _rings(result.polygons[0])
    assert rings[0] == [0.5, 0.25, 100.5, 0.25, 100.5, 50.25]
    assert len(rings[1]) == 6  # the odd trailing coordinate is dropped
    assert result.polygons[0].label == ""  # the reference labels segmentation results ""


def test_region_to_segmentation_same_parser():
    raw = "</s><s><loc_1><loc_1><loc_2><loc_1><loc_2><loc_2></s>"
    result = parse_generation(Task.REGION_TO_SEGMENTATION, raw, (100, 100))
    assert len(result.polygons) == 1 and len(result.polygons[0].rings) == 1


def test_polygon_of_fewer_than_three_points_is_dropped():  # differs: the reference keeps it
    raw = "</s><s><loc_1><loc_1><loc_2><loc_2><sep><loc_1><loc_1><loc_9><loc_1><loc_9><loc_9></s>"
    result = parse_generation(Task.REFERRING_EXPRESSION_SEGMENTATION, raw, (1000, 1000))
    assert [len(ring.points) for ring in result.polygons[0].rings] == [6]
    only_short = "</s><s><loc_1><loc_1><loc_2><loc_2></s>"
    assert len(parse_generation(Task.REFERRING_EXPRESSION_SEGMENTATION, only_short, (1000, 1000)).polygons) == 0


def test_open_vocabulary_boxes_or_polygons():
    boxes = parse_generation(Task.OPEN_VOCABULARY_DETECTION, "</s><s>a car<loc_1><loc_2><loc_3><loc_4></s>", (1000, 1000))
    assert [b.label for b in boxes.boxes] == ["a car"] and not boxes.polygons
    raw = "</s><s>a car<poly><loc_1><loc_1><loc_9><loc_1><loc_9><loc_9></poly><poly><loc_5><loc_5><loc_6><loc_5><loc_6><loc_6></poly></s>"
    polys = parse_generation(Task.OPEN_VOCABULARY_DETECTION, raw, (1000, 1000))
    assert [p.label for p in polys.polygons] == ["a car", "a car"] and not polys.boxes
    assert [len(p.rings) for p in polys.polygons] == [1, 1]


def test_open_vocabulary_sep_inside_a_poly_group_is_two_rings_of_one_object():
    raw = ("</s><s>a car<poly><loc_1><loc_1><loc_9><loc_1><loc_9><loc_9><sep>"
           "<loc_20><loc_20><loc_30><loc_20><loc_30><loc_30></poly></s>")
    result = parse_generation(Task.OPEN_VOCABULARY_DETECTION, raw, (1000, 1000))
    assert len(result.polygons) == 1 and result.polygons[0].label == "a car"
    assert _rings(result.polygons[0]) == [[1.5, 1.5, 9.5, 1.5, 9.5, 9.5], [20.5, 20.5, 30.5, 20.5, 30.5, 30.5]]


def test_unclosed_poly_group_of_a_truncated_generation_is_dropped():
    raw = ("</s><s>a car<poly><loc_1><loc_1><loc_9><loc_1><loc_9><loc_9></poly>"
           "<poly><loc_50><loc_50><loc_60><loc_50><loc_60>")  # max_new_tokens ran out here
    result = parse_generation(Task.OPEN_VOCABULARY_DETECTION, raw, (1000, 1000))
    assert len(result.polygons) == 1 and _rings(result.polygons[0]) == [[1.5, 1.5, 9.5, 1.5, 9.5, 9.5]]


def test_plain_box_inside_a_polygon_answer_stays_a_box():  # differs: the reference makes it a 2-point polygon
    raw = "</s><s>a car<poly><loc_1><loc_1><loc_9><loc_1><loc_9><loc_9></poly>a dog<loc_10><loc_20><loc_30><loc_40></s>"
    result = parse_generation(Task.OPEN_VOCABULARY_DETECTION, raw, (1000, 1000))
    assert [p.label for p in result.polygons] == ["a car"]
    assert [b.label for b in result.boxes] == ["a dog"] and _boxes(result) == [[10.5, 20.5, 30.5, 40.5]]


def test_phrase_grounding_drops_the_references_non_grounding_phrases():
    raw = ("</s><s>them<loc_1><loc_1><loc_2><loc_2>a<loc_3><loc_3><loc_4><loc_4>A man<loc_5><loc_5><loc_6><loc_6>"
           " the image <loc_7><loc_7><loc_8><loc_8>it<loc_9><loc_9><loc_10><loc_10>dog<loc_11><loc_11><loc_12><loc_12></s>")
    result = parse_generation(Task.CAPTION_TO_PHRASE_GROUNDING, raw, (1000, 1000))
    assert [b.label for b in result.boxes] == ["A man", "dog"]


def test_non_grounding_phrases_are_only_dropped_for_grounding():
    raw = "</s><s>them<loc_1><loc_1><loc_2><loc_2></s>"
    assert [b.label for b in parse_generation(Task.OD, raw, (1000, 1000)).boxes] == ["them"]


def test_whitespace_only_phrase_keeps_its_box_with_an_empty_label():
    raw = "</s><s>car<loc_1><loc_1><loc_2><loc_2> <loc_3><loc_3><loc_4><loc_4></s>"
    for task in (Task.OD, Task.CAPTION_TO_PHRASE_GROUNDING):
        assert [b.label for b in parse_generation(task, raw, (1000, 1000)).boxes] == ["car", ""]


def test_a_run_of_six_location_tokens_gives_one_box():
    raw = "</s><s>car<loc_1><loc_2><loc_3><loc_4><loc_5><loc_6>dog<loc_7><loc_8><loc_9><loc_10></s>"
    result = parse_generation(Task.OD, raw, (1000, 1000))
    assert [b.label for b in result.boxes] == ["car", "dog"]


def test_non_ascii_labels_are_kept():  # differs: the reference drops non-ASCII characters from labels
    raw = "</s><s>café<loc_1><loc_1><loc_2><loc_2></s>"
    assert [b.label for b in parse_generation(Task.OD, raw, (1000, 1000)).boxes] == ["café"]


def test_stray_text_in_region_proposal_is_ignored():
    raw = "</s><s>hello<loc_10><loc_20><loc_30><loc_40>world<loc_50><loc_60><loc_70><loc_80></s>"
    result = parse_generation(Task.REGION_PROPOSAL, raw, (1000, 1000))
    assert [b.label for b in result.boxes] == ["", ""] and len(result.boxes) == 2


def test_ocr_with_region_quads():
    raw = ("</s><s>STOP<loc_350><loc_460><loc_560><loc_460><loc_560><loc_520><loc_350><loc_520>"
           "Main St<loc_0><loc_0><loc_10><loc_0><loc_10><loc_10><loc_0><loc_10></s>")
    result = parse_generation(Task.OCR_WITH_REGION, raw, (1000, 1000))
    assert [q.text for q in result.ocr] == ["STOP", "Main St"]  # differs: no "</s>" glued to the first
    assert list(result.ocr[0].points) == [350.5, 460.5, 560.5, 460.5, 560.5, 520.5, 350.5, 520.5]
    assert result.text == "STOP\nMain St"


QUAD = "<loc_1><loc_1><loc_9><loc_1><loc_9><loc_9><loc_1><loc_9>"


def test_ocr_text_keeps_angle_brackets_and_inner_spacing():
    raw = f"</s><s>if a<b{QUAD}Total:  $12.50{QUAD}</s>"
    result = parse_generation(Task.OCR_WITH_REGION, raw, (1000, 1000))
    assert [q.text for q in result.ocr] == ["if a<b", "Total:  $12.50"]


def test_ocr_location_run_longer_than_a_quad_leaves_no_fragment():  # differs: the reference glues the extra token on
    raw = f"</s><s>first{QUAD}<loc_41>second{QUAD}</s>"
    result = parse_generation(Task.OCR_WITH_REGION, raw, (1000, 1000))
    assert [q.text for q in result.ocr] == ["first", "second"]


def test_ocr_text_before_a_run_too_short_for_a_quad_carries_over():
    raw = f"</s><s>part one<loc_5><loc_6> part two{QUAD}</s>"
    assert [q.text for q in parse_generation(Task.OCR_WITH_REGION, raw, (1000, 1000)).ocr] == ["part one part two"]


def test_pure_ocr_keeps_inner_spacing():
    result = parse_generation(Task.OCR, "</s><s>Total:  $12.50\nif a<b</s>", (10, 10))
    assert result.text == "Total:  $12.50\nif a<b"


@pytest.mark.parametrize("task", [Task.CAPTION, Task.DETAILED_CAPTION, Task.MORE_DETAILED_CAPTION, Task.OCR])
def test_pure_text_tasks(task):
    result = parse_generation(task, "</s><s> A red car parked on   the street.</s><pad><pad>", (10, 10))
    assert result.text == "A red car parked on   the street." and not result.boxes  # inner spacing kept


def test_region_to_category_strips_and_keeps_the_echoed_box():
    result = parse_generation(Task.REGION_TO_CATEGORY, "</s><s>car<loc_53><loc_333><loc_933><loc_774></s>", (640, 480))
    assert result.text == "car"
    assert _boxes(result)[0] == pytest.approx(GOLDEN_BOXES[0], abs=0.01)


@pytest.mark.parametrize("task", FLORENCE_TASKS)
@pytest.mark.parametrize("raw", ["", "</s><s></s>", "garbage <loc_5> <loc_x> <<<>>> <loc_99999><loc_1>", "<poly></poly><sep>",
                                 "car<loc_1><loc_2>", "\x00\xff", "<loc_1>" * 3])
def test_empty_or_garbage_gives_empty_result_never_raises(task, raw):
    result = parse_generation(task, raw, (640, 480))
    assert len(result.boxes) == 0 and len(result.polygons) == 0 and len(result.ocr) == 0
