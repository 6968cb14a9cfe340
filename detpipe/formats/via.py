"""VIA polygon JSON (the balloon set): ``<split>/via_region_data.json`` beside the split's images."""

from __future__ import annotations

import json
import math
from pathlib import Path

from detpipe.errors import DetpipeError
from detpipe.formats import CocoBuilder, image_size

ANNOTATION_FILE = "via_region_data.json"


def _shape(attrs: dict, where: str) -> tuple[list[float], list[float]]:
    """Outline of a VIA shape as polygon vertices."""
    name = attrs.get("name")
    if name in ("polygon", "polyline"):
        return [float(v) for v in attrs["all_points_x"]], [float(v) for v in attrs["all_points_y"]]
    if name == "rect":
        x, y, w, h = (float(attrs[k]) for k in ("x", "y", "width", "height"))
        return [x, x + w, x + w, x], [y, y, y + h, y + h]
    if name in ("circle", "ellipse"):
        cx, cy = float(attrs["cx"]), float(attrs["cy"])
        rx = float(attrs.get("r", attrs.get("rx", 0)))
        ry = float(attrs.get("r", attrs.get("ry", 0)))
        ts = [2 * math.pi * i / 32 for i in range(32)]
        return [cx + rx * math.cos(t) for t in ts], [cy + ry * math.sin(t) for t in ts]
    raise DetpipeError(f"{where}: unsupported VIA shape {name!r}")


def convert_split(split_dir: Path, builder: CocoBuilder, prefix: str, label_key: str = "label") -> None:
    """Add every image and region of one split folder to ``builder``."""
    ann_file = split_dir / ANNOTATION_FILE
    if not ann_file.is_file():
        raise DetpipeError(f"{ann_file}: VIA annotation file is missing")
    try:
        entries = json.loads(ann_file.read_text())
    except json.JSONDecodeError as exc:
        raise DetpipeError(f"{ann_file}:{exc.lineno}: malformed JSON ({exc.msg})") from None
    if "_via_img_metadata" in entries:  # a whole VIA 2.x project file
        entries = entries["_via_img_metadata"]
    single = builder.classes[0] if len(builder.classes) == 1 else None
    for key, entry in entries.items():
        image_path = split_dir / entry["filename"]
        width, height = image_size(image_path)
        image_id = builder.add_image(f"{prefix}/{entry['filename']}", width, height)
        regions = entry.get("regions") or []
        if isinstance(regions, dict):  # VIA 1.x keeps regions in a dict keyed "0", "1", ...
            regions = list(regions.values())
        for i, region in enumerate(regions):
            where = f"{ann_file}: {key} region {i}"
            label = (region.get("region_attributes") or {}).get(label_key, single)
            if label is None:
                raise DetpipeError(f"{where}: no {label_key!r} region attribute and more than one class")
            try:
                xs, ys = _shape(region["shape_attributes"], where)
            except (KeyError, TypeError, ValueError) as exc:
                raise DetpipeError(f"{where}: malformed shape ({exc})") from None
            builder.add_object(image_id, label, (min(xs), min(ys), max(xs), max(ys)),
                               polygon=(xs, ys), where=where)


def convert(src: Path, classes: list[str], splits=("train", "val"), min_box_size: float = 1.0):
    """Return ``{split: (coco_dict, events)}`` for a folder holding one subfolder per split."""
    out = {}
    for split in splits:
        builder = CocoBuilder(classes, min_box_size)
        convert_split(src / split, builder, split)
        if not builder.images:
            raise DetpipeError(f"{src / split}: split {split!r} has no images")
        out[split] = (builder.to_dict(), dict(builder.events))
    return out
