"""VIA polygon JSON (the balloon set): ``<split>/via_region_data.json`` beside the split's images.

The class is a region attribute the VIA user named (``label``, ``class``, ``name``, ...): the ``label_key`` option
names it, or :func:`pick_label_key` finds it. Its values are text, a dropdown's or radio's choice, or a checkbox
attribute's one ticked box (``{"balloon": true}``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from detpipe.errors import DetpipeError
from detpipe.files import read_json
from detpipe.formats import ClassList, place_image, register

ANNOTATION_FILE = "via_region_data.json"
OPTION = "label_key"  # the loader option naming the class attribute


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


def _regions(entry: dict) -> list:
    regions = entry.get("regions") or []
    return list(regions.values()) if isinstance(regions, dict) else regions  # VIA 1.x: a dict keyed "0", "1", ...


def _read(ann_file: Path) -> dict:
    entries = read_json(ann_file, "VIA annotation file")
    if not isinstance(entries, dict):
        raise DetpipeError(f"{ann_file}: not a VIA annotation file (a JSON object of images)")
    if "_via_img_metadata" in entries:  # a whole VIA 2.x project file
        entries = entries["_via_img_metadata"]
    for key, entry in entries.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("filename"), str):
            raise DetpipeError(f"{ann_file}: entry {key!r} has no filename")
    return entries


def _names(value) -> list[str] | None:
    """The class names a region attribute's value gives: a text or dropdown value, or a checkbox attribute's ticked
    boxes (``{"balloon": true}``); ``[]`` when unset; None when it cannot be a class name (a number, a list)."""
    if isinstance(value, str):
        return [value.strip()] if value.strip() else []
    if isinstance(value, dict) and all(isinstance(v, bool) for v in value.values()):
        return [k for k, ticked in value.items() if ticked]
    return [] if value is None else None


def pick_label_key(files: dict[Path, dict], classes: ClassList) -> str:
    """The region attribute that holds the class names, when ``label_key`` is not given.

    The one attribute with text (or checkbox) values; else, with a class list, the one whose values are all class
    names; else ``label``, if there is one. No attribute at all gives ``label`` too (a one-class set needs none).
    """
    names: dict[str, set[str]] = {}  # attribute -> the class names its values give
    ruled_out: set[str] = set()  # attributes with a value that is no class name
    where = next(iter(files))  # the file the error names: the first with region attributes
    for ann_file, entries in files.items():
        for entry in entries.values():
            for region in _regions(entry):
                attrs = region.get("region_attributes") if isinstance(region, dict) else None
                if not isinstance(attrs, dict):
                    continue
                if attrs and not names:
                    where = ann_file
                for key, value in attrs.items():
                    given = _names(value)
                    names.setdefault(key, set()).update(given or [])
                    if given is None:
                        ruled_out.add(key)
    candidates = [k for k in names if k not in ruled_out and names[k]]
    if not candidates:
        return "label"
    if len(candidates) == 1:
        return candidates[0]
    if not classes.open:
        matching = [k for k in candidates if names[k] <= set(classes)]
        if len(matching) == 1:
            return matching[0]
        why = f"{'none' if not matching else 'more than one'} holds only the classes {', '.join(classes)}"
    else:
        why = "more than one could hold the class names"
    if "label" in candidates:
        return "label"
    found = ", ".join(repr(k) for k in names)
    raise DetpipeError(f"{where}: regions have attributes {found}; {why}; set options: {{{OPTION}: <name>}} "
                       f"in the dataset's entry in params/datasets.yaml (or pass {OPTION}= to the loader)")


def load_split(src: Path, folder: str, classes: ClassList, label_key: str | None = "label",
               entries: dict | None = None) -> list[dict]:
    """Records of one split folder: its images and ``via_region_data.json`` (or a whole VIA 2.x project file)."""
    ann_file = src / folder / ANNOTATION_FILE
    entries = _read(ann_file) if entries is None else entries
    label_key = label_key or pick_label_key({ann_file: entries}, classes)
    single = classes[0] if len(classes) == 1 else None
    records = []
    for key, entry in entries.items():
        boxes, labels, masks = [], [], []
        for i, region in enumerate(_regions(entry)):
            where = f"{ann_file}: {key} region {i}"
            if not isinstance(region, dict):
                raise DetpipeError(f"{where}: not a region (a JSON object with shape_attributes)")
            attrs = region.get("region_attributes")
            value = attrs.get(label_key) if isinstance(attrs, dict) else None
            given = _names(value)
            if given is None:
                raise DetpipeError(f"{where}: {label_key!r} region attribute is {value!r}, not a class name")
            if len(given) > 1:
                raise DetpipeError(f"{where}: {label_key!r} region attribute has more than one box ticked "
                                   f"({', '.join(given)})")
            label = given[0] if given else single
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
def load(src: Path, classes: ClassList, splits: dict, label_key: str | None = None) -> dict[str, list[dict]]:
    """One folder per split (``splits: {train: train, val: val}`` by default), as the balloon set ships.

    ``label_key`` names the region attribute holding the class; without it, :func:`pick_label_key` finds it.
    """
    splits = splits or {"train": "train", "val": "val"}
    files = {split: (src / folder / ANNOTATION_FILE) for split, folder in splits.items()}
    entries = {split: _read(path) for split, path in files.items()}
    label_key = label_key or pick_label_key({files[s]: entries[s] for s in splits}, classes)
    return {split: load_split(src, folder, classes, label_key, entries[split]) for split, folder in splits.items()}


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
