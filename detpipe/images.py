"""Reading images as a viewer shows them, and an annotation's mask: shared by datasets, drawing and the API."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from detpipe.errors import DetpipeError


def read_rgb(path: Path) -> Image.Image:
    """An image as a viewer shows it: EXIF rotation applied; grayscale, palette, RGBA and 16-bit made 8-bit RGB."""
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit: scale to 8 bits, convert("RGB") would clip
                im = Image.fromarray((np.asarray(im, dtype=np.uint32) >> 8).astype(np.uint8))
            return im.convert("RGB")
    except OSError as exc:
        raise DetpipeError(f"{path}: cannot read image ({exc})") from None


def ann_mask(ann: dict, height: int, width: int) -> np.ndarray:
    """A COCO annotation's mask from its polygons or RLE; the filled box when it has no outline."""
    seg = ann.get("segmentation")
    if not seg:
        mask = np.zeros((height, width), dtype=np.uint8)
        x, y, w, h = (int(round(v)) for v in ann["bbox"])
        mask[y:y + h, x:x + w] = 1
        return mask
    from pycocotools import mask as mask_utils  # heavy: only outlines need it (and drawing)

    if isinstance(seg, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(seg, height, width))
    elif isinstance(seg["counts"], list):
        rle = mask_utils.frPyObjects(seg, height, width)
    else:
        rle = seg
    return mask_utils.decode(rle)
