"""mmdetection's "middle format": ``filename, width, height, ann{bboxes, labels, bboxes_ignore, labels_ignore}``.

Boxes are ``x1, y1, x2, y2``; labels are 0-based indices into the category list (mmdetection's
convention), whereas COCO category ids start at 1. Ignore regions go to ``*_ignore``; an ignore label of
-1 ignores every class (KITTI's DontCare). :mod:`detpipe.conversion` writes ``<split>_middle.json``.
"""

from __future__ import annotations

import numpy as np


def as_arrays(records: list[dict]) -> list[dict]:
    """Records with numpy arrays, the in-memory form mmdetection's ``CustomDataset`` works with."""
    out = []
    for rec in records:
        a = rec["ann"]
        out.append({**rec, "ann": {
            "bboxes": np.array(a["bboxes"], dtype=np.float32).reshape(-1, 4),
            "labels": np.array(a["labels"], dtype=np.int64),
            "bboxes_ignore": np.array(a["bboxes_ignore"], dtype=np.float32).reshape(-1, 4),
            "labels_ignore": np.array(a["labels_ignore"], dtype=np.int64),
        }})
    return out
