"""Raw folder -> ``<split>.json`` (COCO), ``<split>_middle.json`` (mmdetection middle format), ``stats.json``.

A format's loader (see :mod:`detpipe.formats`) gives middle-format records; everything every format
needs is done here, once: record checks, duplicate and missing images, header-only image sizes,
clipping and dropping of boxes (counted per reason, or an error with ``strict``), the seeded split
for formats without split files, and the COCO and middle-format files.
"""

from __future__ import annotations

import inspect
import random
import sys
from collections import Counter
from pathlib import Path

from tqdm import tqdm

from detpipe import formats
from detpipe.errors import DetpipeError, listing
from detpipe.files import atomic_dir, write_json
from detpipe.formats import ClassList, image_size, polygon_area

# Data problems: counted in stats.json, errors under ``strict``.
GEOMETRY = ("clipped_outside_image", "dropped_outside_image", "dropped_degenerate", "size_differs_from_header")


def seeded_split(records: list[dict], val_fraction: float, seed: int) -> dict[str, list[dict]]:
    """Shuffle with ``seed`` and put ``val_fraction`` of the images (at least one) in val."""
    if not 0 < val_fraction < 1:
        raise DetpipeError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_val = min(max(1, round(len(records) * val_fraction)), len(records) - 1)
    val = set(order[:n_val])
    return {"train": [r for i, r in enumerate(records) if i not in val],
            "val": [r for i, r in enumerate(records) if i in val]}


def _clip_polygon(flat: list[float], w: int, h: int) -> list[float]:
    """``[x, y, x, y, ...]`` with every vertex moved inside the image, rounded to 0.01 px."""
    xs, ys = flat[0::2], flat[1::2]
    if min(xs) < 0 or min(ys) < 0 or max(xs) > w or max(ys) > h:
        xs = [min(max(x, 0.0), w) for x in xs]
        ys = [min(max(y, 0.0), h) for y in ys]
    return [round(v, 2) for xy in zip(xs, ys) for v in xy]


class _Split:
    """One split's records checked, clipped and turned into COCO and middle format."""

    def __init__(self, classes: ClassList, min_box_size: float, strict: bool):
        self.classes, self.min_box_size, self.strict = classes, min_box_size, strict
        self.images: list[dict] = []
        self.annotations: list[dict] = []
        self.middle: list[dict] = []
        self.events: Counter[str] = Counter()

    def event(self, reason: str, where: str) -> None:
        if self.strict and reason in GEOMETRY:
            raise DetpipeError(f"{where}: {reason.replace('_', ' ')} (convert.strict is on)")
        self.events[reason] += 1

    def _label(self, label, where: str, ignore: bool) -> int:
        if isinstance(label, str):
            return self.classes.index_of(label, where)
        if isinstance(label, bool) or not isinstance(label, int) or not (-int(ignore) <= label < len(self.classes)):
            raise DetpipeError(f"{where}: label {label!r} is not a class index 0..{len(self.classes) - 1}")
        return label

    def _clip(self, box, w: int, h: int, where: str):
        try:
            x1, y1, x2, y2 = (float(v) for v in box)
        except (TypeError, ValueError):
            raise DetpipeError(f"{where}: box {box!r} is not four numbers x1, y1, x2, y2") from None
        cx1, cy1, cx2, cy2 = max(0.0, x1), max(0.0, y1), min(float(w), x2), min(float(h), y2)
        if x2 - x1 < self.min_box_size or y2 - y1 < self.min_box_size:
            self.event("dropped_degenerate", where)
            return None
        if cx2 - cx1 < self.min_box_size or cy2 - cy1 < self.min_box_size:
            self.event("dropped_outside_image", where)
            return None
        if (cx1, cy1, cx2, cy2) != (x1, y1, x2, y2):
            self.event("clipped_outside_image", where)
        return [round(v, 2) for v in (cx1, cy1, cx2, cy2)]

    def add(self, rec: dict, size: tuple[int, int]) -> None:
        w, h = size
        image_id = len(self.images) + 1
        self.images.append({"id": image_id, "file_name": rec["filename"], "width": w, "height": h})
        ann = rec["ann"]
        masks = ann.get("masks") or [None] * len(ann["bboxes"])
        attrs = ann.get("attributes") or [None] * len(ann["bboxes"])
        out = {"bboxes": [], "labels": [], "bboxes_ignore": [], "labels_ignore": []}
        groups = ((ann["bboxes"], ann["labels"], masks, attrs, False),
                  (ann.get("bboxes_ignore") or [], ann.get("labels_ignore") or [], None, None, True))
        for boxes, labels, polys, extras, ignore in groups:
            if len(boxes) != len(labels) or (polys is not None and len(polys) != len(boxes)):
                raise DetpipeError(f"{rec['filename']}: ann lists of boxes, labels and masks differ in length")
            for i, (box, label) in enumerate(zip(boxes, labels)):
                where = f"{rec['filename']}: {'ignore ' if ignore else ''}box {i}"
                label = self._label(label, where, ignore)
                clipped = self._clip(box, w, h, where)
                if clipped is None:
                    continue
                (out["bboxes_ignore"] if ignore else out["bboxes"]).append(clipped)
                (out["labels_ignore"] if ignore else out["labels"]).append(label)
                poly = polys[i] if polys is not None else None
                extra = extras[i] if extras is not None else None
                for cat in range(len(self.classes)) if label == -1 else [label]:
                    self._coco_ann(image_id, cat, clipped, poly, extra, ignore, w, h)
        self.middle.append({"filename": rec["filename"], "width": w, "height": h, "ann": out})
        for reason, n in (rec.get("events") or {}).items():
            self.events[reason] += n

    def _coco_ann(self, image_id, cat, box, poly, extra, ignore, w, h) -> None:
        x1, y1, x2, y2 = box
        ann = {"id": len(self.annotations) + 1, "image_id": image_id, "category_id": cat + 1,
               "bbox": [x1, y1, round(x2 - x1, 2), round(y2 - y1, 2)], "area": round((x2 - x1) * (y2 - y1), 2),
               "iscrowd": int(ignore)}
        parts = [p for p in (poly or []) if len(p) >= 6]
        if parts:
            clipped = [_clip_polygon(p, w, h) for p in parts]
            ann["segmentation"] = clipped
            ann["area"] = round(sum(polygon_area(p[0::2], p[1::2]) for p in clipped), 2)
        if extra:
            ann["attributes"] = extra
        self.annotations.append(ann)

    def coco(self) -> dict:
        if any("segmentation" in a for a in self.annotations):  # segm evaluation needs one on every annotation
            for a in self.annotations:
                if "segmentation" not in a:
                    x, y, w, h = a["bbox"]
                    a["segmentation"] = [[x, y, x + w, y, x + w, y + h, x, y + h]]
        cats = [{"id": i + 1, "name": n, "supercategory": "object"} for i, n in enumerate(self.classes)]
        return {"images": self.images, "annotations": self.annotations, "categories": cats}

    def stats(self) -> dict:
        per_class = Counter(lab for rec in self.middle for lab in rec["ann"]["labels"])
        return {
            "images": len(self.images),
            "objects": sum(per_class.values()),
            "ignored": sum(len(rec["ann"]["bboxes_ignore"]) for rec in self.middle),
            "objects_per_class": {n: per_class.get(i, 0) for i, n in enumerate(self.classes)},
            "boxes_changed": {**dict.fromkeys(GEOMETRY, 0), **self.events},
        }


def _check_records(src: Path, splits: dict[str, list[dict]], fmt: str) -> None:
    """Every record well formed, no image twice, every image present: all problems of a kind in one line."""
    seen: dict[str, str] = {}
    dupes, missing = [], []
    for split, records in splits.items():
        for rec in records:
            if not isinstance(rec, dict) or not isinstance(rec.get("filename"), str) or \
                    not isinstance(rec.get("ann"), dict) or not {"bboxes", "labels"} <= rec["ann"].keys():
                raise DetpipeError(f"format {fmt!r}: record {str(rec)[:80]} lacks filename or ann{{bboxes, labels}}")
            name = rec["filename"]
            if name in seen:
                dupes.append(name)
            seen[name] = split
            if not (src / name).is_file():
                missing.append(name)
    if dupes:
        raise DetpipeError(f"{src}: {len(dupes)} duplicate image name(s): {listing(dupes)}")
    if missing:
        raise DetpipeError(f"{src}: labels refer to {len(missing)} missing image(s): {listing(missing)}")


def load_splits(fmt: str, src: Path, classes: list[str] | None, splits: dict | None = None,
                options: dict | None = None, val_fraction: float = 0.2, seed: int = 0,
                plugins: Path = formats.PLUGIN_DIR):
    """Run format ``fmt``'s loader; returns ``(ClassList, {split: records})``."""
    class_list = ClassList(list(classes) if classes else None)
    load = formats.loader(fmt, plugins)
    args = (Path(src), class_list, dict(splits or {}))
    try:
        inspect.signature(load).bind(*args, **(options or {}))
    except TypeError as exc:
        raise DetpipeError(f"format {fmt!r}: bad options {dict(options or {})} ({exc})") from None
    result = load(*args, **(options or {}))
    if isinstance(result, list):
        result = {"all": result}
    n = sum(len(r) for r in result.values())
    if n == 0:
        raise DetpipeError(f"{src}: no annotated images found for format {fmt!r}")
    if list(result) == ["all"]:
        result = seeded_split(result["all"], val_fraction, seed)
    for split, records in result.items():
        if not records:
            raise DetpipeError(f"{src}: split {split!r} has no images")
    return class_list, result


def convert_dataset(fmt: str, src: Path, out: Path, classes: list[str] | None = None, *,
                    splits: dict | None = None, options: dict | None = None, val_fraction: float = 0.2,
                    seed: int = 0, min_box_size: float = 1.0, strict: bool = False,
                    content_hash: str | None = None, progress: bool = False,
                    plugins: Path = formats.PLUGIN_DIR) -> dict:
    """Convert ``src`` into ``out`` atomically (nothing is written on an error); returns ``stats.json``'s content.

    ``content_hash`` identifies the raw data (the download stage records it); it is passed on into the stats.
    """
    src = Path(src)
    class_list, result = load_splits(fmt, src, classes, splits, options, val_fraction, seed, plugins)
    _check_records(src, result, fmt)
    built = {}
    for split, records in result.items():
        part = _Split(class_list, min_box_size, strict)
        for rec in tqdm(records, desc=f"convert {split}", unit="img", disable=not progress, file=sys.stderr):
            size = image_size(src / rec["filename"])
            given = (rec.get("width"), rec.get("height"))
            if given != (None, None) and tuple(given) != size:
                part.event("size_differs_from_header", f"{rec['filename']}: labels say {given}, the file {size}")
            part.add(rec, size)
        built[split] = part
    if not class_list:
        raise DetpipeError(f"{src}: no classes: give them in params (classes) or with --classes")
    stats = {"format": fmt, "classes": list(class_list), "content_hash": content_hash, "splits": {}}
    with atomic_dir(Path(out)) as tmp:
        for split, part in built.items():
            write_json(tmp / f"{split}.json", part.coco(), compact=True)
            write_json(tmp / f"{split}_middle.json", part.middle, compact=True)
            stats["splits"][split] = part.stats()
        write_json(tmp / "stats.json", stats)
    return stats
