import json

import pytest

from detpipe.metrics import coco_evaluate


def test_perfect_predictions_score_one(tiny_coco):
    gt = json.loads((tiny_coco / "coco/val.json").read_text())
    dets = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9,
             "segmentation": a["segmentation"]} for a in gt["annotations"]]
    for iou_type in ("bbox", "segm"):
        result = coco_evaluate(gt, dets, iou_type)
        assert result["stats"]["mAP50"] == pytest.approx(1.0)
        present = {c["name"] for c in gt["categories"] if any(a["category_id"] == c["id"] for a in gt["annotations"])}
        assert all(result["per_class"][n]["AP50"] == pytest.approx(1.0) for n in present)


def test_wrong_class_scores_zero_and_no_detections_is_zero(tiny_coco):
    gt = json.loads((tiny_coco / "coco/val.json").read_text())
    k = len(gt["categories"])
    dets = [{"image_id": a["image_id"], "category_id": a["category_id"] % k + 1, "bbox": a["bbox"], "score": 0.9}
            for a in gt["annotations"]]
    assert coco_evaluate(gt, dets)["stats"]["mAP"] == 0.0
    assert coco_evaluate(gt, [])["stats"]["mAP50"] == 0.0


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
