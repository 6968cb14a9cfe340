import contextlib
import copy
import csv
import io
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from detpipe import config
from detpipe.errors import DetpipeError
from detpipe.metrics import BACKENDS, STAT_NAMES, coco_evaluate, run_cocoeval
from tests.conftest import run_stage


def test_perfect_predictions_score_one(tiny_coco):
    gt = json.loads((tiny_coco / "coco/val.json").read_text())
    dets = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9,
             "segmentation": a["segmentation"]} for a in gt["annotations"]]
    for iou_type in ("bbox", "segm"):
        result = coco_evaluate(gt, dets, iou_type)
        assert result["stats"]["mAP_50"] == pytest.approx(1.0)
        present = {c["name"] for c in gt["categories"] if any(a["category_id"] == c["id"] for a in gt["annotations"])}
        assert all(result["per_class"][n]["AP50"] == pytest.approx(1.0) for n in present)


def test_wrong_class_scores_zero_and_no_detections_is_zero(tiny_coco):
    gt = json.loads((tiny_coco / "coco/val.json").read_text())
    k = len(gt["categories"])
    dets = [{"image_id": a["image_id"], "category_id": a["category_id"] % k + 1, "bbox": a["bbox"], "score": 0.9}
            for a in gt["annotations"]]
    assert coco_evaluate(gt, dets)["stats"]["mAP"] == 0.0
    assert coco_evaluate(gt, [])["stats"]["mAP_50"] == 0.0


def test_class_without_ground_truth_has_no_ap(tiny_coco):
    """A class absent from the split (common in small real sets) gets no AP, not an AP of 0."""
    gt = json.loads((tiny_coco / "coco/val.json").read_text())
    gt["categories"].append({"id": 99, "name": "unicorn", "supercategory": "object"})
    dets = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
            for a in gt["annotations"]]
    assert coco_evaluate(gt, dets)["per_class"]["unicorn"] == {"AP": None, "AP50": None}
    assert coco_evaluate(gt, [])["per_class"]["unicorn"] == {"AP": None, "AP50": None}
    first = gt["categories"][0]["name"]
    assert coco_evaluate(gt, [])["per_class"][first] == {"AP": 0.0, "AP50": 0.0}


# ---- hand-computed cases on small COCO dicts ----------------------------------------------------------------------
# COCO's rules used below (pycocotools.cocoeval): IoU thresholds .50:.05:.95 (10), recall points 0:.01:1 (101); a
# detection matches a ground truth at threshold t when IoU >= t; precision is made monotone (the max precision at any
# recall >= r) and read at each recall point, with 0 past the highest recall reached; AP = mean over the 101 points
# (and over IoU thresholds for mAP); -1 means "no ground truth", which detpipe maps to 0 in "stats" (max(v, 0)) and to
# None in "per_class". Precision is tp / (tp + fp + eps), so a perfect AP comes out as 0.9999999999999999: use approx.
# Area ranges use the ground truth's "area" field: small < 32² = 1024 <= medium < 96² = 9216 <= large.


def _ann(ann_id, image_id, category_id, bbox, iscrowd=0):
    # ids start at 1: pycocotools counts a match to a ground truth whose id is 0 as no match (dtm holds the id)
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "bbox": bbox,
            "area": bbox[2] * bbox[3], "iscrowd": iscrowd}


def _gt(annotations, categories=("cat",), num_images=1):
    return {"images": [{"id": i, "file_name": f"{i}.jpg", "width": 640, "height": 480}
                       for i in range(1, num_images + 1)],
            "annotations": annotations,
            "categories": [{"id": k, "name": n, "supercategory": "object"} for k, n in enumerate(categories, 1)]}


def _det(image_id, category_id, bbox, score):
    return {"image_id": image_id, "category_id": category_id, "bbox": bbox, "score": score}


def _pycocotools_stats(gt, detections):
    """COCOeval's 12 summary numbers, run directly (on copies: loadRes and COCOeval add keys to the dicts)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = copy.deepcopy(gt)
        coco_gt.createIndex()
        ev = COCOeval(coco_gt, coco_gt.loadRes(copy.deepcopy(detections)), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return [float(v) for v in ev.stats]


def test_one_box_at_iou_0_626_passes_three_of_ten_thresholds():
    # GT [0,0,100,100] (xywh), detection shifted right by 23: [23,0,100,100].
    # intersection = (100-23)*100 = 7700; union = 10000+10000-7700 = 12300; IoU = 7700/12300 = 77/123 ≈ 0.626.
    # 0.626 >= .50, .55, .60 but < .65: matched at 3 of the 10 thresholds -> AP 1 there (one TP, recall 1,
    # precision 1 at every recall point), AP 0 at the other 7 (the lone detection is a FP, recall 0).
    # mAP = 3/10 = 0.3; AP50 = 1; AP75 = 0. Recall is 1 at 3 thresholds, 0 at 7 -> AR1 = AR10 = AR100 = 0.3.
    # GT area 10000 >= 9216 -> large: mAP_large = AR_large = 0.3; no small/medium GT -> -1 -> 0.
    gt = _gt([_ann(1, 1, 1, [0, 0, 100, 100])])
    result = coco_evaluate(gt, [_det(1, 1, [23, 0, 100, 100], 0.9)])
    stats = result["stats"]
    assert stats["mAP"] == pytest.approx(0.3)
    assert stats["mAP_50"] == pytest.approx(1.0)
    assert stats["mAP_75"] == 0.0
    assert stats["mAP_l"] == pytest.approx(0.3)
    assert stats["mAP_s"] == stats["mAP_m"] == 0.0
    assert stats["AR_100"] == pytest.approx(0.3)
    # per class: AP over all thresholds, AP50 from the IoU=.50 row only (index 0, not 5 = .75 which gives 0)
    assert result["per_class"]["cat"]["AP"] == pytest.approx(0.3)
    assert result["per_class"]["cat"]["AP50"] == pytest.approx(1.0)
    # IoU 0.6129 (shift 24) and 0.6393 (shift 22) give the same: the thresholds, not the exact IoU, decide
    assert coco_evaluate(gt, [_det(1, 1, [24, 0, 100, 100], 0.9)])["stats"]["mAP"] == pytest.approx(0.3)
    # shift 18: IoU 82/118 ≈ 0.695 -> also passes .65 -> 4/10
    assert coco_evaluate(gt, [_det(1, 1, [18, 0, 100, 100], 0.9)])["stats"]["mAP"] == pytest.approx(0.4)


def test_false_positive_scored_above_the_true_positive_halves_ap():
    # One GT [100,100,50,50] (area 2500: medium). Detections, by score: FP 0.9 at [300,300,50,50] (no overlap, same
    # image, same size), then TP 0.8 exactly on the GT (IoU 1, so the same at every threshold).
    # Ranked: FP, TP -> cumulative tp = [0,1], fp = [1,1]; recall = [0, 1]; precision = [0, 0.5].
    # Monotone envelope (max precision at recall >= r): [0.5, 0.5]. Read at the 101 recall points: r = 0 -> first
    # recall >= 0 is index 0 -> 0.5; r in (0,1] -> index 1 -> 0.5. AP = 101*0.5/101 = 0.5 at every IoU threshold.
    # So mAP = mAP50 = mAP75 = AP = AP50 = 0.5 (pycocotools agrees; without the envelope r = 0 would read 0).
    # maxDets is per image and class: AR1 keeps only the top-scored detection, the FP -> AR1 = 0; AR10 = AR100 = 1.
    gt = _gt([_ann(1, 1, 1, [100, 100, 50, 50])])
    dets = [_det(1, 1, [300, 300, 50, 50], 0.9), _det(1, 1, [100, 100, 50, 50], 0.8)]
    result = coco_evaluate(gt, dets)
    stats = result["stats"]
    assert result["per_class"]["cat"] == {"AP": pytest.approx(0.5), "AP50": pytest.approx(0.5)}
    assert stats["mAP"] == stats["mAP_50"] == stats["mAP_75"] == pytest.approx(0.5)
    assert stats["mAP_m"] == pytest.approx(0.5)
    assert stats["mAP_s"] == stats["mAP_l"] == 0.0  # no small/large GT: -1 -> 0
    assert stats["AR_1"] == 0.0
    assert stats["AR_10"] == stats["AR_100"] == stats["AR_m"] == pytest.approx(1.0)
    # the same two detections with the scores swapped: TP first -> precision [1, 0.5] at recall [1, 1] -> AP 1
    swapped = [{**dets[0], "score": 0.8}, {**dets[1], "score": 0.9}]
    assert coco_evaluate(gt, swapped)["per_class"]["cat"]["AP"] == pytest.approx(1.0)


def test_crowd_only_class_has_no_ap_and_crowd_detections_are_not_false_positives():
    # "crowd" has only an iscrowd=1 region [10,10,200,200]: every GT of the class is ignored, so it has no ground
    # truth (npig = 0) -> precision stays -1 -> per-class AP None, and the class is left out of the means.
    # Its detection [20,20,50,50] lies inside the region: for a crowd GT IoU = intersection / detection area
    # = 2500/2500 = 1 -> matched to an ignored GT -> ignored, not a FP.
    # "dog": one GT [300,300,50,50] detected exactly (score 0.7), plus a crowd region [400,50,200,200] with a
    # higher-scored dog detection (0.95) inside it, which is ignored too -> dog ranking is just the TP -> AP 1.
    # mAP = mean over classes with GT = dog's 1.0 (area medium: 2500). (A *dog* detection on the "crowd" region
    # would be a dog FP: crowd regions only excuse detections of their own class.)
    gt = _gt([_ann(1, 1, 1, [10, 10, 200, 200], iscrowd=1), _ann(2, 1, 2, [300, 300, 50, 50]),
              _ann(3, 1, 2, [400, 50, 200, 200], iscrowd=1)], categories=("crowd", "dog"))
    dets = [_det(1, 1, [20, 20, 50, 50], 0.9), _det(1, 2, [450, 100, 60, 60], 0.95),
            _det(1, 2, [300, 300, 50, 50], 0.7)]
    result = coco_evaluate(gt, dets)
    assert result["per_class"]["crowd"] == {"AP": None, "AP50": None}
    assert result["per_class"]["dog"] == {"AP": pytest.approx(1.0), "AP50": pytest.approx(1.0)}
    assert result["stats"]["mAP"] == pytest.approx(1.0)
    assert result["stats"]["AR_100"] == pytest.approx(1.0)
    # without any detection at all, detpipe's shortcut gives the same None for the crowd-only class
    assert coco_evaluate(gt, [])["per_class"]["crowd"] == {"AP": None, "AP50": None}
    # control: the 0.95 detection outside the dog crowd region is a FP ranked first -> dog AP 0.5 (as above)
    moved = [dets[0], _det(1, 2, [100, 300, 60, 60], 0.95), dets[2]]
    assert coco_evaluate(gt, moved)["stats"]["mAP"] == pytest.approx(0.5)


def test_small_object_missed_large_object_found():
    # small GT [10,10,20,20] (area 400 < 1024), large GT [100,100,120,120] (area 14400 >= 9216); one detection,
    # exactly on the large one.
    # all areas: 2 GT, 1 TP -> recall 0.5, precision 1. Recall points 0, .01, ..., .50 (51 of 101) read 1, the
    # 50 above 0.5 read 0 -> AP = 51/101 ≈ 0.50495 (not 0.5) at every threshold -> mAP = mAP50 = 51/101.
    # large: the small GT is outside the range (ignored) -> 1 GT, 1 TP -> mAP_large = 1, AR_large = 1.
    # small: 1 GT, and the detection matches the (ignored there) large GT -> ignored -> no detections; the class
    # has GT in this range, so pycocotools reports a real 0, not -1: mAP_small = 0, AR_small = 0.
    # medium: no GT -> pycocotools -1 -> detpipe 0.0 (max(v, 0)).
    # AR100 = recall 0.5 at every threshold = 0.5.
    gt = _gt([_ann(1, 1, 1, [10, 10, 20, 20]), _ann(2, 1, 1, [100, 100, 120, 120])])
    dets = [_det(1, 1, [100, 100, 120, 120], 0.9)]
    stats = coco_evaluate(gt, dets)["stats"]
    raw = dict(zip(STAT_NAMES, _pycocotools_stats(gt, dets)))
    assert stats["mAP"] == stats["mAP_50"] == pytest.approx(51 / 101)
    assert stats["mAP_l"] == pytest.approx(1.0)
    assert stats["AR_l"] == pytest.approx(1.0)
    assert stats["AR_100"] == pytest.approx(0.5)
    assert raw["mAP_s"] == 0.0 and stats["mAP_s"] == 0.0
    assert raw["AR_s"] == 0.0 and stats["AR_s"] == 0.0
    assert raw["mAP_m"] == -1.0 and stats["mAP_m"] == 0.0  # -1 (no GT) is reported as 0.0
    assert raw["AR_m"] == -1.0 and stats["AR_m"] == 0.0


def _random_coco(seed):
    """~20 images, 3 classes, some crowd regions; detections: jittered GT copies, misses, and random FPs."""
    rng = np.random.default_rng(seed)
    images, annotations, dets = [], [], []
    for image_id in range(1, 21):
        images.append({"id": image_id, "file_name": f"{image_id}.jpg", "width": 640, "height": 480})
        crowded = image_id <= 3  # over 10 objects: AR10 and AR100 differ
        for _ in range(rng.integers(16, 21) if crowded else rng.integers(0, 6)):
            w, h = (float(v) for v in rng.uniform(8, 200, 2))  # small, medium and large areas
            x, y = float(rng.uniform(0, 640 - w)), float(rng.uniform(0, 480 - h))
            cat, crowd = 1 if crowded else int(rng.integers(1, 4)), int(rng.random() < 0.15)
            annotations.append(_ann(len(annotations) + 1, image_id, cat, [x, y, w, h], iscrowd=crowd))
            if rng.random() < 0.8:  # found, with a jitter of up to a tenth of the size
                jx, jy, jw, jh = rng.uniform(-0.1, 0.1, 4) * [w, h, w, h]
                dets.append(_det(image_id, cat, [x + jx, y + jy, w + jw, h + jh], float(rng.random())))
        for _ in range(rng.integers(0, 3)):  # false positives anywhere
            w, h = (float(v) for v in rng.uniform(8, 200, 2))
            dets.append(_det(image_id, int(rng.integers(1, 4)),
                             [float(rng.uniform(0, 640 - w)), float(rng.uniform(0, 480 - h)), w, h],
                             float(rng.random())))
    gt = {"images": images, "annotations": annotations,
          "categories": [{"id": k, "name": f"class{k}", "supercategory": "object"} for k in (1, 2, 3)]}
    return gt, dets


@pytest.mark.parametrize("seed", [0, 1])
def test_stats_equal_pycocotools_run_directly(seed):
    gt, dets = _random_coco(seed)
    assert any(a["iscrowd"] for a in gt["annotations"])
    expected = [max(v, 0.0) for v in _pycocotools_stats(gt, dets)]
    result = coco_evaluate(copy.deepcopy(gt), copy.deepcopy(dets))
    assert list(result["stats"]) == list(STAT_NAMES)
    assert [result["stats"][k] for k in STAT_NAMES] == expected
    # the data must tell the stats apart, or a swapped order would pass unnoticed
    assert len({round(v, 9) for v in expected}) == 12


# ---- the fast backend against pycocotools, bit for bit ------------------------------------------------------------

def _polygon(x, y, w, h, rng):
    """A closed outline of 10 points inside the box (an ellipse with a ragged edge)."""
    t = np.linspace(0, 2 * np.pi, 10, endpoint=False)
    r = rng.uniform(0.7, 1.0, 10)
    return [[float(v) for xy in zip(x + w / 2 * (1 + r * np.cos(t)), y + h / 2 * (1 + r * np.sin(t))) for v in xy]]


def _uncompressed_rle(mask):
    """COCO's crowd format: run lengths (zeros first) of the column-major pixels, as a plain list."""
    flat = np.asfortranarray(mask).ravel(order="F")
    changes = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate([[0], changes, [flat.size]])).tolist()
    return {"size": list(mask.shape), "counts": ([0] if flat[0] else []) + runs}


def _hard_coco(seed):
    """Every case the two libraries could disagree on: crowd regions (boxes and uncompressed RLE), images with no
    ground truth, images with no detection, a class with detections but no ground truth and one with neither, scores
    drawn from 5 values (many ties, within and across images), small/medium/large objects, an image with more than
    100 detections, ground-truth outlines as polygons and compressed RLE, detections as RLE masks with boxes (what
    engine.predict writes)."""
    from pycocotools import mask as mask_utils

    rng = np.random.default_rng(seed)
    width, height = 320, 240
    images, annotations, dets = [], [], []
    for image_id in range(1, 31):
        images.append({"id": image_id, "file_name": f"{image_id}.jpg", "width": width, "height": height})
        no_gt, no_dets = image_id % 7 == 0, image_id % 5 == 0
        for _ in range(0 if no_gt else rng.integers(1, 7)):
            w, h = (float(v) for v in rng.choice([6.0, 20.0, 50.0, 130.0]) * rng.uniform(0.6, 1.4, 2))
            w, h = min(w, width - 2), min(h, height - 2)
            x, y = float(rng.uniform(0, width - w)), float(rng.uniform(0, height - h))
            cat, crowd = int(rng.integers(1, 4)), int(rng.random() < 0.12)
            pixels = np.zeros((height, width), np.uint8)
            pixels[int(y):int(y + h), int(x):int(x + w)] = 1
            area = float(pixels.sum())
            if crowd:
                segmentation = _uncompressed_rle(pixels)
            elif rng.random() < 0.3:
                rle = mask_utils.encode(np.asfortranarray(pixels))
                segmentation = {"size": rle["size"], "counts": rle["counts"].decode()}
            else:
                segmentation = _polygon(x, y, w, h, rng)
                area = float(mask_utils.area(mask_utils.frPyObjects(segmentation, height, width))[0])
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": cat,
                                "bbox": [x, y, w, h], "area": area, "iscrowd": crowd, "segmentation": segmentation})
            if not no_dets and rng.random() < 0.85:
                jx, jy, jw, jh = rng.uniform(-0.15, 0.15, 4) * [w, h, w, h]
                dets.append(_mask_det(image_id, cat if rng.random() < 0.9 else 4,  # class 4: no ground truth
                                      [x + jx, y + jy, w + jw, h + jh], rng, width, height))
        if not no_dets:
            for _ in range(120 if image_id == 1 else rng.integers(0, 4)):  # false positives; image 1: >100 dets
                w, h = (float(v) for v in rng.uniform(4, 150, 2))
                box = [float(rng.uniform(0, width - w)), float(rng.uniform(0, height - h)), w, h]
                dets.append(_mask_det(image_id, int(rng.integers(1, 5)), box, rng, width, height))
    categories = [{"id": k, "name": f"class{k}", "supercategory": "object"} for k in (1, 2, 3, 4, 5)]
    return {"images": images, "annotations": annotations, "categories": categories}, dets


def _mask_det(image_id, cat, box, rng, width, height):
    from pycocotools import mask as mask_utils

    x, y, w, h = (round(max(v, 1.0), 2) for v in box)
    pixels = np.zeros((height, width), np.uint8)
    pixels[int(y):int(y + h), int(x):int(x + w)] = 1
    pixels[int(y):int(y + h // 3), int(x):int(x + w // 3)] = 0  # a notched mask: its IoU differs from the box's
    rle = mask_utils.encode(np.asfortranarray(pixels))
    return {"image_id": image_id, "category_id": cat, "bbox": [x, y, w, h],
            "score": float(rng.choice([0.3, 0.5, 0.5, 0.7, 0.9])),
            "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()}}


def _reference(gt, dets, iou_type):
    """pycocotools run directly, on deep copies (it writes into the dicts)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = copy.deepcopy(gt)
        coco_gt.createIndex()
        ev = COCOeval(coco_gt, coco_gt.loadRes(copy.deepcopy(dets)), iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_fast_backend_is_bit_identical_to_pycocotools(seed, iou_type):
    gt, dets = _hard_coco(seed)
    gt_before, dets_before = copy.deepcopy(gt), copy.deepcopy(dets)
    expected = _reference(gt, dets, iou_type)
    ev = run_cocoeval(gt, dets, iou_type, backend="ultrafast")
    assert type(ev).__module__.startswith("ultrafast_pycocotools")
    assert [float(v) for v in ev.stats] == [float(v) for v in expected.stats]
    for key in ("precision", "recall", "scores"):
        assert ev.eval[key].shape == expected.eval[key].shape
        assert np.array_equal(ev.eval[key], expected.eval[key]), key
    assert coco_evaluate(gt, dets, iou_type, "ultrafast") == coco_evaluate(gt, dets, iou_type, "pycocotools")
    assert gt == gt_before and dets == dets_before  # neither library changed the caller's dicts
    # the fixture really holds the hard cases
    stats = dict(zip(STAT_NAMES, expected.stats))
    assert min(stats[k] for k in ("mAP_s", "mAP_m", "mAP_l")) > 0  # every area range has matches
    precision = expected.eval["precision"]
    assert (precision[:, :, 3, 0, -1] == -1).all() and (precision[:, :, 4, 0, -1] == -1).all()  # classes w/o GT
    assert any(d["category_id"] == 4 for d in dets)
    with_gt, with_dets = {a["image_id"] for a in gt["annotations"]}, {d["image_id"] for d in dets}
    assert with_dets - with_gt and with_gt - with_dets  # images with detections but no GT, and the other way round
    assert any(a["iscrowd"] for a in gt["annotations"]) and len({d["score"] for d in dets}) < 6  # crowds, ties
    assert sum(d["image_id"] == 1 for d in dets) > 100


def test_backends_agree_on_the_hand_computed_cases():
    gt = _gt([_ann(1, 1, 1, [10, 10, 20, 20]), _ann(2, 1, 1, [100, 100, 120, 120]),
              _ann(3, 1, 1, [300, 50, 200, 200], iscrowd=1)])
    dets = [_det(1, 1, [100, 100, 120, 120], 0.9), _det(1, 1, [320, 60, 50, 50], 0.9), _det(1, 1, [0, 0, 9, 9], 0.9)]
    assert coco_evaluate(gt, dets, backend="ultrafast") == coco_evaluate(gt, dets, backend="pycocotools")


def _count_calls(monkeypatch, cls) -> list:
    calls = []
    original = cls.evaluate
    monkeypatch.setattr(cls, "evaluate", lambda self: (calls.append(type(self)), original(self))[1])
    return calls


def test_the_backend_switch_picks_the_library(monkeypatch):
    import pycocotools.cocoeval
    import ultrafast_pycocotools

    slow = _count_calls(monkeypatch, pycocotools.cocoeval.COCOeval)
    fast = _count_calls(monkeypatch, ultrafast_pycocotools.COCOeval)
    gt = _gt([_ann(1, 1, 1, [0, 0, 100, 100])])
    dets = [_det(1, 1, [23, 0, 100, 100], 0.9)]
    coco_evaluate(gt, dets, backend="pycocotools")
    assert (len(slow), len(fast)) == (1, 0)
    coco_evaluate(gt, dets)  # the default
    assert (len(slow), len(fast)) == (1, 1)
    with pytest.raises(ValueError, match="hotcoco"):
        coco_evaluate(gt, dets, backend="hotcoco")


def test_config_backends_are_the_ones_metrics_runs(tiny_params):
    assert config.SCHEMA["evaluate"]["backend"].kind == BACKENDS
    assert config.load(tiny_params).evaluate.backend == "ultrafast"
    with pytest.raises(DetpipeError, match="evaluate.backend"):
        config.load(tiny_params, ["evaluate.backend=hotcoco"])


def test_train_and_evaluate_stages_score_with_pycocotools_when_asked(converted, tmp_path):
    """With evaluate.backend: pycocotools neither the train stage's validation nor the evaluate stage may import
    ultrafast_pycocotools: a stand-in that fails on import is put first on the path, and both stages still score."""
    cwd = tmp_path / "p"
    shutil.copytree(converted, cwd)
    poison = tmp_path / "poison/ultrafast_pycocotools"
    poison.mkdir(parents=True)
    (poison / "__init__.py").write_text("raise ImportError('ultrafast_pycocotools used with backend pycocotools')\n")
    env = {"PYTHONPATH": str(poison.parent)}
    flags = ["--set", "evaluate.backend=pycocotools", "--set", "model.score_thresh=0.0", "--set",
             "evaluate.score_thr=0.0"]  # an untrained model's low scores: detections to score
    result = run_stage("train", cwd, *flags, env=env)
    assert result.returncode == 0, result.stderr
    with open(cwd / "runs/train/train_log.csv") as f:
        assert next(csv.DictReader(f))["val/bbox_mAP"] != ""
    result = run_stage("evaluate", cwd, *flags, env=env)
    assert result.returncode == 0, result.stderr
    metrics = json.loads((cwd / "runs/eval/metrics.json").read_text())
    assert metrics["num_detections"] > 0 and "bbox_mAP" in metrics
    # control: the stand-in is what the stages would have imported
    result = subprocess.run([sys.executable, "-c", "import ultrafast_pycocotools"], capture_output=True, text=True,
                            env={**os.environ, **env})
    assert result.returncode == 1 and "used with backend pycocotools" in result.stderr


def test_the_evaluation_benchmark_runs_at_a_toy_size(tmp_path):
    """benchmarks/bench_eval on 20 images: both backends agree exactly, every step is timed, the JSON is written."""
    out = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, "-m", "benchmarks.bench_eval", "--images", "20", "--dets", "10",
                           "--classes", "5", "--repeats", "1", "--json", str(out)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["identical"] is True and result["detections"] == 200
    steps = ("pycocotools", BACKENDS[0], "per_class", "stage_files", "own_work", "while_predicting", "columns",
             "results", "predictions_format", "predictions_write", "voc_analysis", "voc_analysis_from_dicts",
             "end_to_end", "end_to_end_at_once", "end_to_end_one_by_one")
    assert all(result["seconds"][k]["cpu"] >= 0 for k in steps) and result["seconds"]["pycocotools"]["cpu"] > 0
    assert set(result["peak_mib"]) == {"end_to_end", "end_to_end_at_once", "end_to_end_one_by_one", "result_dicts",
                                       "columns"} and all(v > 0 for v in result["peak_mib"].values())  # MiB, 3 digits
    assert "own work / library time" in done.stdout and "all three ways: yes" in done.stdout


@pytest.mark.parametrize("digits", [2, 4])
def test_round_as_python_is_pythons_round_bit_for_bit(digits):
    """Halves exact and inexact (x.xx5 from float32, k/200), box widths of float32 corners, negatives, zeros,
    huge values, infinities and NaN."""
    from detpipe.metrics import round_as_python

    rng = np.random.default_rng(digits)
    corners = rng.uniform(0, 2000, (200_000, 2)).astype(np.float32).astype(np.float64)
    values = np.concatenate([
        rng.uniform(0, 2000, 200_000).astype(np.float32).astype(np.float64),
        (rng.integers(0, 200_000, 200_000) / 10**digits + 0.5 / 10**digits).astype(np.float32).astype(np.float64),
        rng.integers(0, 400_000, 200_000) / (2 * 10**digits),  # halves, exact or nearly
        corners[:, 1] - corners[:, 0], rng.uniform(-5, 5, 10_000), rng.uniform(0, 1, 10_000),
        [0.0, -0.0, 0.125, 0.375, 2.675, 1e300, -1e300, 1.8e307, 2.0**53 + 2, 2.0**52 / 10**digits + 0.5,
         1e-320, -1e-320, np.inf, -np.inf, np.nan], rng.uniform(0, 9000, 200_000)])
    with np.errstate(all="raise"):  # no floating-point warning escapes
        got = round_as_python(values, digits)
    want = np.array([round(v, digits) for v in values.tolist()])
    assert got.tobytes() == want.tobytes()  # bits: -0.0 and NaN included
    float32 = rng.uniform(0, 1, 1000).astype(np.float32)  # computed as the Python floats they equal
    assert round_as_python(float32, digits).tolist() == [round(v, digits) for v in float32.tolist()]


def test_round_as_python_refuses_digits_it_cannot_scale_exactly():
    from detpipe.metrics import round_as_python

    with pytest.raises(ValueError, match="digits must be 0 to 15"):
        round_as_python(np.zeros(3), 16)


def test_round_as_python_rounds_a_single_number_as_round_does():
    """0-d input (a float, a numpy scalar): near a half it goes to Python's round too."""
    from detpipe.metrics import round_as_python

    for value in (2.675, 0.125, np.float64(1.005), np.array(-2.675)):
        got = round_as_python(value, 2)
        assert got.shape == () and float(got) == round(float(value), 2)


def test_detections_results_leave_the_garbage_collector_as_they_found_it():
    import gc

    from detpipe.metrics import Detections

    outputs = [(7, np.array([[1.0, 2.0, 11.5, 22.25]], dtype=np.float32), np.array([0.91234], dtype=np.float32),
                np.array([2]))]
    want = [{"image_id": 7, "category_id": 20, "bbox": [1.0, 2.0, 10.5, 20.25], "score": 0.9123}]
    dets = Detections.from_outputs(outputs, [10, 20])
    assert gc.isenabled() and dets.results() == want and gc.isenabled()
    gc.disable()
    try:
        assert dets.results() == want and not gc.isenabled()
    finally:
        gc.enable()
    empty = Detections.from_outputs([], [10, 20])
    assert empty.results() == [] and len(empty) == 0 and empty.bbox.shape == (0, 4)
    both = Detections.concat([dets, empty, dets])
    assert both.results() == want * 2 and Detections.from_results(want * 2).results() == want * 2
