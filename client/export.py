"""`detect --format csv|coco`: results in the shapes evaluation tools read.

csv: one row per box, polygon or OCR quad (a text result is one row with its text; a failed image one row
of kind `error`), streamed as results arrive. coco: one COCO-style document written at the end: `images`
(id, file_name, width, height), `categories` (from the labels, numbered by first appearance) and
`annotations` (bbox as [x, y, width, height], area, segmentation for polygons, score where the model gave
one, iscrowd 0). Coordinates are the results' own, in input-image pixels, at float32's precision.
"""

from __future__ import annotations

import csv
import io
import json

CSV_COLUMNS = ("image", "job_id", "task", "kind", "label", "score", "x1", "y1", "x2", "y2", "points", "text")


def _points(values) -> str:
    return " ".join(f"{v:g}" for v in values)


class CsvRows:
    """CSV lines for each outcome; the header first."""

    def header(self) -> str:
        return self._line(CSV_COLUMNS)

    def lines(self, image: str, job_id: str, task: str, result: dict | None, error: str = "") -> list[str]:
        base = {"image": image, "job_id": job_id, "task": task}
        if result is None:
            return [self._row({**base, "kind": "error", "text": error})]
        rows = []
        for box in result.get("boxes", []):
            rows.append({**base, "kind": "box", "label": box.get("label", ""), "score": box.get("score", ""),
                         **{k: box[k] for k in ("x1", "y1", "x2", "y2")}})
        for polygon in result.get("polygons", []):
            for ring in polygon.get("rings", []):
                rows.append({**base, "kind": "polygon", "label": polygon.get("label", ""),
                             "points": _points(ring["points"])})
        for quad in result.get("ocr", []):
            rows.append({**base, "kind": "ocr", "text": quad.get("text", ""), "points": _points(quad["points"])})
        if result.get("text") or not rows:
            rows.append({**base, "kind": "text", "text": result.get("text", "")})
        return [self._row(row) for row in rows]

    def _row(self, row: dict) -> str:
        return self._line([row.get(column, "") for column in CSV_COLUMNS])

    @staticmethod
    def _line(values) -> str:
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="").writerow(values)
        return buffer.getvalue()


class CocoDocument:
    """Collects results; `document()` is the COCO-style JSON of them all."""

    def __init__(self):
        self.images: list[dict] = []
        self.annotations: list[dict] = []
        self.categories: dict[str, int] = {}

    def add(self, image: str, result: dict) -> None:
        image_id = len(self.images) + 1
        self.images.append({"id": image_id, "file_name": image, "width": result.get("image_width", 0),
                            "height": result.get("image_height", 0)})
        for box in result.get("boxes", []):
            x1, x2 = sorted((box["x1"], box["x2"]))
            y1, y2 = sorted((box["y1"], box["y2"]))
            self._annotate(image_id, box.get("label", ""), [x1, y1, x2 - x1, y2 - y1], (x2 - x1) * (y2 - y1),
                           score=box.get("score"))
        for polygon in result.get("polygons", []):
            rings = [ring["points"] for ring in polygon.get("rings", []) if len(ring["points"]) >= 6]
            if not rings:
                continue
            xs = [x for ring in rings for x in ring[0::2]]
            ys = [y for ring in rings for y in ring[1::2]]
            bbox = [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]
            self._annotate(image_id, polygon.get("label", ""), bbox, sum(_shoelace(ring) for ring in rings),
                           segmentation=rings)

    def _annotate(self, image_id: int, label: str, bbox: list, area: float, score=None, segmentation=None) -> None:
        category = self.categories.setdefault(label, len(self.categories) + 1)
        annotation = {"id": len(self.annotations) + 1, "image_id": image_id, "category_id": category,
                      "bbox": [round(v, 3) for v in bbox], "area": round(area, 3), "iscrowd": 0}
        if segmentation is not None:
            annotation["segmentation"] = segmentation
        if score is not None:
            annotation["score"] = score
        self.annotations.append(annotation)

    def document(self) -> str:
        categories = [{"id": number, "name": name} for name, number in self.categories.items()]
        return json.dumps({"images": self.images, "annotations": self.annotations, "categories": categories},
                          ensure_ascii=False)


def _shoelace(points: list[float]) -> float:
    xs, ys = points[0::2], points[1::2]
    return abs(sum(xs[i] * ys[i - 1] - xs[i - 1] * ys[i] for i in range(len(xs)))) / 2
