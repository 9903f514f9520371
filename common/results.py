"""Typed inference results: what a worker produces and the service relays."""

from __future__ import annotations

from dataclasses import dataclass, field


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
        """The same as dataclasses.asdict, written out: it runs once per result on the worker's hot path."""
        return {
            "task": self.task, "image_width": self.image_width, "image_height": self.image_height,
            "raw_text": self.raw_text, "text": self.text,
            "boxes": [{"x1": b.x1, "y1": b.y1, "x2": b.x2, "y2": b.y2, "label": b.label, "score": b.score}
                      for b in self.boxes],
            "polygons": [{"points": list(p.points), "label": p.label} for p in self.polygons],
            "ocr": [{"points": list(q.points), "text": q.text} for q in self.ocr],
            "timings": {"queue_ms": self.timings.queue_ms, "preprocess_ms": self.timings.preprocess_ms,
                        "generate_ms": self.timings.generate_ms, "postprocess_ms": self.timings.postprocess_ms},
            "model_id": self.model_id, "model_revision": self.model_revision, "worker_id": self.worker_id,
            "generated_tokens": self.generated_tokens, "batch_size": self.batch_size,
        }
