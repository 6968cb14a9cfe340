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


def ann_crop(ann: dict, height: int, width: int) -> tuple[np.ndarray, int, int]:
    """:func:`ann_mask` cut to the object's box (polygons: up to 2 px around their vertices), with a border of one
    pixel: ``(crop, x0, y0)``, the crop's pixel (0, 0) being the image's (x0, y0) (-1 at the image's edge).

    Pasted back at (x0, y0), the crop is :func:`ann_mask` exactly within the image. The border is zero there and
    repeats the edge outside it: ``roi_align`` reads the last row and column of an image-sized bitmap up to the
    image's edge, and so it reads the crop alike. Polygons are rasterised in their own box only (a few pixels
    around their vertices, within the image), not over the whole image.
    """
    seg = ann.get("segmentation")
    if seg and isinstance(seg, list):
        from pycocotools import mask as mask_utils

        xs = [v for poly in seg for v in poly[0::2]]
        ys = [v for poly in seg for v in poly[1::2]]
        # 2 px beyond the vertices: every pixel the rasteriser fills
        x0, x1 = (min(max(v, 0), width) for v in (int(np.floor(min(xs))) - 2, int(np.ceil(max(xs))) + 2))
        y0, y1 = (min(max(v, 0), height) for v in (int(np.floor(min(ys))) - 2, int(np.ceil(max(ys))) + 2))
        if x1 > x0 and y1 > y0:
            moved = [_moved(poly, x0, y0) for poly in seg]
            inner = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(moved, y1 - y0, x1 - x0)))
        else:  # wholly outside the image
            inner = np.zeros((0, 0), dtype=np.uint8)
    else:
        full = ann_mask(ann, height, width)
        rows, cols = np.flatnonzero(full.any(1)), np.flatnonzero(full.any(0))
        y0, x0 = (int(rows[0]), int(cols[0])) if len(rows) else (0, 0)
        inner = full[y0:rows[-1] + 1, x0:cols[-1] + 1] if len(rows) else full[:0, :0]
    crop = np.pad(inner, 1)
    if inner.size:  # a border pixel outside the image repeats its edge, as roi_align reads an image's last pixels
        crop[:, 0], crop[:, -1] = (crop[:, 1] if x0 == 0 else 0), (crop[:, -2] if x0 + inner.shape[1] == width else 0)
        crop[0], crop[-1] = (crop[1] if y0 == 0 else 0), (crop[-2] if y0 + inner.shape[0] == height else 0)
    return crop, x0 - 1, y0 - 1


def _moved(poly: list, x0: int, y0: int) -> list:
    """A polygon's coordinates moved by (-x0, -y0) so that pycocotools rasterises it as in the whole image.

    Its rasteriser works on ``(int)(5 * v + 0.5)``: subtracting from ``v`` first would round differently at ties
    (coordinates with one decimal hit them), so the moved values are those integers less ``5 * x0``, over 5. Moved
    values are positive (the box lies ``2`` px beyond the vertices); an axis not moved keeps its values.
    """
    out = np.asarray(poly, dtype=np.float64)
    for axis, offset in ((0, x0), (1, y0)):
        if offset:
            upsampled = np.trunc(out[axis::2] * 5.0 + 0.5)  # pycocotools' rleFrPoly, in the same double arithmetic
            out[axis::2] = (upsampled - 5 * offset) / 5.0
    return out.tolist()
