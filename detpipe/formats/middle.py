"""mmdetection's "middle format": ``filename, width, height, ann{bboxes, labels, bboxes_ignore, labels_ignore}``.

Boxes are ``x1, y1, x2, y2``; labels are 0-based indices into the category list (mmdetection's
convention), whereas COCO category ids start at 1. Crowd/ignore regions go to ``*_ignore``.
"""

from __future__ import annotations

import numpy as np


def from_coco(coco: dict) -> list[dict]:
    index = {c["id"]: i for i, c in enumerate(coco["categories"])}
    per_image: dict[int, list[dict]] = {img["id"]: [] for img in coco["images"]}
    for ann in coco["annotations"]:
        per_image[ann["image_id"]].append(ann)
    records = []
    for img in coco["images"]:
        keep, ignore = [], []
        for ann in per_image[img["id"]]:
            x, y, w, h = ann["bbox"]
            (ignore if ann.get("iscrowd") else keep).append(([x, y, x + w, y + h], index[ann["category_id"]]))
        records.append({
            "filename": img["file_name"], "width": img["width"], "height": img["height"],
            "ann": {"bboxes": [b for b, _ in keep], "labels": [c for _, c in keep],
                    "bboxes_ignore": [b for b, _ in ignore], "labels_ignore": [c for _, c in ignore]},
        })
    return records


def to_coco(records: list[dict], classes: list[str]) -> dict:
    """The inverse of :func:`from_coco` (boxes only: the middle format has no outlines)."""
    images, anns = [], []
    for i, rec in enumerate(records, start=1):
        images.append({"id": i, "file_name": rec["filename"], "width": rec["width"], "height": rec["height"]})
        a = rec["ann"]
        for boxes, labels, crowd in ((a["bboxes"], a["labels"], 0), (a.get("bboxes_ignore", []),
                                                                     a.get("labels_ignore", []), 1)):
            for (x1, y1, x2, y2), label in zip(boxes, labels):
                anns.append({"id": len(anns) + 1, "image_id": i, "category_id": int(label) + 1,
                             "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": crowd})
    cats = [{"id": i + 1, "name": n, "supercategory": "object"} for i, n in enumerate(classes)]
    return {"images": images, "annotations": anns, "categories": cats}


def as_arrays(records: list[dict]) -> list[dict]:
    """Records with numpy arrays, the in-memory form mmdetection's ``CustomDataset`` works with."""
    out = []
    for rec in records:
        a = rec["ann"]
        out.append({**rec, "ann": {
            "bboxes": np.array(a["bboxes"], dtype=np.float32).reshape(-1, 4),
            "labels": np.array(a["labels"], dtype=np.int64),
            "bboxes_ignore": np.array(a["bboxes_ignore"], dtype=np.float32).reshape(-1, 4),
            "labels_ignore": np.array(a["labels_ignore"], dtype=np.int64),
        }})
    return out
