"""Florence-2 task prompts: which take text or a region, how their output is parsed.

The prompt templates are the ones Florence-2 was trained with (the same strings its processor
expands task tokens into); building the prompt here keeps native and remote-code models
identical and lets region inputs be given as pixel boxes.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass


class Task(str, enum.Enum):
    CAPTION = "<CAPTION>"
    DETAILED_CAPTION = "<DETAILED_CAPTION>"
    MORE_DETAILED_CAPTION = "<MORE_DETAILED_CAPTION>"
    OD = "<OD>"
    DENSE_REGION_CAPTION = "<DENSE_REGION_CAPTION>"
    REGION_PROPOSAL = "<REGION_PROPOSAL>"
    CAPTION_TO_PHRASE_GROUNDING = "<CAPTION_TO_PHRASE_GROUNDING>"
    REFERRING_EXPRESSION_SEGMENTATION = "<REFERRING_EXPRESSION_SEGMENTATION>"
    REGION_TO_SEGMENTATION = "<REGION_TO_SEGMENTATION>"
    OPEN_VOCABULARY_DETECTION = "<OPEN_VOCABULARY_DETECTION>"
    REGION_TO_CATEGORY = "<REGION_TO_CATEGORY>"
    REGION_TO_DESCRIPTION = "<REGION_TO_DESCRIPTION>"
    REGION_TO_OCR = "<REGION_TO_OCR>"
    OCR = "<OCR>"
    OCR_WITH_REGION = "<OCR_WITH_REGION>"
    # Plain object detection by a YOLOv8 worker.
    DETECT = "DETECT"

    @classmethod
    def parse(cls, value: str) -> "Task":
        """Accept '<OD>', 'OD', 'od' or the enum value; raise ValueError naming the choices."""
        text = value.strip()
        key = text.strip("<>").upper()
        for task in cls:
            if task.name == key or task.value == text:
                return task
        choices = ", ".join(t.name for t in cls)
        raise ValueError(f"unknown task {value!r}; expected one of: {choices}")


class Output(enum.Enum):
    """How generated text turns into typed results."""

    TEXT = "text"
    BOXES = "boxes"  # label<loc>x4 ... (labels may be empty for region proposals)
    PHRASE_BOXES = "phrase_boxes"  # phrase followed by one or more boxes
    POLYGONS = "polygons"  # <loc> pairs, polygons separated by <sep>
    BOXES_OR_POLYGONS = "boxes_or_polygons"
    OCR_QUADS = "ocr_quads"  # text<loc>x8
    DETECTIONS = "detections"  # YOLO: produced directly, no text


class Input(enum.Enum):
    NONE = "none"
    TEXT = "text"
    REGION = "region"


@dataclass(frozen=True)
class TaskSpec:
    task: Task
    template: str
    input: Input
    output: Output


_SPECS = [
    TaskSpec(Task.CAPTION, "What does the image describe?", Input.NONE, Output.TEXT),
    TaskSpec(Task.DETAILED_CAPTION, "Describe in detail what is shown in the image.", Input.NONE, Output.TEXT),
    TaskSpec(Task.MORE_DETAILED_CAPTION, "Describe with a paragraph what is shown in the image.", Input.NONE, Output.TEXT),
    TaskSpec(Task.OD, "Locate the objects with category name in the image.", Input.NONE, Output.BOXES),
    TaskSpec(Task.DENSE_REGION_CAPTION, "Locate the objects in the image, with their descriptions.", Input.NONE, Output.BOXES),
    TaskSpec(Task.REGION_PROPOSAL, "Locate the region proposals in the image.", Input.NONE, Output.BOXES),
    TaskSpec(Task.CAPTION_TO_PHRASE_GROUNDING, "Locate the phrases in the caption: {input}", Input.TEXT, Output.PHRASE_BOXES),
    TaskSpec(Task.REFERRING_EXPRESSION_SEGMENTATION, "Locate {input} in the image with mask", Input.TEXT, Output.POLYGONS),
    TaskSpec(Task.REGION_TO_SEGMENTATION, "What is the polygon mask of region {input}", Input.REGION, Output.POLYGONS),
    TaskSpec(Task.OPEN_VOCABULARY_DETECTION, "Locate {input} in the image.", Input.TEXT, Output.BOXES_OR_POLYGONS),
    TaskSpec(Task.REGION_TO_CATEGORY, "What is the region {input}?", Input.REGION, Output.TEXT),
    TaskSpec(Task.REGION_TO_DESCRIPTION, "What does the region {input} describe?", Input.REGION, Output.TEXT),
    TaskSpec(Task.REGION_TO_OCR, "What text is in the region {input}?", Input.REGION, Output.TEXT),
    TaskSpec(Task.OCR, "What is the text in the image?", Input.NONE, Output.TEXT),
    TaskSpec(Task.OCR_WITH_REGION, "What is the text in the image, with regions?", Input.NONE, Output.OCR_QUADS),
    TaskSpec(Task.DETECT, "", Input.NONE, Output.DETECTIONS),
]
SPECS: dict[Task, TaskSpec] = {spec.task: spec for spec in _SPECS}
FLORENCE_TASKS = [t for t in Task if t is not Task.DETECT]

NUM_BINS = 1000


def quantize(value: float, size: int) -> int:
    """Pixel coordinate -> Florence-2 location bin (floor, clamped to [0, 999])."""
    return int(min(max(math.floor(value / (size / NUM_BINS)), 0), NUM_BINS - 1))


def dequantize(bin_index: int, size: int) -> float:
    """Location bin -> pixel coordinate at the bin centre (kept fractional, unlike transformers)."""
    return (bin_index + 0.5) * size / NUM_BINS


def region_tokens(box: tuple[float, float, float, float], image_size: tuple[int, int]) -> str:
    """A pixel box (x1, y1, x2, y2) on an image of (width, height) -> '<loc_..>' x4."""
    width, height = image_size
    x1, y1, x2, y2 = box
    if not (x2 > x1 and y2 > y1):
        raise ValueError(f"region {list(box)} is empty: need x2 > x1 and y2 > y1")
    if x1 < 0 or y1 < 0 or x2 > width or y2 > height:
        raise ValueError(f"region {list(box)} lies outside the {width}x{height} image")
    bins = [quantize(x1, width), quantize(y1, height), quantize(x2, width), quantize(y2, height)]
    return "".join(f"<loc_{b}>" for b in bins)


def validate_inputs(task: Task, text: str, region: tuple[float, ...] | None) -> None:
    """Check that the task got the input it takes (and nothing it ignores)."""
    spec = SPECS[task]
    if spec.input is Input.TEXT and not text.strip():
        raise ValueError(f"task {task.name} needs text input")
    if spec.input is not Input.TEXT and text.strip():
        raise ValueError(f"task {task.name} takes no text input")
    for other in Task:
        if other.value.startswith("<") and other.value in text:
            raise ValueError(f"text input must not contain a task token ({other.value})")
    if spec.input is Input.REGION:
        if region is None:
            raise ValueError(f"task {task.name} needs a region (x1, y1, x2, y2 in pixels)")
        if len(region) != 4:
            raise ValueError(f"region must have 4 numbers (x1, y1, x2, y2), got {len(region)}")
    elif region is not None:
        raise ValueError(f"task {task.name} takes no region")


def build_prompt(
    task: Task, text: str = "", region: tuple[float, float, float, float] | None = None,
    image_size: tuple[int, int] | None = None,
) -> str:
    """The prompt string fed to the model for one request."""
    validate_inputs(task, text, region)
    spec = SPECS[task]
    if spec.input is Input.TEXT:
        return spec.template.format(input=text.strip())
    if spec.input is Input.REGION:
        if image_size is None:
            raise ValueError("image_size is needed to turn a region into location tokens")
        return spec.template.format(input=region_tokens(tuple(region), image_size))
    return spec.template
