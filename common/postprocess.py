"""Generated Florence-2 text -> typed results.

Coordinates are dequantized to the centre of their location bin and kept fractional (transformers'
own post-processor truncates them to integers). Garbage or empty text yields an empty result;
parsing never raises.
"""

from __future__ import annotations

import re

from .results import Box, OcrQuad, Polygon, TaskResult
from .tasks import NUM_BINS, SPECS, Output, Task, dequantize

_WRAPPERS = re.compile(r"</?s>|<pad>|<unk>")
_LOC = re.compile(r"<loc_(\d+)>")
# A phrase (possibly empty) followed by a run of location tokens.
_PHRASE_WITH_LOCS = re.compile(r"([^<]*)((?:<loc_\d+>)+)")
_PHRASE_WITH_SHAPES = re.compile(r"([^<]*)((?:<loc_\d+>|<sep>|<poly>|</poly>)+)")
_OCR_ITEM = re.compile(r"([^<]+?)((?:<loc_\d+>){8})")
_POLY = re.compile(r"<poly>(.*?)</poly>")
_OTHER_TAGS = re.compile(r"</?(?:od|ground|obj|box|bbox|cap|ocr|region)>")


def clean_text(raw_text: str) -> str:
    return _WRAPPERS.sub("", raw_text)


def _bins(locs: str) -> list[int]:
    return [int(v) for v in _LOC.findall(locs) if int(v) < NUM_BINS]


def _label(text: str) -> str:
    return " ".join(text.split())


def _points(bins: list[int], width: int, height: int) -> list[float]:
    return [
        round(dequantize(b, width if i % 2 == 0 else height), 4) for i, b in enumerate(bins)
    ]


def parse_boxes(text: str, width: int, height: int, need_label: bool) -> list[Box]:
    boxes = []
    for phrase, locs in _PHRASE_WITH_LOCS.findall(_OTHER_TAGS.sub("", text)):
        label = _label(phrase)
        if need_label and not label:
            continue
        bins = _bins(locs)
        for i in range(0, len(bins) - 3, 4):
            x1, y1, x2, y2 = _points(bins[i : i + 4], width, height)
            boxes.append(Box(x1, y1, x2, y2, label=label))
    return boxes


def _polygon_groups(body: str) -> list[str]:
    if "<poly>" in body:
        return _POLY.findall(body)
    return body.split("<sep>")


def parse_polygons(text: str, width: int, height: int) -> list[Polygon]:
    polygons = []
    for phrase, body in _PHRASE_WITH_SHAPES.findall(_OTHER_TAGS.sub("", text)):
        label = _label(phrase)
        for group in _polygon_groups(body):
            bins = _bins(group)
            if len(bins) % 2:
                bins = bins[:-1]
            if len(bins) >= 6:  # fewer than three points is no polygon
                polygons.append(Polygon(_points(bins, width, height), label=label))
    return polygons


def parse_ocr(text: str, width: int, height: int) -> list[OcrQuad]:
    return [
        OcrQuad(_points(_bins(locs), width, height), text=_label(content))
        for content, locs in _OCR_ITEM.findall(text)
        if len(_bins(locs)) == 8
    ]


def parse_generation(task: Task | str, raw_text: str, image_size: tuple[int, int]) -> TaskResult:
    """Parse one generated sequence for `task` on an image of (width, height)."""
    task = task if isinstance(task, Task) else Task.parse(task)
    width, height = image_size
    result = TaskResult(task=task.value, image_width=width, image_height=height, raw_text=raw_text)
    text = clean_text(raw_text or "")
    output = SPECS[task].output
    try:
        if output is Output.TEXT:
            # Region tasks may echo the region as location tokens: keep them as a box.
            result.boxes = parse_boxes(text, width, height, need_label=False)
            result.text = _label(_LOC.sub("", text))
        elif output in (Output.BOXES, Output.PHRASE_BOXES):
            need_label = task is not Task.REGION_PROPOSAL
            result.boxes = parse_boxes(text, width, height, need_label=need_label)
        elif output is Output.POLYGONS:
            result.polygons = parse_polygons(text, width, height)
        elif output is Output.BOXES_OR_POLYGONS:
            if "<poly>" in text:
                result.polygons = parse_polygons(text, width, height)
            else:
                result.boxes = parse_boxes(text, width, height, need_label=True)
        elif output is Output.OCR_QUADS:
            result.ocr = parse_ocr(text, width, height)
            result.text = " ".join(q.text for q in result.ocr)
    except (ValueError, IndexError):  # pragma: no cover - regexes above bound the shapes
        pass
    return result
