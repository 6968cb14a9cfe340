"""Raw dataset formats, each turned into one COCO dict per split by :class:`CocoBuilder`."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from PIL import Image

from detpipe.errors import DetpipeError


def polygon_area(xs: list[float], ys: list[float]) -> float:
    """Shoelace area: COCO's ``area`` for a polygon is the shape's area, not its box's."""
    n = len(xs)
    return abs(sum(xs[i] * ys[(i + 1) % n] - xs[(i + 1) % n] * ys[i] for i in range(n))) / 2.0


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the file header only; no pixel decode."""
    try:
        with Image.open(path) as im:
            return im.size
    except FileNotFoundError:
        raise DetpipeError(f"{path}: image file is missing") from None
    except OSError as exc:
        raise DetpipeError(f"{path}: not a readable image ({exc})") from None


class CocoBuilder:
    """Collects images and objects into a COCO dict; clips boxes to the image, drops degenerate ones, counts why."""

    def __init__(self, classes: list[str], min_box_size: float = 1.0):
        self.classes = list(classes)
        self.cat_ids = {name: i + 1 for i, name in enumerate(self.classes)}
        self.min_box_size = min_box_size
        self.images: list[dict] = []
        self.annotations: list[dict] = []
        self.events: Counter[str] = Counter()
        self._sizes: dict[int, tuple[int, int]] = {}

    def add_image(self, file_name: str, width: int, height: int) -> int:
        image_id = len(self.images) + 1
        self.images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
        self._sizes[image_id] = (width, height)
        return image_id

    def add_object(self, image_id: int, label: str, box: tuple[float, float, float, float], *,
                   polygon: tuple[list[float], list[float]] | None = None, iscrowd: int = 0,
                   where: str = "") -> None:
        """Add one object given as an (x1, y1, x2, y2) box, optionally with its polygon outline."""
        if label not in self.cat_ids:
            raise DetpipeError(f"{where}: unknown class {label!r}; known: {', '.join(self.classes)}")
        w, h = self._sizes[image_id]
        x1, y1, x2, y2 = box
        cx1, cy1, cx2, cy2 = max(0.0, x1), max(0.0, y1), min(float(w), x2), min(float(h), y2)
        if min(cx2 - cx1, cy2 - cy1) < self.min_box_size:
            self.events["dropped_degenerate"] += 1
            return
        if (cx1, cy1, cx2, cy2) != (x1, y1, x2, y2):
            self.events["clipped_outside_image"] += 1
        ann = {
            "id": len(self.annotations) + 1, "image_id": image_id, "category_id": self.cat_ids[label],
            "bbox": [round(v, 2) for v in (cx1, cy1, cx2 - cx1, cy2 - cy1)], "iscrowd": iscrowd,
        }
        if polygon is not None:
            xs = [min(max(x, 0.0), w) for x in polygon[0]]
            ys = [min(max(y, 0.0), h) for y in polygon[1]]
            ann["segmentation"] = [[round(v, 2) for xy in zip(xs, ys) for v in xy]]
            ann["area"] = round(polygon_area(xs, ys), 2)
        else:
            ann["area"] = round((cx2 - cx1) * (cy2 - cy1), 2)
        self.annotations.append(ann)

    def to_dict(self) -> dict:
        cats = [{"id": i, "name": n, "supercategory": "object"} for n, i in self.cat_ids.items()]
        return {"images": self.images, "annotations": self.annotations, "categories": cats}
