"""COCO metrics through pycocotools: summary stats, per-class AP, and per-image predictions."""

from __future__ import annotations

import contextlib
import copy
import io

import numpy as np

STAT_NAMES = ("mAP", "mAP50", "mAP75", "mAP_small", "mAP_medium", "mAP_large",
              "AR1", "AR10", "AR100", "AR_small", "AR_medium", "AR_large")


def coco_evaluate(gt: dict, detections: list[dict], iou_type: str = "bbox") -> dict:
    """Return ``{"stats": {name: value}, "per_class": {class: {"AP": .., "AP50": ..}}}``.

    With no detections at all pycocotools cannot build its results object, so every metric is 0.
    """
    from pycocotools.coco import COCO  # heavy: imported when scoring, not when the module loads
    from pycocotools.cocoeval import COCOeval

    names = {c["id"]: c["name"] for c in gt["categories"]}
    if not detections:
        present = {a["category_id"] for a in gt["annotations"] if not a.get("iscrowd")}
        per_class = {n: dict.fromkeys(("AP", "AP50"), 0.0 if cid in present else None) for cid, n in names.items()}
        return {"stats": dict.fromkeys(STAT_NAMES, 0.0), "per_class": per_class}
    gt, detections = copy.deepcopy(gt), copy.deepcopy(detections)  # pycocotools writes fields into both
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(detections)
        ev = COCOeval(coco_gt, coco_dt, iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    stats = {k: max(float(v), 0.0) for k, v in zip(STAT_NAMES, ev.stats)}
    precision = ev.eval["precision"]  # [iou, recall, class, area, maxdets]
    per_class = {}
    for k, cat_id in enumerate(ev.params.catIds):
        p_all = precision[:, :, k, 0, -1]
        p_50 = precision[0, :, k, 0, -1]
        per_class[names[cat_id]] = {
            # None: the class has no ground truth in the split, so it has no AP (not an AP of 0)
            "AP": float(np.mean(p_all[p_all > -1])) if (p_all > -1).any() else None,
            "AP50": float(np.mean(p_50[p_50 > -1])) if (p_50 > -1).any() else None,
        }
    return {"stats": stats, "per_class": per_class}
