"""COCO instances JSON, checked and passed on; the core renumbers category ids 1..K in ``classes`` order.

Crowd annotations (``iscrowd: 1``) become ignore regions of their class. Polygon segmentations are kept as
masks; RLE ones (a dict) are not decoded: the box is kept without a mask and counted as ``rle_mask_dropped``.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path

from detpipe.errors import DetpipeError
from detpipe.files import read_json
from detpipe.formats import ClassList, image_size, place_image, polygon_area, register

DEFAULT_SPLITS = {"train": "annotations/instances_train2017.json", "val": "annotations/instances_val2017.json"}


def _split_files(src: Path) -> dict[str, str]:
    """COCO 2017's files if there; else ``annotations/instances_<split>*.json``, the split named by its letters."""
    found = {split: f for split, f in DEFAULT_SPLITS.items() if (src / f).is_file()}
    if found:
        return found
    for path in sorted((src / "annotations").glob("instances_*.json")):
        split = re.match(r"instances_([A-Za-z]*)", path.name)[1] or path.stem
        if split in found:
            raise DetpipeError(f"{src}: {found[split]} and {path.relative_to(src)} are both split {split!r}; "
                               "choose with splits: {split: file}")
        found[split] = path.relative_to(src).as_posix()
    if not found:
        raise DetpipeError(f"{src}: no COCO annotation files (annotations/instances_<split>*.json)")
    return found


def _read(path: Path) -> dict:
    data = read_json(path, "COCO annotation file")
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(data, dict) or
               not isinstance(data.get(k), list)]
    if missing:
        raise DetpipeError(f"{path}: no {', '.join(missing)} list (a COCO file has images, annotations, categories)")
    return data


def _unique(items: list, key: str, what: str, path: Path) -> dict:
    """``{item[key]: item}``; a missing or repeated id is an error."""
    out = {}
    for item in items:
        if not isinstance(item, dict) or key not in item:
            raise DetpipeError(f"{path}: {what} {str(item)[:60]} has no {key!r}")
        if item[key] in out:
            raise DetpipeError(f"{path}: duplicate {what} {key} {item[key]!r}")
        out[item[key]] = item
    return out


def _labels(cats: dict, classes: ClassList, remap: dict, path: Path) -> dict:
    """Category id -> output label (None for a category not selected), after renaming by ``remap``."""
    names = [str(c.get("name")) for _, c in sorted(cats.items())]
    unknown = [old for old in remap if old not in names]
    if unknown:
        raise DetpipeError(f"{path}: remap names unknown categor(ies) {', '.join(map(repr, unknown))}; "
                           f"the file's categories are {', '.join(names)}")
    renamed = {cat_id: remap.get(name, name) for cat_id, name in zip(sorted(cats), names)}
    missing = [c for c in classes if c not in renamed.values()]
    if missing and not classes.open:
        raise DetpipeError(f"{path}: unknown class {', '.join(map(repr, missing))}; "
                           f"the file's categories are {', '.join(dict.fromkeys(renamed.values()))}")
    return {cat_id: classes.index_of(name, str(path)) if classes.open or name in classes else None
            for cat_id, name in renamed.items()}


def _box(ann: dict, where: str) -> list[float]:
    bbox = ann.get("bbox")
    if not isinstance(bbox, list) or len(bbox) != 4 or \
            not all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in bbox) or \
            bbox[2] < 0 or bbox[3] < 0:
        raise DetpipeError(f"{where}: bbox {bbox!r} is not [x, y, width, height] with width, height >= 0")
    x, y, w, h = bbox
    return [x, y, x + w, y + h]


def load_file(src: Path, file: str, images: str | None, classes: ClassList, remap: dict) -> list[dict]:
    """Records of one annotation file, every image of it in file order (those without annotations too)."""
    path = src / file
    data = _read(path)
    imgs = _unique(data["images"], "id", "image", path)
    cats = _unique(data["categories"], "id", "category", path)
    to_label = _labels(cats, classes, remap, path)
    if images is None:  # COCO 2017: instances_val2017.json describes val2017/
        folder = path.stem.removeprefix("instances_")
        images = folder if (src / folder).is_dir() else "."
    records = {}
    for image_id, img in imgs.items():
        if not isinstance(img.get("file_name"), str):
            raise DetpipeError(f"{path}: image {image_id!r} has no file_name")
        records[image_id] = {"filename": (Path(images) / img["file_name"]).as_posix(),
                             "width": img.get("width"), "height": img.get("height"),
                             "ann": {"bboxes": [], "labels": [], "masks": [], "bboxes_ignore": [], "labels_ignore": []},
                             "events": Counter()}
    for ann in data["annotations"]:
        if not isinstance(ann, dict):
            raise DetpipeError(f"{path}: annotation {str(ann)[:60]} is not an object")
        where = f"{path}: annotation {ann.get('id')!r}"
        if ann.get("image_id") not in records:
            raise DetpipeError(f"{where}: unknown image_id {ann.get('image_id')!r}")
        if ann.get("category_id") not in to_label:
            raise DetpipeError(f"{where}: unknown category_id {ann.get('category_id')!r}")
        box = _box(ann, where)
        rec, label = records[ann["image_id"]], to_label[ann["category_id"]]
        out, seg = rec["ann"], ann.get("segmentation")
        if label is None:
            rec["events"]["dropped_unselected_class"] += 1
        elif ann.get("iscrowd"):
            out["bboxes_ignore"].append(box)
            out["labels_ignore"].append(label)
            rec["events"]["ignored_crowd"] += 1
        else:
            if isinstance(seg, dict):
                rec["events"]["rle_mask_dropped"] += 1
            elif seg and not (isinstance(seg, list) and all(isinstance(p, list) for p in seg)):
                raise DetpipeError(f"{where}: segmentation is neither polygons [[x, y, ...], ...] nor RLE")
            out["bboxes"].append(box)
            out["labels"].append(label)
            out["masks"].append(seg if isinstance(seg, list) and seg else None)
    return list(records.values())


@register("coco")
def load(src: Path, classes: ClassList, splits: dict, images: str | None = None,
         remap: dict | None = None) -> dict[str, list[dict]] | list[dict]:
    """``splits`` maps split -> annotation file relative to ``src``; one file gives one list for a seeded split.

    ``images``: the image folder relative to ``src`` (default: ``<X>/`` for ``instances_<X>.json`` if there, as
    COCO 2017's ``val2017/``, else ``src``). ``remap: {old: new}`` renames categories; several may merge into one.
    Category id 0 is accepted: output ids are renumbered anyway.
    """
    files = splits or _split_files(src)
    out = {split: load_file(src, file, images, classes, remap or {}) for split, file in files.items()}
    return next(iter(out.values())) if len(out) == 1 else out


def write(root: Path, splits: dict[str, list[dict]], classes: list[str], image) -> None:
    """Write records (``filename`` a bare name, labels indices) as ``<split>/``, ``annotations/instances_<split>.json``.

    ``image(record)`` gives the image file to place. Ignore regions become ``iscrowd: 1`` (one with label -1,
    every class, has no COCO form and is left out); masks become polygon segmentations.
    """
    categories = [{"id": i + 1, "name": n, "supercategory": "object"} for i, n in enumerate(classes)]
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for split, records in splits.items():
        images, annotations = [], []
        for rec in records:
            source = Path(image(rec))
            place_image(source, root / split / rec["filename"])
            width, height = image_size(source)
            images.append({"id": len(images) + 1, "file_name": rec["filename"], "width": width, "height": height})
            ann = rec["ann"]
            objects = list(zip(ann["bboxes"], ann["labels"], ann.get("masks") or [None] * len(ann["bboxes"]),
                               [0] * len(ann["bboxes"])))
            objects += [(box, label, None, 1) for box, label in
                        zip(ann.get("bboxes_ignore") or [], ann.get("labels_ignore") or []) if label != -1]
            for (x1, y1, x2, y2), label, mask, crowd in objects:
                entry = {"id": len(annotations) + 1, "image_id": len(images), "category_id": label + 1,
                         "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": crowd}
                if mask:
                    entry["segmentation"] = mask
                    entry["area"] = sum(polygon_area(p[0::2], p[1::2]) for p in mask)
                annotations.append(entry)
        data = {"images": images, "annotations": annotations, "categories": categories}
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))
