"""Draw a result onto its input image, legibly on any background; name the drawing without clobbering.

`result` is a Result as client.to_json gives it (coordinates in input-image pixels). Outlines get a
dark halo so they show on objects of their own colour; polygons a translucent fill; labels sit on
a solid plate, placed where they overlap no earlier label and stay inside the image; text results
(captions, OCR) are written in a band at the bottom; a region task shows the region it asked about.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

PALETTE = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
           (240, 50, 230), (210, 245, 60), (0, 128, 128), (170, 110, 40)]
HALO = (0, 0, 0)
FILL_ALPHA = 70


class _Canvas:
    def __init__(self, image: Image.Image):
        self.image = image.convert("RGB").copy()
        self.overlay = Image.new("RGBA", self.image.size, (0, 0, 0, 0))
        self.draw = ImageDraw.Draw(self.image)
        self.fill_draw = ImageDraw.Draw(self.overlay)
        short_side = min(self.image.size)
        self.width = max(2, round(short_side / 160))
        self.font = ImageFont.load_default(size=max(11, round(short_side / 40)))
        self.colors: dict[str, tuple] = {}
        self.labels: list[tuple[float, float, float, float]] = []
        self.pending_labels: list[tuple[float, float, str, tuple]] = []

    def color(self, label: str) -> tuple:
        return self.colors.setdefault(label, PALETTE[len(self.colors) % len(PALETTE)])

    def outline(self, points: list[tuple[float, float]], color: tuple, fill: bool = False) -> None:
        if fill:
            self.fill_draw.polygon(points, fill=(*color, FILL_ALPHA))
        closed = points + points[:1]
        self.draw.line(closed, fill=HALO, width=self.width + 2, joint="curve")
        self.draw.line(closed, fill=color, width=self.width, joint="curve")

    def box(self, x1: float, y1: float, x2: float, y2: float, color: tuple) -> None:
        self.outline([(x1, y1), (x2, y1), (x2, y2), (x1, y2)], color)

    def label(self, x: float, y: float, text: str, color: tuple) -> None:
        """Queued: labels go on top of every shape, after all of them are drawn."""
        if text:
            self.pending_labels.append((x, y, text, color))

    def _place(self, x: float, y: float, w: float, h: float) -> tuple[float, float]:
        width, height = self.image.size
        candidates = [(x, y - h), (x, y)] + [(x, y + k * h) for k in range(1, 40)]
        for cx, cy in candidates:
            cx, cy = min(max(0, cx), max(0, width - w)), min(max(0, cy), max(0, height - h))
            rect = (cx, cy, cx + w, cy + h)
            if not any(r[0] < rect[2] and rect[0] < r[2] and r[1] < rect[3] and rect[1] < r[3] for r in self.labels):
                return cx, cy
        return min(max(0, x), max(0, width - w)), min(max(0, y - h), max(0, height - h))

    def finish(self, band: str = "") -> Image.Image:
        self.image = Image.alpha_composite(self.image.convert("RGBA"), self.overlay).convert("RGB")
        self.draw = ImageDraw.Draw(self.image)
        pad = 3
        for x, y, text, color in self.pending_labels:
            left, top, right, bottom = self.draw.textbbox((0, 0), text, font=self.font)
            w, h = right - left + 2 * pad, bottom - top + 2 * pad
            px, py = self._place(x, y, w, h)
            self.labels.append((px, py, px + w, py + h))
            self.draw.rectangle([px, py, px + w, py + h], fill=color, outline=HALO)
            self.draw.text((px + pad - left, py + pad - top), text, fill=(255, 255, 255), font=self.font,
                           stroke_width=1, stroke_fill=HALO)
        if band:
            self._band(band)
        return self.image

    def _band(self, text: str) -> None:
        """Text results in a band along the bottom, wrapped to the image width."""
        width, height = self.image.size
        char_w = max(1, self.draw.textlength("M", font=self.font))
        lines = textwrap.wrap(" ".join(text.split()), width=max(8, int((width - 12) / char_w * 1.6)))[:12]
        line_h = self.font.size + 4
        band_h = line_h * len(lines) + 8
        plate = Image.new("RGBA", (width, band_h), (0, 0, 0, 170))
        self.image.paste(plate, (0, max(0, height - band_h)), plate)
        for i, line in enumerate(lines):
            self.draw.text((6, max(0, height - band_h) + 4 + i * line_h), line, fill=(255, 255, 255), font=self.font)


def _pairs(points: list[float]) -> list[tuple[float, float]]:
    return list(zip(points[0::2], points[1::2]))


def draw_result(image: Image.Image, result: dict, region: tuple[float, float, float, float] | None = None) -> Image.Image:
    """The drawing of `result` on `image`; `region` is the request's input region, if any."""
    canvas = _Canvas(image)
    if region is not None:  # the region asked about, under what was found in it
        canvas.box(*region, (255, 255, 255))
        canvas.label(region[0], region[1], "region", (90, 90, 90))
    for box in result.get("boxes", []):
        # Drawn normalised (x1 <= x2, y1 <= y2); a box with no area is not drawn (README "Results").
        x1, x2 = sorted((box["x1"], box["x2"]))
        y1, y2 = sorted((box["y1"], box["y2"]))
        if x2 - x1 <= 0 or y2 - y1 <= 0:
            continue
        color = canvas.color(box.get("label", ""))
        canvas.box(x1, y1, x2, y2, color)
        score = box.get("score")
        canvas.label(x1, y1, box.get("label", "") + (f" {score:.2f}" if score is not None else ""), color)
    for polygon in result.get("polygons", []):
        color = canvas.color(polygon.get("label", ""))
        rings = [_pairs(ring["points"]) for ring in polygon.get("rings", [])]
        rings = [points for points in rings if len(points) >= 3]
        for points in rings:
            canvas.outline(points, color, fill=True)
        if rings:
            x, y = min(rings[0], key=lambda p: (p[1], p[0]))
            canvas.label(x, y, polygon.get("label", ""), color)
    for quad in result.get("ocr", []):
        points = _pairs(quad["points"])
        color = canvas.color("ocr")
        canvas.outline(points, color)
        canvas.label(points[0][0], points[0][1], quad.get("text", "").strip(), color)
    found = result.get("boxes") or result.get("polygons") or result.get("ocr")
    band = result.get("text", "") if not result.get("ocr") else ""
    if not band and not found:
        band = "no result"
    return canvas.finish(band)


def drawing_path(out_dir: Path, relative: Path, task: str, overwrite: bool = False) -> tuple[Path, bool]:
    """(where to save, whether that keeps an existing file): out_dir / the input's relative path with
    the task added (`sub/img000.jpg.od.png`). Without `overwrite` an existing file is kept and the
    drawing goes beside it (`….od-2.png`)."""
    base = out_dir / relative.parent / f"{relative.name}.{task.lower()}"
    target = base.with_name(base.name + ".png")
    if overwrite or not target.exists():
        return target, False
    n = 2
    while (candidate := base.with_name(f"{base.name}-{n}.png")).exists():
        n += 1
    return candidate, True


def save_drawing(image: Image.Image, result: dict, target: Path,
                 region: tuple[float, float, float, float] | None = None) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    draw_result(image, result, region).save(target)
    return target
