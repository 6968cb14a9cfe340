"""Builders for raw-format fixtures: images of every odd kind a dataset ships, written by the tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

EXIF_ORIENTATION = 0x0112


def make_image(path: Path, width: int, height: int, mode: str = "RGB", *, orientation: int | None = None,
               seed: int = 0) -> Path:
    """Write an image of ``width`` x ``height`` as a viewer shows it.

    ``mode``: RGB, L (grayscale), RGBA, P (palette), I;16 (16-bit PNG). ``orientation`` (JPEG only): the
    EXIF orientation tag; for 5-8 the stored pixels are ``height`` x ``width`` (a camera held sideways).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    stored_w, stored_h = (height, width) if orientation in (5, 6, 7, 8) else (width, height)
    rgb = Image.fromarray(rng.integers(0, 255, (stored_h, stored_w, 3), dtype=np.uint8))
    if mode == "I;16":
        img = Image.fromarray(rng.integers(0, 65535, (stored_h, stored_w), dtype=np.uint16))
    elif mode == "P":
        img = rgb.quantize(16)
    else:
        img = rgb.convert(mode)
    if orientation is not None:
        exif = Image.Exif()
        exif[EXIF_ORIENTATION] = orientation
        img.save(path, exif=exif)
    else:
        img.save(path)
    return path
