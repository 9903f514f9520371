"""Draw typed results (boxes, polygons, OCR quads, labels) onto the input image."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

PALETTE = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
           (240, 50, 230), (210, 245, 60), (0, 128, 128), (170, 110, 40)]


def draw_result(image: Image.Image, result: dict) -> Image.Image:
    """`result` as from client.result_to_dict; coordinates are input-image pixels."""
    canvas = image.convert("RGB").copy()
    draw = ImageDraw.Draw(canvas)
    width = max(2, round(min(canvas.size) / 200))
    colors: dict[str, tuple] = {}

    def color(label: str):
        return colors.setdefault(label, PALETTE[len(colors) % len(PALETTE)])

    def label_at(x: float, y: float, text: str, fill) -> None:
        if not text:
            return
        left, top, right, bottom = draw.textbbox((x, y), text)
        top_y = max(0, y - (bottom - top) - 4)
        draw.rectangle([x, top_y, x + (right - left) + 4, top_y + (bottom - top) + 4], fill=fill)
        draw.text((x + 2, top_y + 1), text, fill=(255, 255, 255))

    for box in result.get("boxes", []):
        fill = color(box.get("label", ""))
        draw.rectangle([box["x1"], box["y1"], box["x2"], box["y2"]], outline=fill, width=width)
        text = box.get("label", "") + (f" {box['score']:.2f}" if box.get("score") is not None else "")
        label_at(box["x1"], box["y1"], text, fill)
    for polygon in result.get("polygons", []):
        fill = color(polygon.get("label", ""))
        rings = [list(zip(ring["points"][0::2], ring["points"][1::2])) for ring in polygon.get("rings", [])]
        rings = [points for points in rings if len(points) >= 3]
        for points in rings:
            draw.polygon(points, outline=fill, width=width)
        if rings:
            label_at(rings[0][0][0], rings[0][0][1], polygon.get("label", ""), fill)
    for quad in result.get("ocr", []):
        points = list(zip(quad["points"][0::2], quad["points"][1::2]))
        fill = color("ocr")
        draw.polygon(points, outline=fill, width=width)
        label_at(points[0][0], points[0][1], quad.get("text", ""), fill)
    return canvas


def save_drawing(image: Image.Image, result: dict, out_dir: Path, source: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"{source.stem}.png"
    draw_result(image, result).save(target)
    return target
