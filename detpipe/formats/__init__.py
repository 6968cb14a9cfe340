"""Raw annotation formats: each is a *loader* from a raw folder to mmdetection middle-format records.

A loader is ``load(src, classes, splits, **options)`` and returns either ``{split: [record, ...]}`` or
one list of records (then :mod:`detpipe.conversion` makes a seeded train/val split). A record is
mmdetection's middle format, as the tutorial's ``KittiTinyDataset.load_annotations`` returns it::

    {"filename": "training/image_2/000000.jpeg",      # relative to src
     "width": 1224, "height": 370,                      # optional: read from the file header when absent
     "ann": {"bboxes": [[x1, y1, x2, y2], ...], "labels": [0, ...],
             "bboxes_ignore": [...], "labels_ignore": [...],   # optional; label -1 ignores every class
             "masks": [[[x, y, x, y, ...]] or None, ...],    # optional outline per box (COCO polygons)
             "attributes": [{...}, ...]},                      # optional per-box extras kept in COCO
     "events": {"dropped_unselected_class": 2}}               # optional counts for stats.json

Labels are indices into ``classes`` (or class names). Register a loader with :func:`register`; the
built-in ones live beside this file, project ones in ``workflow/formats/*.py`` (imported on demand).
"""

from __future__ import annotations

import difflib
import functools
import importlib.util
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from PIL import Image

from detpipe.errors import DetpipeError

PLUGIN_DIR = Path("workflow/formats")
_LOADERS: dict[str, Callable] = {}


def register(name: str):
    """Decorator: make ``fn`` the loader of format ``name`` (usable as ``format: name`` and ``--format name``)."""
    def wrap(fn: Callable) -> Callable:
        _LOADERS[name] = fn
        return fn
    return wrap


@functools.cache  # once per process and folder: config checks and the converter may both ask
def load_plugins(folder: Path = PLUGIN_DIR) -> None:
    """Import the project's own formats (``folder/*.py``); each registers its loader with :func:`register`."""
    for path in sorted(Path(folder).glob("*.py")):
        module = f"detpipe_plugin_{path.stem}"
        spec = importlib.util.spec_from_file_location(module, path)
        try:
            spec.loader.exec_module(importlib.util.module_from_spec(spec))
        except Exception as exc:  # a broken plugin is a user error: say which file
            raise DetpipeError(f"{path}: cannot import format plugin ({type(exc).__name__}: {exc})") from None


def names(plugins: Path = PLUGIN_DIR) -> list[str]:
    load_plugins(Path(plugins))
    return sorted(_LOADERS)


def loader(name: str, plugins: Path = PLUGIN_DIR) -> Callable:
    known = names(plugins)
    if name not in known:
        hint = difflib.get_close_matches(name, known, n=1)
        tip = f"did you mean {hint[0]}? " if hint else ""
        raise DetpipeError(f"unknown format {name!r}; {tip}known: {', '.join(known)}")
    return _LOADERS[name]


class ClassList(list):
    """The output class names. Closed: an unlisted name is an error. Open (no classes given): names are added."""

    def __init__(self, classes: list[str] | None):
        super().__init__(classes or [])
        self.open = classes is None
        self._index = {n: i for i, n in enumerate(self)}

    def index_of(self, name: str, where: str) -> int:
        if name in self._index:
            return self._index[name]
        if not self.open:
            raise DetpipeError(f"{where}: unknown class {name!r}; classes are {', '.join(self)}")
        self._index[name] = len(self)
        self.append(name)
        return self._index[name]


def polygon_area(xs: list[float], ys: list[float]) -> float:
    """Shoelace area: COCO's ``area`` for a polygon is the shape's area, not its box's."""
    xs2, ys2 = xs[1:] + xs[:1], ys[1:] + ys[:1]
    return abs(sum(x * y2 - x2 * y for x, y, x2, y2 in zip(xs, ys, xs2, ys2))) / 2.0


EXIF_ORIENTATION = 0x0112
_TAILS = {"JPEG": b"\xff\xd9", "PNG": b"IEND\xaeB`\x82"}


@functools.lru_cache(maxsize=1 << 16)
def image_size(path: Path) -> tuple[int, int]:
    """(width, height) as a viewer shows it, from the file header only (no pixel decode).

    EXIF orientations 5-8 (rotated a quarter turn) swap the two. A JPEG or PNG whose last bytes are not
    its end marker is truncated; that is checked by reading the file's tail, not by decoding it.
    """
    try:
        with Image.open(path) as im:
            width, height = im.size
            fmt = im.format
            # PIL's PNG getexif() decodes the whole image unless an eXIf chunk came before the pixels
            has_exif = fmt in ("JPEG", "TIFF", "WEBP") or (fmt == "PNG" and "exif" in im.info)
            orientation = im.getexif().get(EXIF_ORIENTATION, 1) if has_exif else 1
    except FileNotFoundError:
        raise DetpipeError(f"{path}: image file is missing") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise DetpipeError(f"{path}: not a readable image ({exc})") from None
    if fmt in _TAILS:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, 2) - 64))
            tail = f.read()
        if _TAILS[fmt] not in tail:  # writers may pad a few bytes after the end marker
            raise DetpipeError(f"{path}: truncated {fmt} image (no end marker)")
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def place_image(source: Path, dest: Path) -> None:
    """Put an image file at ``dest`` for a writer: a hard link when possible (benchmarks write 10k), else a copy."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, dest)
    except OSError:
        shutil.copyfile(source, dest)


# The built-in loaders register themselves on import; they need the helpers above, so they come last.
from detpipe.formats import coco, kitti, via, voc, yolo  # noqa: E402, F401
