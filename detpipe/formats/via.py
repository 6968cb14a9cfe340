"""VIA polygon JSON (the balloon set): ``<split>/via_region_data.json`` beside the split's images."""

from __future__ import annotations

import json
import math
from pathlib import Path

from detpipe.errors import DetpipeError
from detpipe.files import read_json
from detpipe.formats import ClassList, place_image, register

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


def load_split(src: Path, folder: str, classes: ClassList, label_key: str = "label") -> list[dict]:
    """Records of one split folder: its images and ``via_region_data.json`` (or a whole VIA 2.x project file)."""
    ann_file = src / folder / ANNOTATION_FILE
    entries = read_json(ann_file, "VIA annotation file")
    if "_via_img_metadata" in entries:  # a whole VIA 2.x project file
        entries = entries["_via_img_metadata"]
    single = classes[0] if len(classes) == 1 else None
    records = []
    for key, entry in entries.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("filename"), str):
            raise DetpipeError(f"{ann_file}: entry {key!r} has no filename")
        boxes, labels, masks = [], [], []
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
            boxes.append([min(xs), min(ys), max(xs), max(ys)])
            labels.append(classes.index_of(label, where))
            masks.append([[v for xy in zip(xs, ys) for v in xy]])
        records.append({"filename": f"{folder}/{entry['filename']}",
                        "ann": {"bboxes": boxes, "labels": labels, "masks": masks}})
    return records


@register("via")
def load(src: Path, classes: ClassList, splits: dict, label_key: str = "label") -> dict[str, list[dict]]:
    """One folder per split (``splits: {train: train, val: val}`` by default), as the balloon set ships."""
    splits = splits or {"train": "train", "val": "val"}
    return {split: load_split(src, folder, classes, label_key) for split, folder in splits.items()}


def write(root: Path, splits: dict[str, list[dict]], classes: list[str], image) -> None:
    """Write records (``filename`` a bare name, labels indices) as VIA 2.x region JSON, one folder per split.

    ``image(record)`` gives the path of the image file to place. Masks become polygons, boxes without one rects.
    """
    for split, records in splits.items():
        entries = {}
        for rec in records:
            place_image(image(rec), root / split / rec["filename"])
            regions = []
            ann = rec["ann"]
            for box, label, mask in zip(ann["bboxes"], ann["labels"], ann.get("masks") or [None] * len(ann["bboxes"])):
                if mask:
                    shape = {"name": "polygon", "all_points_x": mask[0][0::2], "all_points_y": mask[0][1::2]}
                else:
                    x1, y1, x2, y2 = box
                    shape = {"name": "rect", "x": x1, "y": y1, "width": x2 - x1, "height": y2 - y1}
                regions.append({"shape_attributes": shape, "region_attributes": {"label": classes[label]}})
            entries[rec["filename"]] = {"filename": rec["filename"], "size": -1, "regions": regions,
                                        "file_attributes": {}}
        (root / split / ANNOTATION_FILE).write_text(json.dumps(entries))
