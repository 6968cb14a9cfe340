import json

import pytest

from detpipe.evaluation import coco_evaluate


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
