"""Pascal VOC XML in the layouts sets ship it in, found without options:

* the devkit: ``Annotations/``, ``JPEGImages/``, ``ImageSets/Main/<split>.txt`` (without lists: seeded split);
* flat: an annotation folder (``annotations/``, ``Annotations/``, or ``labels/``, ``xml/`` holding XML; any case)
  beside an image folder (``JPEGImages/``, ``images/``, ``imgs/``; any case), or the XMLs beside their images;
* one folder per split (``train/``, ``val/`` or ``valid/`` or ``validation/``, ``test/``), each holding one of
  the flat layouts, as Roboflow's VOC export ships it.

An XML names its image in ``<filename>``, looked up in the image folder, then beside the XML; when no file has
that name, an image with the XML's (or the named file's) stem and a common image suffix is taken instead.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from pathlib import Path, PurePosixPath

from detpipe.errors import DetpipeError, listing
from detpipe.formats import ClassList, image_size, place_image, register

LISTS = "ImageSets/Main"
DEFAULT_SPLITS = {"train": "train", "val": "val"}
COORDS = ("xmin", "ymin", "xmax", "ymax")
ATTRIBUTES = ("truncated", "occluded", "pose")
# Folder names, lower case, matched in any case. "annotations" counts even when empty (an emptied devkit); the
# others only when they hold XML (a "labels/" folder is as often YOLO's).
ANNOTATION_DIRS = ("annotations", "annotation", "labels", "xml", "xmls")
IMAGE_DIRS = ("jpegimages", "images", "imgs", "img")
SPLIT_DIRS = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")  # preference when stems clash
LOOKED_FOR = ("looked for Annotations/ with JPEGImages/, annotations/ with images/, *.xml beside images, "
              "train/ val/ valid/ test/ split folders")


def _subdirs(folder: Path) -> dict[str, str]:
    """Lower-case name -> name of ``folder``'s subfolders (the first in sorted order where two differ in case)."""
    if not folder.is_dir():
        return {}
    out: dict[str, str] = {}
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if entry.is_dir():
            out.setdefault(entry.name.lower(), entry.name)
    return out


def _xml_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(Path(e.path) for e in os.scandir(folder) if e.is_file() and e.name.lower().endswith(".xml"))


def _join(*parts: str) -> str:
    return Path(*parts).as_posix()


def _image_folder(src: Path, folder: str, fallback: str) -> str:
    subdirs = _subdirs(src / folder)
    return next((_join(folder, subdirs[k]) for k in IMAGE_DIRS if k in subdirs), fallback)


def _layout(src: Path, folder: str = ".") -> tuple[str, str] | None:
    """``(annotation folder, image folder)``, relative to ``src``, of the flat layout in ``src/folder``, or None."""
    subdirs = _subdirs(src / folder)
    for key in ANNOTATION_DIRS:
        if key in subdirs and (key == "annotations" or _xml_files(src / folder / subdirs[key])):
            annotations = _join(folder, subdirs[key])
            break
    else:
        if not _xml_files(src / folder):
            return None
        annotations = folder
    return annotations, _image_folder(src, folder, annotations)


class _Images:
    """Finds the image an XML means, in the image folder, then beside the XML, then in the layout's folder."""

    def __init__(self, src: Path, folders: list[str]):
        self.src, self.folders = src, list(dict.fromkeys(folders))
        self._names: dict[str, set[str]] = {}
        self._stems: dict[str, dict[str, str]] = {}
        rank = {suffix: i for i, suffix in enumerate(IMAGE_SUFFIXES)}
        for folder in self.folders:
            names = {e.name for e in os.scandir(src / folder) if e.is_file()} if (src / folder).is_dir() else set()
            images = sorted((n for n in names if Path(n).suffix.lower() in rank),
                            key=lambda n: (rank[Path(n).suffix.lower()], n))
            stems: dict[str, str] = {}
            for name in images:
                stems.setdefault(Path(name).stem, name)
            self._names[folder], self._stems[folder] = names, stems

    def find(self, filename: str, xml: Path) -> str:
        """The image's path relative to ``src``; one that does not exist is left for the missing-image check."""
        name = filename.replace("\\", "/")
        base = name.rsplit("/", 1)[-1]
        if PurePosixPath(name).is_absolute() or ":" in name or ".." in name.split("/"):
            name = base  # a path on the annotator's machine: only its last part means anything here
        for folder in self.folders:
            if name and (name in self._names[folder] or ("/" in name and (self.src / folder / name).is_file())):
                return _join(folder, name)
            if base and base in self._names[folder]:
                return _join(folder, base)
        for folder in self.folders:
            for stem in dict.fromkeys((xml.stem, PurePosixPath(base).stem if base else "")):
                if stem and stem in self._stems[folder]:
                    return _join(folder, self._stems[folder][stem])
        return _join(self.folders[0], name or f"{xml.stem}.jpg")


def _record(xml: Path, classes: ClassList, images: _Images) -> dict:
    try:
        root = ET.parse(xml).getroot()
    except ET.ParseError as exc:
        message = str(exc).rsplit(": line ", 1)[0]  # the position is given as file:LINE instead
        raise DetpipeError(f"{xml}:{exc.position[0]}: malformed XML ({message})") from None
    rec = {"filename": images.find((root.findtext("filename") or "").strip(), xml)}
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


def _records(src: Path, annotations: str, images: str, classes: ClassList, xmls: list[Path] | None = None,
             folder: str = ".") -> list[dict]:
    finder = _Images(src, [images, annotations, folder])
    return [_record(p, classes, finder) for p in (_xml_files(src / annotations) if xmls is None else xmls)]


def _split_folders(src: Path) -> dict[str, str]:
    """Split -> folder of the subfolders named like splits that hold a flat layout (``valid/`` is ``val``)."""
    out: dict[str, str] = {}
    for key, name in _subdirs(src).items():
        if key in SPLIT_DIRS and _layout(src, name) is not None:
            out.setdefault(SPLIT_DIRS[key], name)
    return {split: out[split] for split in ("train", "val", "test") if split in out}


def _from_lists(src: Path, annotations: str, images: str, classes: ClassList, splits: dict) -> dict[str, list[dict]]:
    out = {}
    for split, list_name in (splits or DEFAULT_SPLITS).items():
        path = src / LISTS / f"{list_name}.txt"
        if not path.is_file():
            raise DetpipeError(f"{path}: split list file is missing")
        xmls = [src / annotations / f"{i}.xml" for i in path.read_text().split()]
        missing = [p.relative_to(src).as_posix() for p in xmls if not p.is_file()]
        if missing:
            raise DetpipeError(f"{path}: {len(missing)} listed id(s) have no annotation file: {listing(missing)}")
        out[split] = _records(src, annotations, images, classes, xmls)
    return out


@register("voc")
def load(src: Path, classes: ClassList, splits: dict, annotations: str | None = None,
         images: str | None = None) -> dict[str, list[dict]] | list[dict]:
    """Records of the layout found in ``src`` (see the module's doc).

    ``splits`` maps split -> list name in ``ImageSets/Main`` (default ``train``, ``val``; with no lists every XML
    is read and the core splits them with a seed); in a set of split folders it maps split -> folder (default:
    the folders there; with ``train/`` but no ``val/`` or ``valid/``, ``train/`` is split with the seed).
    ``annotations`` and ``images`` name the two folders, relative to ``src``, where the search gets them wrong.
    """
    layout = _layout(src)
    if annotations or images:
        annotations = annotations or (layout[0] if layout else ".")
        images = images or _image_folder(src, ".", annotations)
        if not (src / annotations).is_dir():
            raise DetpipeError(f"{src / annotations}: annotation folder is missing")
        layout = (annotations, images)
    if layout is not None:
        annotations, images = layout
        if splits or any((src / LISTS / f"{n}.txt").is_file() for n in DEFAULT_SPLITS.values()):
            return _from_lists(src, annotations, images, classes, splits)
        return _records(src, annotations, images, classes)
    if not src.is_dir():
        raise DetpipeError(f"{src}: raw data folder is missing")
    found = _split_folders(src)
    if not found:
        raise DetpipeError(f"{src}: no Pascal VOC annotations found; {LOOKED_FOR}")
    if not splits and "val" not in found:  # one list the core splits with a seed; a test folder stays out
        folders = [found["train"]] if "train" in found else list(found.values())
        return [r for folder in folders for r in _records(src, *_layout(src, folder), classes, folder=folder)]
    out = {}
    for split, folder in (splits or found).items():
        layout = _layout(src, folder)
        if layout is None:
            raise DetpipeError(f"{src / folder}: split folder is missing or holds no Pascal VOC annotations "
                               f"(split folders here: {', '.join(sorted(found.values()))})")
        out[split] = _records(src, *layout, classes, folder=folder)
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
