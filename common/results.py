"""Typed inference results: what a worker produces and the service relays."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class Box:
    x1: float
    y1: float
    x2: float
    y2: float
    label: str = ""
    score: float | None = None

    def as_list(self) -> list[float]:
        return [self.x1, self.y1, self.x2, self.y2]


@dataclass
class Polygon:
    points: list[float]  # x0, y0, x1, y1, ... in input-image pixels
    label: str = ""


@dataclass
class OcrQuad:
    points: list[float]  # 8 numbers: four corners, x then y
    text: str = ""


@dataclass
class Timings:
    queue_ms: float = 0.0
    preprocess_ms: float = 0.0
    generate_ms: float = 0.0
    postprocess_ms: float = 0.0


@dataclass
class TaskResult:
    task: str
    image_width: int
    image_height: int
    raw_text: str = ""
    text: str = ""
    boxes: list[Box] = field(default_factory=list)
    polygons: list[Polygon] = field(default_factory=list)
    ocr: list[OcrQuad] = field(default_factory=list)
    timings: Timings = field(default_factory=Timings)
    model_id: str = ""
    model_revision: str = ""
    worker_id: str = ""
    generated_tokens: int = 0
    batch_size: int = 1

    def to_dict(self) -> dict:
        return asdict(self)
