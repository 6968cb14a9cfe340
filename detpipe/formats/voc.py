"""Pascal VOC XML: the devkit layout (``Annotations/``, ``JPEGImages/``, ``ImageSets/Main/<split>.txt``), or a
folder of XMLs beside their images (or with them in ``images/``) and no lists, which the core splits with a seed.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

from detpipe.errors import DetpipeError, listing
from detpipe.formats import ClassList, image_size, place_image, register

LISTS = "ImageSets/Main"
DEFAULT_SPLITS = {"train": "train", "val": "val"}
COORDS = ("xmin", "ymin", "xmax", "ymax")
ATTRIBUTES = ("truncated", "occluded", "pose")


def _record(xml: Path, images: str, classes: ClassList) -> dict:
    try:
        root = ET.parse(xml).getroot()
    except ET.ParseError as exc:
        message = str(exc).rsplit(": line ", 1)[0]  # the position is given as file:LINE instead
        raise DetpipeError(f"{xml}:{exc.position[0]}: malformed XML ({message})") from None
    name = (root.findtext("filename") or "").strip() or f"{xml.stem}.jpg"
    rec = {"filename": (Path(images) / name).as_posix()}
    try:
        width, height = (int(float(root.findtext(f"size/{k}"))) for k in ("width", "height"))
    except (TypeError, ValueError):
        width = height = 0
    if width > 0 and height > 0:  # broken exports write 0 x 0: then the file header gives the size
        rec["width"], rec["height"] = width, height
    boxes, labels, attributes, ignore, ignore_labels = [], [], [], [], []
    for i, obj in enumerate(root.findall("object")):
        where = f"{xml}: object {i}"
        cls = (obj.findtext("name") or "").strip()
        if not cls:
            raise DetpipeError(f"{where}: no <name>")
        label = classes.index_of(cls, where)
        try:
            xmin, ymin, xmax, ymax = (float(obj.findtext(f"bndbox/{k}")) for k in COORDS)
        except (TypeError, ValueError):
            raise DetpipeError(f"{where} ({cls}): missing <bndbox> or a non-numeric {', '.join(COORDS)}") from None
        # VOC gives 1-based inclusive pixel indices: xmin=1, xmax=W spans the whole image, which in continuous
        # 0-based coordinates is 0..W (detectron2's reading; mmdetection subtracts 1 from all four instead).
        box = [xmin - 1, ymin - 1, xmax, ymax]
        if (obj.findtext("difficult") or "").strip() == "1":
            ignore.append(box)
            ignore_labels.append(label)
            continue
        boxes.append(box)
        labels.append(label)
        extras = {k: (obj.findtext(k) or "").strip() for k in ATTRIBUTES if obj.find(k) is not None}
        attributes.append({k: int(v) if v.isdigit() else v for k, v in extras.items()})
    rec["ann"] = {"bboxes": boxes, "labels": labels, "bboxes_ignore": ignore, "labels_ignore": ignore_labels,
                  "attributes": attributes}
    rec["events"] = {"ignored_difficult": len(ignore)} if ignore else {}
    return rec


@register("voc")
def load(src: Path, classes: ClassList, splits: dict, annotations: str | None = None,
         images: str | None = None) -> dict[str, list[dict]] | list[dict]:
    """``splits`` maps split -> list name in ``ImageSets/Main`` (``train``, ``val``); with neither, every XML is read.

    ``annotations`` (default ``Annotations``, else the root) and ``images`` (default ``JPEGImages``, else
    ``images``, else the annotation folder) are folders relative to ``src``; an XML names its image in
    ``<filename>`` (default: the XML's stem + ``.jpg``).
    """
    annotations = annotations or ("Annotations" if (src / "Annotations").is_dir() else ".")
    images = images or next((d for d in ("JPEGImages", "images") if (src / d).is_dir()), annotations)
    ann_dir = src / annotations
    if not ann_dir.is_dir():
        raise DetpipeError(f"{ann_dir}: annotation folder is missing")
    if not splits and not any((src / LISTS / f"{n}.txt").is_file() for n in DEFAULT_SPLITS.values()):
        return [_record(p, images, classes) for p in sorted(ann_dir.glob("*.xml"))]
    out = {}
    for split, list_name in (splits or DEFAULT_SPLITS).items():
        path = src / LISTS / f"{list_name}.txt"
        if not path.is_file():
            raise DetpipeError(f"{path}: split list file is missing")
        xmls = [ann_dir / f"{i}.xml" for i in path.read_text().split()]
        missing = [p.relative_to(src).as_posix() for p in xmls if not p.is_file()]
        if missing:
            raise DetpipeError(f"{path}: {len(missing)} listed id(s) have no annotation file: {listing(missing)}")
        out[split] = [_record(p, images, classes) for p in xmls]
    return out


def write(root: Path, splits: dict[str, list[dict]], classes: list[str], image) -> None:
    """Write records (``filename`` a bare name, labels indices) in the devkit layout with ``ImageSets/Main`` lists.

    ``image(record)`` gives the image file to place. Ignore regions become ``difficult`` objects; one with label
    -1 (every class) has no VOC form and is left out.
    """
    for folder in ("Annotations", LISTS):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for split, records in splits.items():
        stems = []
        for rec in records:
            source = Path(image(rec))
            place_image(source, root / "JPEGImages" / rec["filename"])
            width, height = (rec["width"], rec["height"]) if "width" in rec else image_size(source)
            top = ET.Element("annotation")
            ET.SubElement(top, "filename").text = rec["filename"]
            size = ET.SubElement(top, "size")
            ET.SubElement(size, "width").text = str(width)
            ET.SubElement(size, "height").text = str(height)
            ann = rec["ann"]
            objects = [(box, label, 0) for box, label in zip(ann["bboxes"], ann["labels"])]
            objects += [(box, label, 1) for box, label in
                        zip(ann.get("bboxes_ignore") or [], ann.get("labels_ignore") or []) if label != -1]
            for (x1, y1, x2, y2), label, difficult in objects:
                obj = ET.SubElement(top, "object")
                ET.SubElement(obj, "name").text = classes[label]
                ET.SubElement(obj, "difficult").text = str(difficult)
                bndbox = ET.SubElement(obj, "bndbox")
                for key, value in zip(COORDS, (x1 + 1, y1 + 1, x2, y2)):  # back to 1-based, see _record
                    ET.SubElement(bndbox, key).text = str(round(value, 2))
            ET.indent(top)
            stem = Path(rec["filename"]).stem
            ET.ElementTree(top).write(root / "Annotations" / f"{stem}.xml", encoding="utf-8", xml_declaration=True)
            stems.append(stem)
        (root / LISTS / f"{split}.txt").write_text("".join(f"{s}\n" for s in stems))
