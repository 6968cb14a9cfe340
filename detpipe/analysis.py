"""Error analysis of detections on a COCO ground truth, in numpy: VOC-style mAP@0.5, per-class precision-recall
curves, a confusion matrix with a background class, and the images the model got most wrong.

Conventions (see docs/evaluation.md):

- Boxes are COCO ``[x, y, w, h]`` in continuous pixel coordinates and IoU uses ``x2 - x1`` widths with no ``+ 1``:
  mmdetection 2.x ``eval_map``'s default (``use_legacy_coordinate=False``); mmdetection 1.x and the VOC devkit added
  1 to every width and height, which only makes sense for integer pixel-index boxes.
- VOC matching, as ``eval_map``'s ``tpfp_default``: per class, detections in score order (ties: the order of the
  detections list); each takes the ground truth (GT) it overlaps most in its image. IoU >= 0.5 with a GT not yet
  taken is a true positive, with a taken one a false positive (no fallback to the second best: the VOC rule), with
  an ignore region (``iscrowd: 1``) neither; below 0.5 a false positive. Ignore regions do not count as GT.
- AP: ``area`` (all-point interpolation, VOC2010+) and ``11points`` (VOC2007; the recall thresholds are ``k * 0.1``
  in floating point as in mmdetection and the devkit, so the 4th is 0.30000000000000004). mAP averages the classes
  that have GT; a class without GT has no AP (None).
- The confusion matrix, the per-image errors and the PR-curve samples use the same IoU threshold; the matrix and
  the per-image errors only look at detections scoring at least ``score_thr``.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from detpipe.errors import DetpipeError
from detpipe.files import atomic_dir
from detpipe.metrics import Detections, boxes_xywh, column

IOU_THR = 0.5
SCORE_THR = 0.3  # mmdetection's tools/analysis_tools/confusion_matrix.py default
BACKGROUND = "background"
RECALLS = np.linspace(0.0, 1.0, 101)  # where the PR curves are sampled: COCOeval's recall thresholds
VOC07_RECALLS = np.arange(0, 1 + 1e-3, 0.1)
EPS = np.finfo(np.float32).eps  # eval_map's guard against 0 / 0
PR_CURVES, CONFUSION = "pr_curves.csv", "confusion.csv"  # the files write_plots makes (dvc.yaml's plots name them)


def _xyxy(xywh: np.ndarray) -> np.ndarray:
    """``(n, 4)`` COCO ``[x, y, w, h]`` -> a ``(4, n)`` array: rows ``x1, y1, x2, y2``."""
    return np.concatenate([xywh[:, :2].T, (xywh[:, :2] + xywh[:, 2:]).T])


def _positions(ids: np.ndarray, known: list, what: str) -> np.ndarray:
    """The position in ``known`` of each of ``ids``; an id that is not there is an error."""
    known = np.asarray(known, dtype=np.int64)
    order = np.argsort(known, kind="stable")
    at = np.minimum(np.searchsorted(known[order], ids), max(len(known) - 1, 0))
    bad = np.flatnonzero(known[order][at] != ids) if len(known) else np.arange(len(ids))
    if len(bad):
        raise DetpipeError(f"predictions: {what} {int(ids[bad[0]])} is not in the ground truth")
    return order[at]


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of the boxes in the same columns of two ``(4, n)`` arrays (rows ``x1, y1, x2, y2``)."""
    w = np.clip(np.minimum(a[2], b[2]) - np.maximum(a[0], b[0]), 0, None)
    h = np.clip(np.minimum(a[3], b[3]) - np.maximum(a[1], b[1]), 0, None)
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / np.maximum(union, 1e-6)


def _first_per_group(groups: np.ndarray) -> np.ndarray:
    """Indices of the first element of each run of equal values in ``groups``."""
    return np.flatnonzero(np.r_[True, groups[1:] != groups[:-1]]) if len(groups) else np.zeros(0, np.int64)


def average_precision(recall: np.ndarray, precision: np.ndarray) -> tuple[float, float]:
    """``(area AP, 11-point AP)`` of one class's recall and precision after each detection in score order."""
    mrec = np.r_[0.0, recall, 1.0]
    mpre = np.maximum.accumulate(np.r_[0.0, precision, 0.0][::-1])[::-1]  # the precision envelope
    steps = np.flatnonzero(mrec[1:] != mrec[:-1])
    area = float(np.sum((mrec[steps + 1] - mrec[steps]) * mpre[steps + 1]))
    return area, float(np.mean(_interpolated(recall, precision, VOC07_RECALLS)))


def _interpolated(recall: np.ndarray, precision: np.ndarray, at: np.ndarray) -> np.ndarray:
    """The highest precision at a recall of at least each of ``at`` (0 where that recall is never reached)."""
    envelope = np.r_[np.maximum.accumulate(precision[::-1])[::-1], 0.0]
    return envelope[np.searchsorted(recall, at, side="left")]


@dataclass
class Matching:
    """Ground truth (``g_*``, by image, objects before ignore regions) and detections (``d_*``, highest score first,
    ties in list order, so an index is a rank), their same-image pairs (``pair_*``: of the same class, or of a
    detection scoring at least ``score_thr``, as the analyses need) and the VOC flags."""
    gt: dict
    detections: Detections
    g_order: np.ndarray   # position in gt["annotations"]
    g_img: np.ndarray     # position in gt["images"]
    g_cls: np.ndarray     # position in gt["categories"]
    g_ign: np.ndarray
    d_order: np.ndarray   # position in detections
    d_img: np.ndarray
    d_cls: np.ndarray
    score: np.ndarray
    pair_d: np.ndarray
    pair_g: np.ndarray
    pair_iou: np.ndarray
    best_g: np.ndarray    # each detection's most overlapping GT of its class (-1: none in its image)
    tp: np.ndarray
    ignored: np.ndarray   # matched an ignore region: neither true nor false positive

    @property
    def fp(self) -> np.ndarray:
        return ~self.tp & ~self.ignored


def match(gt: dict, detections: Detections | list[dict], iou_thr: float = IOU_THR,
          score_thr: float = SCORE_THR) -> Matching:
    """VOC matching (the module's docstring) of detections (their columns or COCO result dicts) to a COCO dict,
    every image at once."""
    if not isinstance(detections, Detections):
        detections = Detections.from_results(detections)
    anns, n_img = gt["annotations"], len(gt["images"])
    image_ids, cat_ids = [im["id"] for im in gt["images"]], [c["id"] for c in gt["categories"]]
    g_img = _positions(column(anns, "image_id", np.int64), image_ids, "image_id")
    g_ign = np.fromiter((bool(a.get("iscrowd", 0)) for a in anns), dtype=bool, count=len(anns))
    g_order = np.lexsort((np.arange(len(anns)), g_ign, g_img))  # eval_map stacks ignore boxes after the objects
    g_img, g_ign = g_img[g_order], g_ign[g_order]
    g_cls = _positions(column(anns, "category_id", np.int64), cat_ids, "category_id")[g_order]
    g_box = np.take(_xyxy(boxes_xywh(anns)), g_order, axis=1)
    g_start, g_count = np.searchsorted(g_img, np.arange(n_img)), np.bincount(g_img, minlength=n_img)

    n = len(detections)
    d_order = np.argsort(-detections.score, kind="stable")
    score = detections.score[d_order]
    d_img = _positions(detections.image_id, image_ids, "image_id")[d_order]
    d_cls = _positions(detections.category_id, cat_ids, "category_id")[d_order]
    d_box = np.take(_xyxy(detections.bbox), d_order, axis=1)

    per_det = g_count[d_img]  # every (detection, GT of its image) pair, grouped by detection
    pair_d = np.repeat(np.arange(n), per_det)
    pair_g = g_start[d_img][pair_d] + np.arange(len(pair_d)) - np.repeat(np.cumsum(per_det) - per_det, per_det)
    same = d_cls[pair_d] == g_cls[pair_g]
    needed = np.flatnonzero(same | (score[pair_d] >= score_thr))
    pair_d, pair_g, same = pair_d[needed], pair_g[needed], same[needed]
    pair_iou = box_iou(np.take(d_box, pair_d, axis=1), np.take(g_box, pair_g, axis=1))

    sd, sg, si = pair_d[same], pair_g[same], pair_iou[same]
    best_iou, best_g = np.full(n, -1.0), np.full(n, -1)
    if len(sd):
        starts = _first_per_group(sd)
        best_iou[sd[starts]] = np.maximum.reduceat(si, starts)
        at_max = np.flatnonzero(si == best_iou[sd])
        first = at_max[_first_per_group(sd[at_max])]  # the first GT on equal IoU, like argmax
        best_g[sd[first]] = sg[first]
    hit = best_iou >= iou_thr
    ignored = np.zeros(n, dtype=bool)
    ignored[hit] = g_ign[best_g[hit]]
    claims = np.flatnonzero(hit & ~ignored)  # in score order, so each GT's first claimant is its true positive
    tp = np.zeros(n, dtype=bool)
    tp[claims[np.unique(best_g[claims], return_index=True)[1]]] = True
    return Matching(gt, detections, g_order, g_img, g_cls, g_ign, d_order, d_img, d_cls, score,
                    pair_d, pair_g, pair_iou, best_g, tp, ignored)


def voc_ap(m: Matching) -> tuple[dict, list[dict]]:
    """Per class ``{"num_gts", "num_dets", "AP_50", "AP_50_11pt"}`` and the PR-curve rows (classes with GT)."""
    names = [c["name"] for c in m.gt["categories"]]
    num_gts = np.bincount(m.g_cls[~m.g_ign], minlength=len(names))
    by_class = np.argsort(m.d_cls, kind="stable")  # each class's detections, still in score order
    bounds = np.searchsorted(m.d_cls[by_class], np.arange(len(names) + 1))
    tps, fps = np.r_[0, np.cumsum(m.tp[by_class])], np.r_[0, np.cumsum(m.fp[by_class])]
    per_class, curves = {}, []
    for k, name in enumerate(names):
        lo, hi = bounds[k], bounds[k + 1]
        tp, fp = tps[lo + 1:hi + 1] - tps[lo], fps[lo + 1:hi + 1] - fps[lo]
        entry = {"num_gts": int(num_gts[k]), "num_dets": int(hi - lo), "AP_50": None, "AP_50_11pt": None}
        if num_gts[k]:
            recall, precision = tp / max(num_gts[k], EPS), tp / np.maximum(tp + fp, EPS)
            entry["AP_50"], entry["AP_50_11pt"] = average_precision(recall, precision)
            curve = np.round(_interpolated(recall, precision, RECALLS), 4).tolist()
            curves += [{"class": name, "recall": r, "precision": p} for r, p in zip(RECALLS.round(2).tolist(), curve)]
        per_class[name] = entry
    return per_class, curves


def analyse(gt: dict, detections: Detections | list[dict], iou_thr: float = IOU_THR, score_thr: float = SCORE_THR,
            num_worst: int = 10, num_best: int = 5) -> dict:
    """Match ``detections`` (their columns or COCO result dicts) to ``gt`` (a COCO dict) once and derive every
    analysis from it.

    Returns ``{"iou_thr", "score_thr", "mAP_50", "mAP_50_11pt", "per_class": {class: {"num_gts", "num_dets",
    "AP_50", "AP_50_11pt"}}, "pr_curves": [{"class", "recall", "precision"}], "confusion": {"labels", "matrix"},
    "worst_images": [...], "best_images": [...]}``. The PR curves come from the VOC matching: the precision
    envelope (the curve the area AP integrates) sampled at recall 0, 0.01, .., 1.
    """
    m = match(gt, detections, iou_thr, score_thr)
    per_class, curves = voc_ap(m)
    aps = [(c["AP_50"], c["AP_50_11pt"]) for c in per_class.values() if c["num_gts"]]
    confusion, worst, best = errors(m, iou_thr, score_thr, num_worst, num_best)
    return {
        "iou_thr": iou_thr, "score_thr": score_thr,
        "mAP_50": float(np.mean([a for a, _ in aps])) if aps else 0.0,
        "mAP_50_11pt": float(np.mean([e for _, e in aps])) if aps else 0.0,
        "per_class": per_class, "pr_curves": curves,
        "confusion": {"labels": [*per_class, BACKGROUND], "matrix": confusion.tolist()},
        "worst_images": worst, "best_images": best,
    }


def errors(m: Matching, iou_thr: float, score_thr: float, num_worst: int, num_best: int):
    """The confusion matrix and the worst and best images, from the detections scoring at least ``score_thr``.

    The matrix is mmdetection's confusion_matrix.py: each (detection, GT) pair at IoU >= ``iou_thr`` counts in
    [GT class][detected class]; a detection with no such pair counts in [background][its class] (unless it matched
    an ignore region); a GT that no detection of its class overlaps counts in [its class][background]. The images
    use the VOC matching (greedy in score order, so the flags of the confident detections are unchanged): objects
    missed, false positives, and wrong-class detections (false positives that overlap a GT of another class).
    """
    names = [c["name"] for c in m.gt["categories"]]
    k_all, n_img = len(names), len(m.gt["images"])
    sure = m.score >= score_thr
    pd, pg = m.pair_d, m.pair_g
    pair_ok = (m.pair_iou >= iou_thr) & ~m.g_ign[pg] & sure[pd]
    same = m.d_cls[pd] == m.g_cls[pg]
    confusion = np.bincount(m.g_cls[pg[pair_ok]] * (k_all + 1) + m.d_cls[pd[pair_ok]],
                            minlength=(k_all + 1) ** 2).reshape(k_all + 1, k_all + 1)
    overlaps = np.zeros(len(m.score), dtype=bool)
    overlaps[pd[pair_ok]] = True
    confusion[k_all, :k_all] += np.bincount(m.d_cls[sure & ~overlaps & ~m.ignored], minlength=k_all)
    covered = np.zeros(len(m.g_cls), dtype=bool)
    covered[pg[pair_ok & same]] = True
    confusion[:k_all, k_all] += np.bincount(m.g_cls[~m.g_ign & ~covered], minlength=k_all)

    found = np.zeros(len(m.g_cls), dtype=bool)
    found[m.best_g[m.tp & sure]] = True
    missed = ~m.g_ign & ~found
    other = np.flatnonzero(pair_ok & ~same)  # pairs with a GT of another class
    wrong_class = np.zeros(len(m.score), dtype=bool)
    wrong_class[pd[other]] = True
    wrong_class &= m.fp & sure
    false_pos = m.fp & sure & ~wrong_class
    objects, n_missed, n_fp, n_wrong = (np.bincount(where[mask], minlength=n_img) for where, mask in (
        (m.g_img, ~m.g_ign), (m.g_img, missed), (m.d_img, false_pos), (m.d_img, wrong_class)))
    n_errors = n_missed + n_fp + n_wrong
    positions = np.arange(n_img)
    worst = np.lexsort((positions, -n_missed, -n_errors))
    worst = worst[n_errors[worst] > 0][:num_worst]
    best = np.lexsort((positions, -objects))
    best = best[(objects[best] > 0) & (n_errors[best] == 0)][:num_best]

    other = other[np.lexsort((-m.pair_iou[other], pd[other]))]  # each wrong-class detection's best other-class GT
    other = other[_first_per_group(pd[other])]
    actual = dict(zip(pd[other].tolist(), m.g_cls[pg[other]].tolist()))

    def det(d: int) -> dict:
        bbox = [round(v, 2) for v in m.detections.bbox[m.d_order[d]].tolist()]
        return {"class": names[m.d_cls[d]], "bbox": bbox, "score": round(float(m.score[d]), 4)}

    def entry(i: int) -> dict:
        image = m.gt["images"][i]
        gts = np.flatnonzero((m.g_img == i) & missed)
        dts = np.flatnonzero((m.d_img == i) & (false_pos | wrong_class))
        return {
            "image_id": image["id"], "file_name": image.get("file_name"), "objects": int(objects[i]),
            "missed": int(n_missed[i]), "false_positives": int(n_fp[i]), "wrong_class": int(n_wrong[i]),
            "missed_boxes": [{"class": names[m.g_cls[g]], "bbox": m.gt["annotations"][m.g_order[g]]["bbox"]}
                             for g in gts],
            "false_positive_boxes": [det(d) for d in dts if false_pos[d]],
            "wrong_class_boxes": [{**det(d), "actual": names[actual[d]]} for d in dts if wrong_class[d]],
        }

    return confusion, [entry(i) for i in worst], [entry(i) for i in best]


def confusion_rows(confusion: dict) -> list[tuple[str, str]]:
    """One ``(actual, predicted)`` row per count of the matrix: DVC's confusion template counts rows."""
    labels, matrix = confusion["labels"], confusion["matrix"]
    return [(labels[i], labels[j]) for i, row in enumerate(matrix) for j, c in enumerate(row) for _ in range(c)]


def _csv_line(*values) -> str:
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerow(values)
    return out.getvalue()


def write_plots(folder: Path, result: dict) -> None:
    """Write ``folder`` whole: the PR curves (class, recall, precision) and the confusion rows (actual, predicted)."""
    labels, matrix = result["confusion"]["labels"], result["confusion"]["matrix"]
    with atomic_dir(folder) as tmp:
        with open(tmp / PR_CURVES, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["class", "recall", "precision"], lineterminator="\n")
            writer.writeheader()
            writer.writerows(result["pr_curves"])
        lines = [_csv_line(labels[i], labels[j]) * c for i, row in enumerate(matrix) for j, c in enumerate(row) if c]
        (tmp / CONFUSION).write_text(_csv_line("actual", "predicted") + "".join(lines))
