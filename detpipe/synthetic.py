"""Generate the default dataset: seeded shapes on textured backgrounds, saved in VIA polygon JSON.

The output mirrors the balloon set's layout (``train/`` and ``val/`` folders, each with JPEGs and a
``via_region_data.json``) so the default dataset goes through the same converter as a real one.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

CLASSES = ("circle", "square", "triangle", "cross")
MORE_CLASSES = ("star", "hexagon", "diamond", "pentagon")  # for a second dataset with other classes


def _polygon(kind: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """Vertices of a shape of circumradius ``r`` centred at (cx, cy), rotated by ``angle``."""
    if kind == "circle":
        pts = [(math.cos(t), math.sin(t)) for t in np.linspace(0, 2 * math.pi, 24, endpoint=False)]
    elif kind == "square":
        pts = [(math.cos(t), math.sin(t)) for t in np.arange(4) * math.pi / 2 + math.pi / 4]
    elif kind == "triangle":
        pts = [(math.cos(t), math.sin(t)) for t in np.arange(3) * 2 * math.pi / 3 - math.pi / 2]
    elif kind == "cross":
        a, b = 1.0, 0.35
        pts = [(b, a), (b, b), (a, b), (a, -b), (b, -b), (b, -a),
               (-b, -a), (-b, -b), (-a, -b), (-a, b), (-b, b), (-b, a)]
        pts = [(x / math.hypot(a, b), y / math.hypot(a, b)) for x, y in pts]
    # Kinds for other datasets than the default (e.g. shapes_b); the default's four above stay as they were.
    elif kind == "star":  # five points, inner radius 0.45
        pts = [(rad * math.cos(t), rad * math.sin(t))
               for rad, t in zip([1.0, 0.45] * 5, np.arange(10) * math.pi / 5 - math.pi / 2)]
    elif kind == "hexagon":
        pts = [(math.cos(t), math.sin(t)) for t in np.arange(6) * math.pi / 3]
    elif kind == "diamond":  # a rhombus, 0.6 as wide as it is tall: not a rotated square
        pts = [(0.0, -1.0), (0.6, 0.0), (0.0, 1.0), (-0.6, 0.0)]
    elif kind == "pentagon":
        pts = [(math.cos(t), math.sin(t)) for t in np.arange(5) * 2 * math.pi / 5 - math.pi / 2]
    else:
        raise ValueError(f"unknown shape {kind!r}")
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in pts]


def _background(rng: np.random.Generator, size: int) -> Image.Image:
    """A smooth colour field plus noise and a few lines, so the detector can't key on a flat colour."""
    coarse = rng.uniform(40, 200, size=(4, 4, 3)).astype(np.uint8)
    img = Image.fromarray(coarse).resize((size, size), Image.BICUBIC)
    arr = np.asarray(img).astype(np.int16) + rng.normal(0, 12, size=(size, size, 3)).astype(np.int16)
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(2, 6))):
        xy = [tuple(rng.uniform(0, size, 2)) for _ in range(2)]
        draw.line(xy, fill=tuple(int(v) for v in rng.integers(0, 256, 3)), width=int(rng.integers(1, 3)))
    return img


def _iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _image(rng: np.random.Generator, size: int, max_objects: int, classes: tuple[str, ...]):
    img = _background(rng, size)
    draw = ImageDraw.Draw(img)
    regions, boxes = [], []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        for _attempt in range(20):
            r = rng.uniform(0.08, 0.22) * size
            cx, cy = rng.uniform(r * 0.6, size - r * 0.6, 2)
            kind = classes[int(rng.integers(len(classes)))]
            pts = _polygon(kind, cx, cy, r, rng.uniform(0, 2 * math.pi))
            xs, ys = [p[0] for p in pts], [p[1] for p in pts]
            box = (max(min(xs), 0), max(min(ys), 0), min(max(xs), size), min(max(ys), size))
            if all(_iou(box, other) < 0.3 for other in boxes):
                break
        else:
            continue
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        draw.polygon(pts, fill=colour, outline=tuple(max(0, v - 60) for v in colour))
        boxes.append(box)
        regions.append({
            "shape_attributes": {
                "name": "polygon",
                "all_points_x": [round(x, 1) for x in xs],
                "all_points_y": [round(y, 1) for y in ys],
            },
            "region_attributes": {"label": kind},
        })
    return img.filter(ImageFilter.GaussianBlur(0.6)), regions


def generate(out: Path, *, num_train: int, num_val: int, image_size: int, max_objects: int,
             seed: int, classes: tuple[str, ...] = CLASSES, progress=None) -> None:
    """Write ``out/{train,val}/`` with JPEGs and VIA 2.x region JSON; the same seed gives the same bytes."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", num_train), ("val", num_val)):
        folder = out / split
        folder.mkdir(parents=True, exist_ok=True)
        via = {}
        for i in range(count):
            img, regions = _image(rng, image_size, max_objects, classes)
            name = f"{split}_{i:05d}.jpg"
            img.save(folder / name, quality=92)
            size = (folder / name).stat().st_size
            via[f"{name}{size}"] = {"filename": name, "size": size, "regions": regions, "file_attributes": {}}
            if progress:
                progress(1)
        (folder / "via_region_data.json").write_text(json.dumps(via, indent=1))
