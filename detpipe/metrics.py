"""COCO metrics: summary stats, per-class AP and per-image predictions, scored by pycocotools or a faster library.

``backend`` picks the library that runs COCOeval: ``ultrafast`` is ultrafast-pycocotools (a Rust port that gives
bit-identical stats and precision/recall arrays, ~90x faster on 500k detections: docs/performance.md;
tests/test_metrics.py checks the equality), ``pycocotools`` the reference implementation.
"""

from __future__ import annotations

import contextlib
import gc
import io
import tempfile
from pathlib import Path

import numpy as np
import orjson

# COCOeval's 12 summary numbers, in its order; with the IoU type in front they are the metric names used
# everywhere (metrics.json, MLflow, train_log.csv, the report): bbox_mAP, bbox_mAP_50, ..., segm_AR_l.
STAT_NAMES = ("mAP", "mAP_50", "mAP_75", "mAP_s", "mAP_m", "mAP_l",
              "AR_1", "AR_10", "AR_100", "AR_s", "AR_m", "AR_l")
BACKENDS = ("ultrafast", "pycocotools")


def named_stats(results: dict) -> dict[str, float]:
    """``{iou_type: coco_evaluate result}`` -> the flat, stable names: ``{"bbox_mAP": .., "bbox_mAP_50": .., ...}``."""
    return {f"{t}_{k}": v for t, r in results.items() for k, v in r["stats"].items()}


def library(backend: str) -> tuple[type, type]:
    """The ``COCO`` and ``COCOeval`` classes of ``backend``."""
    if backend == "pycocotools":
        from pycocotools.coco import COCO  # heavy: imported when scoring, not when the module loads
        from pycocotools.cocoeval import COCOeval
    elif backend == "ultrafast":
        from ultrafast_pycocotools import COCO, COCOeval
    else:
        raise ValueError(f"unknown COCO evaluation backend {backend!r}; choose one of {BACKENDS}")
    return COCO, COCOeval


def coco_results(outputs: list[tuple[int, np.ndarray, np.ndarray, np.ndarray]], cat_ids: list[int]) -> list[dict]:
    """Detections as COCO result dicts. ``outputs``: per image (its id, boxes x1 y1 x2 y2, scores, labels with
    1 = the first class); ``bbox`` becomes x, y, w, h rounded to 0.01 px, ``score`` is rounded to 1e-4, the label
    becomes its id of ``cat_ids``.

    The values are those of Python's ``round`` on each number as a Python float (:func:`round_as_python`),
    computed for all images at once, with the garbage collector paused: 500k detections in ~0.35 s instead of
    2.6 s one at a time; everything the evaluate stage does after the model, 1.6 s instead of 4.0
    (docs/performance.md).
    """
    if not outputs:
        return []
    ids = np.concatenate([np.full(len(scores), image_id, dtype=np.int64) for image_id, _, scores, _ in outputs])
    boxes = np.concatenate([np.asarray(b, dtype=np.float64).reshape(-1, 4) for _, b, _, _ in outputs])
    scores = np.concatenate([np.asarray(s, dtype=np.float64).reshape(-1) for _, _, s, _ in outputs])
    labels = np.concatenate([np.asarray(la, dtype=np.int64).reshape(-1) for *_, la in outputs])
    xywh = round_as_python(np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1), 2)
    scores, cats = round_as_python(scores, 4), np.asarray(cat_ids, dtype=object)[labels - 1]  # ids as given
    with _collector_paused():  # millions of new objects, no cycle among them: the collector would rescan the heap
        return [{"image_id": i, "category_id": c, "bbox": b, "score": s}
                for i, c, b, s in zip(ids.tolist(), cats.tolist(), xywh.tolist(), scores.tolist())]


@contextlib.contextmanager
def _collector_paused():
    enabled = gc.isenabled()
    try:
        gc.disable()
        yield
    finally:
        if enabled:
            gc.enable()


def round_as_python(values: np.ndarray, digits: int) -> np.ndarray:
    """``round(float(v), digits)`` for every element, bit for bit, vectorised (float64; ``digits`` 0 to 15).

    ``rint(v * 10**digits) / 10**digits`` is that wherever the product lies off a half by more than 8 times its
    one rounding error (which then cannot move it across), and the exact division gives the double nearest the
    decimal, as ``round`` does. Elements nearer a half, huge or not finite are handed to ``round`` itself
    (tests/test_metrics.py)."""
    if not 0 <= digits <= 15:
        raise ValueError(f"digits must be 0 to 15, got {digits}")
    values = np.asarray(values, dtype=np.float64)
    scale = 10.0 ** digits
    with np.errstate(all="ignore"):
        scaled = values * scale
        out = np.rint(scaled) / scale
        near = ~(np.abs(scaled - np.floor(scaled) - 0.5) > 2.0 ** -50 * np.maximum(1.0, np.abs(scaled)))
        near |= ~(np.abs(scaled) < 2.0 ** 52)
    slow = np.flatnonzero(near)
    if slow.size:
        out.flat[slow] = [round(v, digits) for v in values.flat[slow].tolist()]
    return out


def write_inputs(folder: Path, gt: dict, detections: list[dict]) -> tuple[Path, Path]:
    """``gt.json`` and ``detections.json`` in ``folder``: what the library reads.

    Files, not the dicts: both libraries write fields (``area``, ``id``, ``segmentation``, ``ignore``) into the
    annotations they are given, and reading a file is how they are used everywhere (ultrafast-pycocotools parses
    box files natively, faster than copying the dicts).
    """
    files = folder / "gt.json", folder / "detections.json"
    for path, data in zip(files, (gt, detections)):
        write_json_bytes(path, data)
    return files


def write_json_bytes(path: Path, data) -> None:
    """One line of JSON by orjson (500k detections ~10x faster than the json module). orjson writes each float's
    shortest exact form, so the libraries read back the very same numbers (numpy values as the Python numbers
    they equal)."""
    path.write_bytes(orjson.dumps(data, default=_plain, option=orjson.OPT_APPEND_NEWLINE))  # no 40 MB copy for "\n"


def _plain(value):
    if isinstance(value, np.generic | np.ndarray):
        return value.tolist()  # a float32 becomes the float64 it equals, as the libraries' arrays would hold it
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def score_files(gt_file: Path, detections_file: Path, iou_type: str, backend: str):
    """The library's work: load both files, evaluate, accumulate, summarize (its printing muted); its COCOeval."""
    COCO, COCOeval = library(backend)
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(str(gt_file))
        ev = COCOeval(coco_gt, coco_gt.loadRes(str(detections_file)), iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev


def run_cocoeval(gt: dict, detections: list[dict], iou_type: str = "bbox", backend: str = "ultrafast"):
    """``backend``'s ``COCOeval`` after scoring ``detections`` (not empty: pycocotools cannot load none)."""
    library(backend)  # an unknown name fails before any file is written
    with tempfile.TemporaryDirectory(prefix="detpipe-coco-") as tmp:
        return score_files(*write_inputs(Path(tmp), gt, detections), iou_type, backend)


def per_class_ap(ev, names: dict) -> dict:
    """``{class name: {"AP": .., "AP50": ..}}`` from a scored COCOeval; ``names``: category id -> name."""
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
    return per_class


def coco_evaluate(gt: dict, detections: list[dict], iou_type: str = "bbox", backend: str = "ultrafast", *,
                  files: tuple[Path, Path] | None = None) -> dict:
    """Return ``{"stats": {name: value}, "per_class": {class: {"AP": .., "AP50": ..}}}``.

    ``files``: ``gt`` and ``detections`` as they already are on disk (the split's COCO file, the stage's
    ``predictions.json``): the library reads those instead of copies written for it.
    With no detections at all pycocotools cannot build its results object, so every metric is 0.
    """
    names = {c["id"]: c["name"] for c in gt["categories"]}
    if not detections:
        present = {a["category_id"] for a in gt["annotations"] if not a.get("iscrowd")}
        per_class = {n: dict.fromkeys(("AP", "AP50"), 0.0 if cid in present else None) for cid, n in names.items()}
        return {"stats": dict.fromkeys(STAT_NAMES, 0.0), "per_class": per_class}
    ev = score_files(*files, iou_type, backend) if files else run_cocoeval(gt, detections, iou_type, backend)
    stats = {k: max(float(v), 0.0) for k, v in zip(STAT_NAMES, ev.stats)}
    return {"stats": stats, "per_class": per_class_ap(ev, names)}
