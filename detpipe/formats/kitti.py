"""KITTI object labels, laid out as the mmdetection tutorial's KITTI-tiny set.

``training/image_2/<id>.<ext>``, ``training/label_2/<id>.txt`` and list files of ids (``train.txt``,
``val.txt``) at the root. ``DontCare`` and the KITTI types not in ``classes`` become ignore regions for
every class (label -1), as the tutorial's ``KittiTinyDataset`` does. Types of your own (KITTI-layout
exports of custom data) are objects when listed in ``classes``, and an unknown-class error otherwise.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from detpipe.errors import DetpipeError, listing
from detpipe.formats import ClassList, place_image, register

TYPES = ("Car", "Van", "Truck", "Pedestrian", "Person_sitting", "Cyclist", "Tram", "Misc")
DONTCARE = "DontCare"
IMAGE_DIR, LABEL_DIR = "training/image_2", "training/label_2"
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")
DEFAULT_SPLITS = {"train": "train.txt", "val": "val.txt"}


def _record(src: Path, image_id: str, images: dict[str, str], classes: ClassList) -> dict:
    path = src / LABEL_DIR / f"{image_id}.txt"
    boxes, labels, attributes, ignore = [], [], [], []
    events: Counter[str] = Counter()
    for n, line in enumerate(path.read_text().splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        where = f"{path}:{n}"
        if len(fields) not in (15, 16):  # a 16th field is the score of a result file
            raise DetpipeError(f"{where}: expected 15 fields, got {len(fields)}")
        try:
            numbers = [float(v) for v in fields[1:]]
        except ValueError as exc:
            raise DetpipeError(f"{where}: {exc}") from None
        name, box = fields[0], numbers[3:7]
        if name in classes or (classes.open and name != DONTCARE):
            boxes.append(box)
            labels.append(classes.index_of(name, where))
            attributes.append({"truncated": numbers[0], "occluded": int(numbers[1])})
        elif name == DONTCARE or name in TYPES:
            ignore.append(box)
            events["ignored_dontcare" if name == DONTCARE else "ignored_unselected_class"] += 1
        else:
            raise DetpipeError(f"{where}: unknown class {name!r}; classes are {', '.join(classes)} "
                               "(other KITTI types become ignore regions)")
    # An id without an image keeps KITTI-tiny's name, so the core's missing-image check lists it.
    filename = images.get(image_id, f"{image_id}.jpeg")
    return {"filename": f"{IMAGE_DIR}/{filename}",
            "ann": {"bboxes": boxes, "labels": labels, "bboxes_ignore": ignore, "labels_ignore": [-1] * len(ignore),
                    "attributes": attributes},
            "events": dict(events)}


@register("kitti")
def load(src: Path, classes: ClassList, splits: dict) -> dict[str, list[dict]] | list[dict]:
    """``splits`` maps split -> list file (``train.txt``, ``val.txt``); with neither file every label file is read.

    Open classes start with all KITTI types but DontCare, in :data:`TYPES` order, so their ids do not depend on
    the data; types of your own follow in the order they are met.
    """
    if classes.open:
        for name in TYPES:
            classes.index_of(name, str(src))
    image_dir = src / IMAGE_DIR
    images: dict[str, str] = {}
    for path in sorted(image_dir.iterdir()) if image_dir.is_dir() else []:
        if path.suffix.lower() in IMAGE_SUFFIXES:
            images.setdefault(path.stem, path.name)  # of 0.jpeg, 0.jpg, 0.png the first by name
    if not splits and not any((src / f).is_file() for f in DEFAULT_SPLITS.values()):
        return [_record(src, p.stem, images, classes) for p in sorted((src / LABEL_DIR).glob("*.txt"))]
    out = {}
    for split, list_file in (splits or DEFAULT_SPLITS).items():
        path = src / list_file
        if not path.is_file():
            raise DetpipeError(f"{path}: split list file is missing")
        ids = path.read_text().split()
        missing = [f"{LABEL_DIR}/{i}.txt" for i in ids if not (src / LABEL_DIR / f"{i}.txt").is_file()]
        if missing:
            raise DetpipeError(f"{path}: {len(missing)} listed id(s) have no label file: {listing(missing)}")
        out[split] = [_record(src, i, images, classes) for i in ids]
    return out


def write(root: Path, splits: dict[str, list[dict]], classes: list[str], image) -> None:
    """Write records (``filename`` a bare name, labels indices) in the KITTI-tiny layout with ``<split>.txt`` lists.

    ``image(record)`` gives the image file to place, as ``training/image_2/<stem><its suffix>``. The 3D fields
    are zeros. Every ignore region becomes a DontCare line: KITTI has no ignore region of one class.
    """
    (root / LABEL_DIR).mkdir(parents=True, exist_ok=True)
    for split, records in splits.items():
        stems = []
        for rec in records:
            stem = Path(rec["filename"]).stem
            source = Path(image(rec))
            place_image(source, root / IMAGE_DIR / f"{stem}{source.suffix}")
            ann = rec["ann"]
            rows = [(classes[label], box) for box, label in zip(ann["bboxes"], ann["labels"])]
            rows += [(DONTCARE, box) for box in ann.get("bboxes_ignore") or []]
            lines = [f"{name} 0.00 0 0.00 {' '.join(f'{v:.2f}' for v in box)}{' 0.00' * 7}\n" for name, box in rows]
            (root / LABEL_DIR / f"{stem}.txt").write_text("".join(lines))
            stems.append(stem)
        (root / f"{split}.txt").write_text("".join(f"{s}\n" for s in stems))
