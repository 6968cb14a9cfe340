"""Ultralytics YOLO: a data YAML with ``names``, ``images/<split>/`` and ``labels/<split>/*.txt`` (normalized boxes)."""

from __future__ import annotations

import math
import os
from pathlib import Path

import yaml

from detpipe.errors import DetpipeError, listing
from detpipe.formats import ClassList, image_size, place_image, register

DATA_FILES = ("data.yaml", "dataset.yaml")
DEFAULT_SPLITS = {"train": "train", "val": "val"}
IMAGE_SUFFIXES = {".bmp", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp"}


def _data_yaml(src: Path, data: str | None) -> Path:
    if data:
        path = src / data
        if not path.is_file():
            raise DetpipeError(f"{path}: data YAML is missing")
        return path
    found = [src / n for n in DATA_FILES if (src / n).is_file()]
    if len(found) != 1:
        present = sorted(p.name for p in src.glob("*.y*ml"))
        raise DetpipeError(f"{src}: need one data YAML ({' or '.join(DATA_FILES)}); found "
                           f"{', '.join(present) or 'none'}; name it with options: {{data: <file>}}")
    return found[0]


def _read_yaml(path: Path) -> dict:
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise DetpipeError(f"{path}{f':{mark.line + 1}' if mark else ''}: malformed YAML") from None


def _names(spec, path: Path) -> list[str]:
    """The class names of a data YAML: a list, or a dict {0: name, 1: name, ...}."""
    if not isinstance(spec, dict) or not spec.get("names"):
        raise DetpipeError(f"{path}: no 'names' (the class names) in the data YAML")
    names = spec["names"]
    if isinstance(names, dict):
        try:
            names = [names[i] for i in range(len(names))]
        except KeyError:
            raise DetpipeError(f"{path}: the keys of 'names' must be the class indices 0..{len(names) - 1}") from None
    return [str(n) for n in names]


def _class_map(names: list[str], classes: ClassList, where: Path) -> list[int | None]:
    """Output label of each YOLO class index; None for a class not selected."""
    unknown = [c for c in classes if c not in names]
    if unknown and not classes.open:
        raise DetpipeError(f"{where}: unknown class {', '.join(map(repr, unknown))}; "
                           f"the data YAML's names are {', '.join(names)}")
    return [classes.index_of(n, str(where)) if classes.open or n in classes else None for n in names]


def _images(root: Path, entry, where: str) -> list[Path]:
    """The images of one split entry: a folder (searched recursively) or a .txt list of paths relative to root."""
    path = root / str(entry)
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if path.suffix == ".txt" and path.is_file():
        return [root / line.strip() for line in path.read_text().splitlines() if line.strip()]
    raise DetpipeError(f"{where}: {entry!r} is neither an image folder nor a .txt list in {root}")


def _to_labels(path: Path) -> Path:
    """YOLO's rule: the last ``images`` folder in the path becomes ``labels`` (no such folder: beside the image)."""
    parts = path.parts
    if "images" not in parts:
        return path
    i = len(parts) - 1 - parts[::-1].index("images")
    return Path(*parts[:i], "labels", *parts[i + 1:])


def _check_orphans(src: Path, images: list[Path]) -> None:
    """Every label file in the label folders has an image (one with no image is a sign of a broken export)."""
    folders = {p.parent for p in images if p.parent.is_dir()}
    known = {_to_labels(p).with_suffix(".txt") for d in folders for p in d.iterdir()
             if p.suffix.lower() in IMAGE_SUFFIXES}
    # Labels kept beside their images are not checked: there a .txt may as well be a split list.
    label_folders = {_to_labels(d) for d in folders} - folders
    orphans = sorted(os.path.relpath(t, src) for d in label_folders if d.is_dir()
                     for t in d.glob("*.txt") if t not in known)
    if orphans:
        raise DetpipeError(f"{src}: {len(orphans)} label file(s) without an image: {listing(orphans)}")


def _record(src: Path, image: Path, to_label: list[int | None]) -> dict:
    rec = {"filename": Path(os.path.relpath(image, src)).as_posix()}
    label_file = _to_labels(image).with_suffix(".txt")
    if not label_file.is_file():  # YOLO's convention for a background image
        return {**rec, "ann": {"bboxes": [], "labels": []}, "events": {"images_without_labels": 1}}
    boxes, labels, masks, dropped = [], [], [], 0
    for n, line in enumerate(label_file.read_text().splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        where = f"{label_file}:{n}"
        if len(fields) != 5 and (len(fields) < 7 or len(fields) % 2 == 0):
            raise DetpipeError(f"{where}: {len(fields)} fields; expected 'class cx cy w h' "
                               "or 'class x1 y1 x2 y2 x3 y3 ...'")
        try:
            values = [float(v) for v in fields]
        except ValueError:
            raise DetpipeError(f"{where}: not numbers: {line.strip()!r}") from None
        if not all(map(math.isfinite, values)):
            raise DetpipeError(f"{where}: not numbers: {line.strip()!r}")
        if not values[0].is_integer() or not 0 <= values[0] < len(to_label):
            raise DetpipeError(f"{where}: class {fields[0]} is not an index 0..{len(to_label) - 1} "
                               "of the data YAML's names")
        label = to_label[int(values[0])]
        if label is None:
            dropped += 1
            continue
        width, height = image_size(image)  # the displayed size: YOLO normalizes by the EXIF-rotated image
        if len(values) == 5:
            cx, cy, w, h = values[1:]
            boxes.append([(cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height])
            masks.append(None)
        else:
            xs, ys = [v * width for v in values[1::2]], [v * height for v in values[2::2]]
            boxes.append([min(xs), min(ys), max(xs), max(ys)])
            masks.append([[v for xy in zip(xs, ys) for v in xy]])
        labels.append(label)
    rec["ann"] = {"bboxes": boxes, "labels": labels, "masks": masks}
    rec["events"] = {"dropped_unselected_class": dropped} if dropped else {}
    return rec


@register("yolo")
def load(src: Path, classes: ClassList, splits: dict,
         data: str | dict | None = None) -> dict[str, list[dict]] | list[dict]:
    """``splits`` maps split -> data-YAML key (``train``, ``val``); a folder or a .txt list of images for each.

    ``data`` names the data YAML (default: ``data.yaml`` or ``dataset.yaml`` in ``src``), or is its content, for
    sets that ship without one (coco128: ``{train: images/train2017, names: [...]}``). With one split (a YAML
    without ``val``, or whose ``val`` is its ``train``, as coco128's) the records come as one list for a seeded
    split. Classes are matched by name: YAML names not in ``classes`` are dropped (counted).
    """
    if isinstance(data, dict):
        data_file, spec = src / "(options.data)", data
    else:
        data_file = _data_yaml(src, data)
        spec = _read_yaml(data_file)
    names = _names(spec, data_file)
    to_label = _class_map(names, classes, data_file)
    root = data_file.parent
    if spec.get("path"):
        # An absolute path is where the author kept the data; it is in src now.
        root = src if Path(spec["path"]).is_absolute() else root / spec["path"]
    if not splits and (not spec.get("val") or spec["val"] == spec.get("train")):
        splits = {"all": "train"}
    images = {}
    for split, key in (splits or DEFAULT_SPLITS).items():
        if not spec.get(key):
            raise DetpipeError(f"{data_file}: no {key!r} entry (for split {split!r})")
        entries = spec[key] if isinstance(spec[key], list) else [spec[key]]
        images[split] = [p for e in entries for p in _images(root, e, f"{data_file}: {key}")]
    _check_orphans(src, [p for paths in images.values() for p in paths])
    out = {split: [_record(src, p, to_label) for p in paths] for split, paths in images.items()}
    return next(iter(out.values())) if len(out) == 1 else out


def write(root: Path, splits: dict[str, list[dict]], classes: list[str], image) -> None:
    """Write records (``filename`` a bare name, labels indices) as ``images/<split>/``, ``labels/<split>/``, data.yaml.

    ``image(record)`` gives the image file to place. A box with a mask is written as its first polygon; ignore
    regions have no YOLO form and are left out.
    """
    for split, records in splits.items():
        for rec in records:
            source = Path(image(rec))
            place_image(source, root / "images" / split / rec["filename"])
            width, height = image_size(source)
            ann = rec["ann"]
            lines = []
            for box, label, mask in zip(ann["bboxes"], ann["labels"], ann.get("masks") or [None] * len(ann["bboxes"])):
                if mask:
                    coords = [v / (height if i % 2 else width) for i, v in enumerate(mask[0])]
                else:
                    x1, y1, x2, y2 = box
                    coords = [(x1 + x2) / 2 / width, (y1 + y2) / 2 / height, (x2 - x1) / width, (y2 - y1) / height]
                lines.append(" ".join([str(label), *(f"{v:.6f}" for v in coords)]) + "\n")
            label_file = root / "labels" / split / Path(rec["filename"]).with_suffix(".txt")
            label_file.parent.mkdir(parents=True, exist_ok=True)
            label_file.write_text("".join(lines))
    spec = {**{split: f"images/{split}" for split in splits}, "names": list(classes)}
    (root / "data.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
