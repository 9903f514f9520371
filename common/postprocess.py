"""Generated Florence-2 text -> the proto's typed Result, by the rules of Microsoft's post-processor.

Microsoft's `processing_florence2.py` (the remote code users know) is the reference: which text
becomes a phrase, which location tokens become a box, a polygon ring or an OCR quad, and which
grounding phrases are dropped. Where this module deliberately differs, the README's "Differences
from the reference" lists it; each difference is marked `(differs)` below.

Coordinates are dequantized to the centre of their location bin and kept fractional, as the
reference does (transformers' port truncates them to integers). Garbage or empty text yields an
empty result; parsing never raises.
"""

from __future__ import annotations

import re

from florence2_serve.v1 import florence2_pb2 as pb

from .proto_enums import task_to_proto
from .tasks import NUM_BINS, SPECS, Output, Task, dequantize

# The reference removes these before parsing; `<pad>` in captions too (differs: it keeps them there).
_WRAPPERS = re.compile(r"</?s>|<pad>")
_LOC = re.compile(r"<loc_(\d+)>")
_QUAD = re.compile(r"<loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)>")
# A phrase (at least one character, no '<') and the run of >= 4 location tokens after it.
_PHRASE_BOXES = re.compile(r"([^<]+)((?:<loc_\d+>){4,})")
# The same with the phrase optional: region tasks echo their region, with or without a label.
_OPTIONAL_PHRASE_BOXES = re.compile(r"([^<]*)((?:<loc_\d+>){4,})")
_BOX_RUN = re.compile(r"(?:<loc_\d+>){4,}")
_SHAPE_TOKEN = r"(?:<loc_\d+>|<sep>|<poly>|</poly>)"
_PHRASE_SHAPES = re.compile(rf"([^<]+)({_SHAPE_TOKEN}{{4,}})")
_SHAPE_RUN = re.compile(rf"{_SHAPE_TOKEN}{{4,}}")
_POLY_GROUP = re.compile(r"<poly>(.*?)</poly>")
# A ring: a run of location tokens ended by <sep> or by the end of its group.
_RING = re.compile(r"((?:<loc_\d+>)+)(?:<sep>|$)")
_LOC_RUN = re.compile(r"((?:<loc_\d+>)+)")

# Phrases the reference's grounding post-processor drops (pronouns and other non-grounding
# phrases), compared after stripping surrounding whitespace, case-sensitively.
NON_GROUNDING_PHRASES = frozenset({
    "it", "I", "me", "mine", "you", "your", "yours", "he", "him", "his", "she", "her", "hers", "they",
    "them", "their", "theirs", "one", "oneself", "we", "us", "our", "ours", "its", "myself", "yourself",
    "himself", "herself", "itself", "ourselves", "yourselves", "themselves", "this", "that", "these",
    "those", "who", "whom", "whose", "which", "what", "all", "another", "any", "anybody", "anyone",
    "anything", "each", "everybody", "everyone", "everything", "few", "many", "nobody", "none", "several",
    "some", "somebody", "someone", "something", "each other", "one another", "the image", "image", "images",
    "the", "a", "an", "a group", "other objects", "lots", "a set",
})
QUAD_BINS = 8


def clean_text(raw_text: str) -> str:
    return _WRAPPERS.sub("", raw_text)


def _bins(locs: str) -> list[int]:
    return [int(v) for v in _LOC.findall(locs) if int(v) < NUM_BINS]


def _points(bins: list[int], width: int, height: int) -> list[float]:
    return [round(dequantize(b, width if i % 2 == 0 else height), 4) for i, b in enumerate(bins)]


def _boxes_of_run(run: str, label: str, width: int, height: int) -> list[pb.Box]:
    """Every complete group of four location tokens in `run` (a remainder of 1-3 is dropped)."""
    boxes = []
    for match in _QUAD.finditer(run):
        bins = [int(v) for v in match.groups()]
        if max(bins) >= NUM_BINS:
            continue
        x1, y1, x2, y2 = _points(bins, width, height)
        boxes.append(pb.Box(x1=x1, y1=y1, x2=x2, y2=y2, label=label))
    return boxes


def parse_boxes(text: str, width: int, height: int, *, drop_non_grounding: bool = False) -> list[pb.Box]:
    """OD, DENSE_REGION_CAPTION, CAPTION_TO_PHRASE_GROUNDING: a phrase, then one or more boxes.

    A phrase of only whitespace gives boxes labelled "" (as the reference does); a run of location
    tokens with no text at all before it is no phrase and gives nothing.
    """
    boxes = []
    for phrase, run in _PHRASE_BOXES.findall(text):
        label = phrase.strip()
        if drop_non_grounding and label in NON_GROUNDING_PHRASES:
            continue
        boxes.extend(_boxes_of_run(run, label, width, height))
    return boxes


def parse_region_proposals(text: str, width: int, height: int) -> list[pb.Box]:
    """REGION_PROPOSAL: every run of location tokens; any text between them is ignored (labels "")."""
    return [box for run in _BOX_RUN.findall(text) for box in _boxes_of_run(run, "", width, height)]


def _ring(bins: list[int], width: int, height: int) -> pb.Ring | None:
    if len(bins) % 2:
        bins = bins[:-1]
    if len(bins) < 6:  # (differs) fewer than three points encloses nothing: dropped
        return None
    return pb.Ring(points=_points(bins, width, height))


def _instance(group: str, label: str, width: int, height: int) -> pb.Polygon | None:
    rings = [ring for locs in _RING.findall(group) if (ring := _ring(_bins(locs), width, height)) is not None]
    return pb.Polygon(label=label, rings=rings) if rings else None


def _shape_instances(run: str, label: str, width: int, height: int, result: pb.Result, *, boxes_apart: bool) -> None:
    """One phrase's shapes: one instance per closed <poly>...</poly> group (a group's <sep> parts are
    its rings), or the whole run as one instance when it has no complete group. An unclosed group at
    the end (a truncated generation) is dropped, as the reference drops it."""
    if "<poly>" in run and "</poly>" in run:
        groups = _POLY_GROUP.findall(run)
    elif boxes_apart and "<poly>" not in run and "<sep>" not in run and len(_bins(run)) == 4:
        # (differs) a plain box inside a polygon answer stays a box, not a two-point "polygon"
        result.boxes.extend(_boxes_of_run(run, label, width, height))
        return
    else:
        groups = [run]
    for group in groups:
        instance = _instance(group, label, width, height)
        if instance is not None:
            result.polygons.append(instance)


def parse_polygons(text: str, width: int, height: int, result: pb.Result, *, with_phrases: bool) -> None:
    """REFERRING_EXPRESSION_SEGMENTATION and REGION_TO_SEGMENTATION (`with_phrases=False`: labels "",
    text between shapes ignored, as the reference does) and OPEN_VOCABULARY_DETECTION's polygon
    answers (`with_phrases=True`: each phrase labels the instances after it)."""
    if with_phrases:
        for phrase, run in _PHRASE_SHAPES.findall(text):
            _shape_instances(run, phrase.strip(), width, height, result, boxes_apart=True)
    else:
        for run in _SHAPE_RUN.findall(text):
            _shape_instances(run, "", width, height, result, boxes_apart=False)


def parse_ocr(text: str, width: int, height: int) -> list[pb.OcrQuad]:
    """OCR_WITH_REGION: text, then eight location tokens (a quad), repeated.

    The text keeps every character the model produced, '<' and inner spacing included. Location
    tokens past a quad's eight are dropped (differs: the reference glues them to the next text); text
    before a run too short for a quad carries over to the next quad, as in the reference.
    """
    quads = []
    pending = ""
    pieces = _LOC_RUN.split(text)
    for i in range(0, len(pieces) - 1, 2):
        pending += pieces[i]
        bins = _bins(pieces[i + 1])
        if len(bins) < QUAD_BINS:
            continue
        quads.append(pb.OcrQuad(points=_points(bins[:QUAD_BINS], width, height), text=pending))
        pending = ""
    return quads


def parse_generation(task: Task | str, raw_text: str, image_size: tuple[int, int]) -> pb.Result:
    """Parse one generated sequence for `task` on an image of (width, height)."""
    task = task if isinstance(task, Task) else Task.parse(task)
    width, height = image_size
    result = pb.Result(task=task_to_proto(task), image_width=width, image_height=height, raw_text=raw_text or "")
    text = clean_text(raw_text or "")
    output = SPECS[task].output
    if output is Output.TEXT:
        # (differs) a region task's echoed region is kept as a box and left out of the text
        for phrase, run in _OPTIONAL_PHRASE_BOXES.findall(text):
            result.boxes.extend(_boxes_of_run(run, phrase.strip(), width, height))
        result.text = _LOC.sub("", text).strip()
    elif output is Output.BOXES:
        if task is Task.REGION_PROPOSAL:
            result.boxes.extend(parse_region_proposals(text, width, height))
        else:
            result.boxes.extend(parse_boxes(text, width, height))
    elif output is Output.PHRASE_BOXES:
        result.boxes.extend(parse_boxes(text, width, height, drop_non_grounding=True))
    elif output is Output.POLYGONS:
        parse_polygons(text, width, height, result, with_phrases=False)
    elif output is Output.BOXES_OR_POLYGONS:
        if "<poly>" in text:
            parse_polygons(text, width, height, result, with_phrases=True)
        else:
            result.boxes.extend(parse_boxes(text, width, height))
    elif output is Output.OCR_QUADS:
        result.ocr.extend(parse_ocr(text, width, height))
        result.text = "\n".join(quad.text.strip() for quad in result.ocr)
    return result
