"""COCO metrics: summary stats, per-class AP and per-image predictions, scored by pycocotools or a faster library.

``backend`` picks the library that runs COCOeval: ``ultrafast`` is ultrafast-pycocotools (a Rust port that gives
bit-identical stats and precision/recall arrays, ~90x faster on 500k detections: docs/performance.md;
tests/test_metrics.py checks the equality), ``pycocotools`` the reference implementation.
Two inputs the convert stage never writes break that equality: a ground-truth annotation with id 0 (pycocotools
takes a match to it for no match) and detection masks of another size than their image (ultrafast-pycocotools
0.1.14 never returns; ``engine.predict`` refuses such images).
"""

from __future__ import annotations

import contextlib
import gc
import io
import tempfile
from dataclasses import dataclass
from itertools import chain
from operator import itemgetter
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


@dataclass(frozen=True, eq=False)  # arrays: no element-wise == or hash
class Detections:
    """Detections as columns, one row each: the values of their COCO result dicts (image id, category id, ``bbox``
    x, y, w, h, ``score``). 56 bytes a detection where a result dict takes ~460: 500k detections of a COCO-sized
    val set are 27 MiB instead of 221 (docs/performance.md)."""
    image_id: np.ndarray     # int64
    category_id: np.ndarray  # int64
    bbox: np.ndarray         # float64, (n, 4)
    score: np.ndarray        # float64

    def __len__(self) -> int:
        return len(self.score)

    @classmethod
    def from_outputs(cls, outputs: list[tuple[int, np.ndarray, np.ndarray, np.ndarray]],
                     cat_ids: list[int]) -> Detections:
        """A model's outputs, per image (its id, boxes x1 y1 x2 y2, scores, labels with 1 = the first class), as
        ``engine.predict`` writes them: ``bbox`` rounded to 0.01 px and ``score`` to 1e-4 as Python's ``round``
        rounds each number (:func:`round_as_python`), the label made its id of ``cat_ids``."""
        if not outputs:
            return cls.concat([])
        ids = np.concatenate([np.full(len(scores), image_id, dtype=np.int64) for image_id, _, scores, _ in outputs])
        boxes = np.concatenate([np.asarray(b, dtype=np.float64).reshape(-1, 4) for _, b, _, _ in outputs])
        scores = np.concatenate([np.asarray(s, dtype=np.float64).reshape(-1) for _, _, s, _ in outputs])
        labels = np.concatenate([np.asarray(la, dtype=np.int64).reshape(-1) for *_, la in outputs])
        xywh = round_as_python(np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1), 2)
        return cls(ids, np.asarray(cat_ids, dtype=np.int64)[labels - 1], xywh, round_as_python(scores, 4))

    @classmethod
    def from_results(cls, results: list[dict]) -> Detections:
        """COCO result dicts as they are (no rounding)."""
        return cls(column(results, "image_id", np.int64), column(results, "category_id", np.int64),
                   boxes_xywh(results), column(results, "score"))

    @classmethod
    def concat(cls, parts: list[Detections]) -> Detections:
        if not parts:
            return cls(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 4)), np.zeros(0))
        return cls(*(np.concatenate([getattr(p, k) for p in parts]) for k in ("image_id", "category_id", "bbox",
                                                                                  "score")))

    def results(self) -> list[dict]:
        """COCO result dicts, made with the garbage collector paused (they hold no cycle: the collector would
        rescan them again and again as they grow)."""
        with _collector_paused():
            return [{"image_id": i, "category_id": c, "bbox": b, "score": s} for i, c, b, s in
                    zip(self.image_id.tolist(), self.category_id.tolist(), self.bbox.tolist(), self.score.tolist())]


def column(items: list[dict], key: str, dtype=np.float64) -> np.ndarray:
    """``item[key]`` of each of ``items`` as an array."""
    return np.fromiter(map(itemgetter(key), items), dtype=dtype, count=len(items))


def boxes_xywh(items: list[dict]) -> np.ndarray:
    """The COCO ``bbox`` of each of ``items`` as an ``(n, 4)`` array."""
    return np.fromiter(chain.from_iterable(map(itemgetter("bbox"), items)), dtype=np.float64,
                       count=4 * len(items)).reshape(-1, 4)


class ResultsFile:
    """A COCO results file written as detections arrive (``with ResultsFile(path) as f: f.add(dicts)``): one line,
    the very bytes :func:`write_json_bytes` gives for the whole list, without ever holding it. An exception inside
    the ``with`` removes the file."""

    def __init__(self, path: Path):
        self._file = open(path, "wb")  # the callers' outputs are temporary or inside an atomic folder
        self._file.write(b"[")
        self._empty = True

    def add(self, results: list[dict]) -> None:
        if results:
            if not self._empty:
                self._file.write(b",")
            self._file.write(orjson.dumps(results, default=_plain)[1:-1])
            self._empty = False

    def add_detections(self, detections: Detections, segmentations: list[dict] = ()) -> None:
        """``detections`` as result dicts, each with its RLE mask of ``segmentations`` where there are masks."""
        results = detections.results()
        if segmentations and len(segmentations) != len(results):
            raise RuntimeError(f"{len(segmentations)} masks for {len(results)} detections")
        for det, segmentation in zip(results, segmentations):  # mask models: one RLE per detection, in order
            det["segmentation"] = segmentation
        self.add(results)

    def __enter__(self) -> ResultsFile:
        return self

    def __exit__(self, *exc) -> None:
        with self._file:
            if exc[0] is None:
                self._file.write(b"]\n")
                return
        Path(self._file.name).unlink()  # no half-written list left behind


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
    if values.ndim == 0:  # out.flat of a 0-d result would write into a copy
        return round_as_python(values.reshape(1), digits).reshape(())
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


def coco_evaluate(gt: dict, detections: list[dict] | Detections, iou_type: str = "bbox",
                  backend: str = "ultrafast", *, files: tuple[Path, Path] | None = None) -> dict:
    """Return ``{"stats": {name: value}, "per_class": {class: {"AP": .., "AP50": ..}}}``.

    ``files``: ``gt`` and ``detections`` as they already are on disk (the split's COCO file, the stage's
    ``predictions.json``): the library reads those instead of copies written for it, and ``detections`` may be
    their columns. Without ``files``, columns are made result dicts and written for it.
    With no detections at all pycocotools cannot build its results object, so every metric is 0.
    """
    names = {c["id"]: c["name"] for c in gt["categories"]}
    if isinstance(detections, Detections) and not files:
        detections = detections.results()  # the library needs them written as result dicts
    if not detections:
        present = {a["category_id"] for a in gt["annotations"] if not a.get("iscrowd")}
        per_class = {n: dict.fromkeys(("AP", "AP50"), 0.0 if cid in present else None) for cid, n in names.items()}
        return {"stats": dict.fromkeys(STAT_NAMES, 0.0), "per_class": per_class}
    ev = score_files(*files, iou_type, backend) if files else run_cocoeval(gt, detections, iou_type, backend)
    stats = {k: max(float(v), 0.0) for k, v in zip(STAT_NAMES, ev.stats)}
    return {"stats": stats, "per_class": per_class_ap(ev, names)}
