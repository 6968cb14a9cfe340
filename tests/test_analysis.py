"""detpipe.analysis: VOC mAP by hand-computed cases and against a plain-loop transcription of the VOC rules, the
confusion matrix and worst images by hand, and the DVC plots rendered by the real ``dvc plots show`` / ``diff``."""

import csv
import json
import os
import random
import re
import shutil
import subprocess

import pytest
import yaml

from detpipe import analysis
from detpipe.analysis import BACKGROUND, analyse, write_plots
from detpipe.errors import DetpipeError
from detpipe.metrics import STAT_NAMES, named_stats
from detpipe.pipeline import EVAL, PLOTS, STAGES, TRAIN, dvc_yaml
from tests.conftest import BIN, ROOT, run_stage

CLASSES = ["cat", "dog", "cow"]


def coco(boxes_per_image: list[list[tuple]]) -> dict:
    """A COCO dict; each image's boxes are ``(class, x, y, w, h[, crowd])``."""
    anns = [{"image_id": i + 1, "category_id": CLASSES.index(b[0]) + 1, "bbox": list(b[1:5]),
             "iscrowd": int(len(b) > 5 and b[5])} for i, boxes in enumerate(boxes_per_image) for b in boxes]
    for n, ann in enumerate(anns):
        ann["id"] = n + 1
    return {"images": [{"id": i + 1, "file_name": f"{i + 1}.jpg", "width": 100, "height": 100}
                       for i in range(len(boxes_per_image))],
            "categories": [{"id": k + 1, "name": n} for k, n in enumerate(CLASSES)], "annotations": anns}


def det(image: int, cls: str, box: tuple, score: float) -> dict:
    return {"image_id": image, "category_id": CLASSES.index(cls) + 1, "bbox": list(box), "score": score}


def test_area_and_11_point_ap_of_a_known_precision_recall_sequence():
    gt = coco([[("cat", 0, 0, 10, 10), ("cat", 20, 0, 10, 10)]])
    dets = [det(1, "cat", (0, 0, 10, 10), 0.9),    # TP: P 1/1, R 1/2
            det(1, "cat", (50, 50, 10, 10), 0.8),  # FP: P 1/2, R 1/2
            det(1, "cat", (20, 0, 10, 10), 0.7)]   # TP: P 2/3, R 2/2
    # area: the precision envelope is 1 up to recall 1/2, then 2/3: 1/2 * 1 + 1/2 * 2/3 = 5/6
    # 11 points: thresholds 0 .. 0.5 (six) reach precision 1, 0.6 .. 1.0 (five) reach 2/3: (6 + 5 * 2/3) / 11 = 28/33
    cat = analyse(gt, dets)["per_class"]["cat"]
    assert cat == {"num_gts": 2, "num_dets": 3, "AP_50": pytest.approx(5 / 6), "AP_50_11pt": pytest.approx(28 / 33)}


def test_11_point_thresholds_are_k_times_a_tenth_in_floating_point_as_in_mmdetection():
    """3 of 10 objects found, no false positive: recall 0.3 is below the 4th threshold 0.30000000000000004, so
    thresholds 0, 0.1, 0.2 score 1 and the rest 0: 3/11 (exact thresholds would give 4/11)."""
    gt = coco([[("cat", 10 * i, 0, 8, 8) for i in range(10)]])
    dets = [det(1, "cat", (10 * i, 0, 8, 8), 0.9 - i / 10) for i in range(3)]
    result = analyse(gt, dets)
    assert result["per_class"]["cat"]["AP_50_11pt"] == pytest.approx(3 / 11)
    assert result["per_class"]["cat"]["AP_50"] == pytest.approx(0.3)  # precision 1 up to recall 0.3


def test_a_class_without_ground_truth_has_no_ap_and_is_left_out_of_the_map():
    gt = coco([[("cat", 0, 0, 10, 10)], [("dog", 0, 0, 10, 10)]])
    dets = [det(1, "cat", (0, 0, 10, 10), 0.9),   # cat AP 1
            det(2, "cow", (0, 0, 10, 10), 0.8)]   # cow: no ground truth anywhere; dog: never found, AP 0
    result = analyse(gt, dets)
    assert result["per_class"]["cow"] == {"num_gts": 0, "num_dets": 1, "AP_50": None, "AP_50_11pt": None}
    assert result["per_class"]["dog"]["AP_50"] == 0.0
    assert result["mAP_50"] == pytest.approx(0.5) and result["mAP_50_11pt"] == pytest.approx(0.5)  # (1 + 0) / 2
    assert {r["class"] for r in result["pr_curves"]} == {"cat", "dog"}


def test_a_detection_of_an_ignore_region_is_neither_true_nor_false_positive():
    gt = coco([[("cat", 0, 0, 10, 10), ("cat", 20, 0, 10, 10), ("cat", 40, 0, 10, 10, True)]])
    dets = [det(1, "cat", (0, 0, 10, 10), 0.9),    # TP: P 1, R 1/2
            det(1, "cat", (40, 0, 10, 10), 0.8),   # the crowd box: skipped, P and R unchanged
            det(1, "cat", (70, 70, 10, 10), 0.7)]  # FP: P 1/2, R 1/2
    # area: 1/2 * 1 = 1/2 (the crowd box is not an object to find: 2 GT); 11 points: 0 .. 0.5 reach 1: 6/11.
    # Were the crowd detection a false positive, the 11-point AP would be the same but precision would drop to 1/2.
    result = analyse(gt, dets)
    assert result["per_class"]["cat"] == {"num_gts": 2, "num_dets": 3, "AP_50": pytest.approx(0.5),
                                          "AP_50_11pt": pytest.approx(6 / 11)}
    assert result["confusion"]["matrix"][0] == [1, 0, 0, 1]  # the crowd box is not a missed cat either
    assert result["confusion"]["matrix"][3] == [1, 0, 0, 0]  # the stray detection; the crowd one is not counted


def test_an_object_wins_a_tie_with_an_ignore_region():
    """eval_map stacks the ignore boxes after the objects, so argmax picks the object on equal IoU."""
    gt = coco([[("cat", 0, 0, 10, 10, True), ("cat", 0, 0, 10, 10)]])
    assert analyse(gt, [det(1, "cat", (0, 0, 10, 10), 0.9)])["per_class"]["cat"]["AP_50"] == 1.0


def test_a_detection_whose_best_match_is_taken_is_a_false_positive_as_in_voc():
    """VOC (unlike COCO) does not fall back to the second-best ground truth."""
    gt = coco([[("cat", 0, 0, 10, 10), ("cat", 3, 0, 10, 10)]])
    dets = [det(1, "cat", (0, 0, 10, 10), 0.9),  # takes the first box (IoU 1)
            det(1, "cat", (1, 0, 10, 10), 0.8)]  # IoU 9/11 with the first, 0.75 with the second: still a FP
    # P/R: (1, 1/2), (1/2, 1/2): area 1/2
    assert analyse(gt, dets)["per_class"]["cat"]["AP_50"] == pytest.approx(0.5)


def test_iou_uses_widths_without_the_legacy_plus_one():
    """Boxes x 0..2 and 1..3 (height 2): IoU 2 / 6 = 1/3, a miss. With mmdetection 1.x's +1 it would be 6 / 12 = 0.5."""
    gt = coco([[("cat", 0, 0, 2, 2)]])
    result = analyse(gt, [det(1, "cat", (1, 0, 2, 2), 0.9)])
    assert result["per_class"]["cat"]["AP_50"] == 0.0


def test_confusion_matrix_follows_mmdetection_and_feeds_dvc_rows():
    gt = coco([[("cat", 0, 0, 10, 10), ("dog", 50, 50, 10, 10)]])
    dets = [det(1, "cat", (0, 0, 10, 10), 0.9),     # cat as cat
            det(1, "dog", (0, 0, 10, 10), 0.8),     # the same cat as dog: counted too, like confusion_matrix.py
            det(1, "cat", (80, 80, 10, 10), 0.7),   # background as cat
            det(1, "dog", (50, 50, 10, 10), 0.1)]   # below the score threshold: the dog is missed
    result = analyse(gt, dets)
    assert result["confusion"] == {"labels": [*CLASSES, BACKGROUND],
                                   "matrix": [[1, 1, 0, 0], [0, 0, 0, 1], [0, 0, 0, 0], [1, 0, 0, 0]]}
    rows = analysis.confusion_rows(result["confusion"])
    assert sorted(rows) == sorted([("cat", "cat"), ("cat", "dog"), ("dog", BACKGROUND), (BACKGROUND, "cat")])


def test_worst_and_best_images_come_from_the_matching():
    gt = coco([[("cat", 0, 0, 10, 10)],                                 # perfect
               [("cat", 0, 0, 10, 10), ("dog", 50, 50, 10, 10)],        # 1 missed, 1 wrong class, 1 false positive
               [("cat", 0, 0, 10, 10), ("cat", 20, 20, 10, 10)],        # perfect, more objects: the best
               [("dog", 0, 0, 10, 10)]])                                # 1 missed
    dets = [det(1, "cat", (0, 0, 10, 10), 0.9),
            det(2, "dog", (0, 0, 10, 10), 0.8), det(2, "cat", (80, 80, 10, 10), 0.7),
            det(3, "cat", (0, 0, 10, 10), 0.9), det(3, "cat", (20, 20, 10, 10), 0.9)]
    result = analyse(gt, dets)
    worst = result["worst_images"]
    assert [(w["image_id"], w["missed"], w["wrong_class"], w["false_positives"]) for w in worst] == \
        [(2, 2, 1, 1), (4, 1, 0, 0)]  # image 2: its cat (taken by no cat) and its dog are both missed
    assert worst[0]["file_name"] == "2.jpg"
    assert worst[0]["wrong_class_boxes"] == [{"class": "dog", "bbox": [0, 0, 10, 10], "score": 0.8, "actual": "cat"}]
    assert worst[0]["false_positive_boxes"] == [{"class": "cat", "bbox": [80, 80, 10, 10], "score": 0.7}]
    assert sorted(b["class"] for b in worst[0]["missed_boxes"]) == ["cat", "dog"]
    assert [b["image_id"] for b in result["best_images"]] == [3, 1]


def test_no_detections_score_zero_for_classes_with_ground_truth():
    result = analyse(coco([[("cat", 0, 0, 10, 10)], []]), [])
    assert result["mAP_50"] == 0.0 and result["per_class"]["cat"]["AP_50"] == 0.0
    assert result["confusion"]["matrix"][0][3] == 1 and result["best_images"] == []


def test_a_prediction_of_an_unknown_category_is_an_error():
    with pytest.raises(DetpipeError, match="predictions: category_id 9 is not in the ground truth"):
        analyse(coco([[("cat", 0, 0, 10, 10)]]), [{"image_id": 1, "category_id": 9, "bbox": [0, 0, 1, 1],
                                                    "score": 0.5}])


def test_pr_curves_are_the_precision_envelope_at_101_recalls():
    gt = coco([[("cat", 0, 0, 10, 10), ("cat", 20, 0, 10, 10)]])
    dets = [det(1, "cat", (0, 0, 10, 10), 0.9), det(1, "cat", (50, 50, 10, 10), 0.8),
            det(1, "cat", (20, 0, 10, 10), 0.7)]
    rows = analyse(gt, dets)["pr_curves"]
    assert [r["recall"] for r in rows] == [i / 100 for i in range(101)]
    assert [r["precision"] for r in rows] == [1.0] * 51 + [0.6667] * 50  # 1 up to recall 1/2, then 2/3


# ---- against a plain-loop transcription of the rules, on random data with score ties and crowd boxes ----

def iou(a, b):
    ax2, ay2, bx2, by2 = a[0] + a[2], a[1] + a[3], b[0] + b[2], b[1] + b[3]
    inter = max(0.0, min(ax2, bx2) - max(a[0], b[0])) * max(0.0, min(ay2, by2) - max(a[1], b[1]))
    return inter / max(a[2] * a[3] + b[2] * b[3] - inter, 1e-6)


def loop_reference(gt, dets, iou_thr=0.5, score_thr=0.3):
    """Per class and image: detections by score, each to its most overlapping GT (real ones before crowd ones),
    then AP by the envelope and by 11 thresholds; the confusion matrix of confusion_matrix.py's loops."""
    k_all = len(gt["categories"])
    aps, ignored = {}, set()
    order = sorted(range(len(dets)), key=lambda i: (-dets[i]["score"], i))
    for c in range(1, k_all + 1):
        flags, num_gts = {}, 0
        for img in gt["images"]:
            boxes = [a for a in gt["annotations"] if a["image_id"] == img["id"] and a["category_id"] == c]
            boxes = [a for a in boxes if not a["iscrowd"]] + [a for a in boxes if a["iscrowd"]]
            num_gts += sum(not a["iscrowd"] for a in boxes)
            taken = [False] * len(boxes)
            for i in order:
                if dets[i]["image_id"] != img["id"] or dets[i]["category_id"] != c:
                    continue
                ious = [iou(dets[i]["bbox"], a["bbox"]) for a in boxes]
                j = ious.index(max(ious)) if ious else None
                if j is None or ious[j] < iou_thr:
                    flags[i] = (0, 1)
                elif boxes[j]["iscrowd"]:
                    flags[i] = (0, 0)
                    ignored.add(i)
                elif not taken[j]:
                    taken[j], flags[i] = True, (1, 0)
                else:
                    flags[i] = (0, 1)
        tp = fp = 0
        recall, precision = [], []
        for i in (i for i in order if i in flags):
            tp, fp = tp + flags[i][0], fp + flags[i][1]
            recall.append(tp / num_gts if num_gts else 0.0)
            precision.append(tp / (tp + fp) if tp + fp else 0.0)
        if not num_gts:
            continue
        area, last_r = 0.0, 0.0
        for j, r in enumerate(recall):
            area += (r - last_r) * max(precision[j:])
            last_r = r
        eleven = sum(max([p for p, r in zip(precision, recall) if r >= k * 0.1], default=0.0) for k in range(11)) / 11
        aps[c] = (area, eleven)
    matrix = [[0] * (k_all + 1) for _ in range(k_all + 1)]
    for img in gt["images"]:
        real = [a for a in gt["annotations"] if a["image_id"] == img["id"] and not a["iscrowd"]]
        found = [0] * len(real)
        for i, d in enumerate(dets):
            if d["image_id"] != img["id"] or d["score"] < score_thr:
                continue
            hits = 0
            for j, a in enumerate(real):
                if iou(d["bbox"], a["bbox"]) >= iou_thr:
                    hits += 1
                    found[j] += a["category_id"] == d["category_id"]
                    matrix[a["category_id"] - 1][d["category_id"] - 1] += 1
            if not hits and i not in ignored:
                matrix[k_all][d["category_id"] - 1] += 1
        for j, a in enumerate(real):
            matrix[a["category_id"] - 1][k_all] += not found[j]
    return aps, matrix


@pytest.mark.parametrize("seed", range(6))
def test_vectorised_matching_equals_the_loops(seed):
    rng = random.Random(seed)
    images = []
    for _ in range(12):
        boxes = [(rng.choice(CLASSES[:2] if seed % 2 else CLASSES), rng.randrange(0, 60, 6), rng.randrange(0, 60, 6),
                  rng.randrange(6, 30), rng.randrange(6, 30), rng.random() < 0.1) for _ in range(rng.randrange(0, 6))]
        images.append(boxes)
    gt = coco(images)
    dets = []
    for a in gt["annotations"]:
        for _ in range(rng.randrange(0, 3)):  # near-copies (duplicates, shifted boxes), sometimes of another class
            cls = a["category_id"] if rng.random() < 0.8 else rng.randrange(1, 4)
            box = [v + rng.uniform(-3, 3) for v in a["bbox"][:2]] + [v * rng.uniform(0.8, 1.2) for v in a["bbox"][2:]]
            dets.append({"image_id": a["image_id"], "category_id": cls, "bbox": box, "score": rng.randrange(10) / 10})
    for _ in range(20):  # strays
        dets.append({"image_id": rng.randrange(1, 13), "category_id": rng.randrange(1, 4),
                     "bbox": [rng.uniform(0, 80), rng.uniform(0, 80), rng.uniform(4, 20), rng.uniform(4, 20)],
                     "score": rng.randrange(10) / 10})
    rng.shuffle(dets)
    aps, matrix = loop_reference(gt, dets)
    result = analyse(gt, dets)
    for k, name in enumerate(CLASSES):
        got = result["per_class"][name]
        if k + 1 in aps:
            assert (got["AP_50"], got["AP_50_11pt"]) == pytest.approx(aps[k + 1], abs=1e-9), name
        else:
            assert got["AP_50"] is None
    assert result["mAP_50"] == pytest.approx(sum(a for a, _ in aps.values()) / len(aps))
    assert result["confusion"]["matrix"] == matrix


@pytest.mark.slow
def test_the_evaluate_stage_writes_the_analyses(converted, tmp_path):
    cwd = tmp_path / "p"
    shutil.copytree(converted, cwd)
    for stage in ("train", "evaluate"):
        result = run_stage(stage, cwd)
        assert result.returncode == 0, result.stderr
    out = cwd / EVAL
    saved = json.loads((out / "analysis.json").read_text())
    expected = analyse(json.loads((cwd / "data/coco/val.json").read_text()),
                       json.loads((out / "predictions.json").read_text()))
    assert saved["voc_mAP_50"] == expected["mAP_50"] and saved["confusion"] == expected["confusion"]
    assert saved["worst_images"] == expected["worst_images"]
    for name, entry in saved["per_class"].items():
        assert entry["voc_AP_50"] == expected["per_class"][name]["AP_50"]
        assert any(k.startswith("coco_") for k in entry)
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["voc_mAP_50"], metrics["voc_mAP_50_11pt"]) == (expected["mAP_50"], expected["mAP_50_11pt"])
    with open(out / "plots" / analysis.PR_CURVES) as f:
        assert len(list(csv.DictReader(f))) == len(expected["pr_curves"])
    with open(out / "plots" / analysis.CONFUSION) as f:
        assert sorted(map(tuple, list(csv.reader(f))[1:])) == sorted(analysis.confusion_rows(expected["confusion"]))


# ---- DVC plots: the dvc.yaml section, the files the evaluate stage writes, and the real renderer ----

def test_every_plot_is_a_file_a_stage_writes():
    """Snakemake and DVC build the same outputs from the stage table; each plot must be among them, and the eval
    plots are the files write_plots makes in the evaluate stage's plots folder."""
    outs = [o for s in STAGES.values() for o in [*s.outs, *s.metrics]]
    for path in PLOTS:
        assert any(path == o or path.startswith(o + "/") for o in outs), path
    eval_plots = {p.removeprefix(f"{EVAL}/plots/") for p in PLOTS if p.startswith(f"{EVAL}/")}
    assert eval_plots == {analysis.PR_CURVES, analysis.CONFUSION}
    assert f"{EVAL}/plots" in STAGES["evaluate"].dir_outs
    assert yaml.safe_load(dvc_yaml())["plots"] == [{p: props} for p, props in PLOTS.items()]


def write_plot_sources(repo, dets_kept: int):
    gt = coco([[("cat", 0, 0, 10, 10), ("dog", 30, 30, 10, 10)], [("cow", 0, 0, 20, 20)]])
    dets = [det(1, "cat", (0, 0, 10, 10), 0.9), det(1, "dog", (0, 0, 10, 10), 0.6),
            det(2, "cow", (0, 0, 20, 20), 0.8), det(2, "cat", (50, 50, 5, 5), 0.7)][:dets_kept]
    result = analyse(gt, dets)
    write_plots(repo / EVAL / "plots", result)
    val = [f"val/{k}" for k in named_stats({"bbox": {"stats": dict.fromkeys(STAT_NAMES)}})]  # train.py's columns
    (repo / TRAIN).mkdir(parents=True, exist_ok=True)
    (repo / TRAIN / "train_log.csv").write_text(
        "epoch,train/loss," + ",".join(val) + "\n" +
        "".join(f"{e},{2 / e},{','.join(str(dets_kept * e / 100) for _ in val)}\n" for e in (1, 2)))
    (repo / TRAIN / "iter_log.csv").write_text(
        "epoch,iter,lr,loss\n" + "".join(f"1,{i},0.01,{dets_kept + 1 / i}\n" for i in (1, 2, 3)))
    with open(repo / EVAL / "plots" / analysis.PR_CURVES) as f:
        return result, list(csv.DictReader(f))


def rendered(html: str) -> dict[str, list[dict]]:
    """Each plot's title -> the data rows the HTML page embeds."""
    specs = [json.loads(s) for s in re.findall(r"var spec = (.*?);\n", html, re.S)]
    return {s["title"]["text"]: s["data"]["values"] for s in specs}


def test_dvc_plots_show_and_diff_render_the_pipeline_plots(tmp_path):
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "PATH": f"{BIN}:{os.environ['PATH']}",
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    run = lambda *cmd: subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, check=True)  # noqa: E731
    run("git", "init", "-q")
    run("dvc", "init", "-q")
    shutil.copytree(ROOT / ".dvc/plots", tmp_path / ".dvc/plots")  # the PR template, pr_by_class.json
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"plots": yaml.safe_load(dvc_yaml())["plots"]}))
    before, pr_before = write_plot_sources(tmp_path, dets_kept=2)
    run("git", "add", "-A")
    run("git", "commit", "-qm", "before")
    after, pr_after = write_plot_sources(tmp_path, dets_kept=4)
    run("git", "commit", "-qam", "after")

    run("dvc", "plots", "show", "--out", "show")
    plots = rendered((tmp_path / "show/index.html").read_text())
    assert set(plots) == {props["title"] for props in PLOTS.values()}
    pr = plots[PLOTS[f"{EVAL}/plots/pr_curves.csv"]["title"]]
    assert [{k: r[k] for k in ("class", "recall", "precision")} for r in pr] == pr_after
    confusion = plots[PLOTS[f"{EVAL}/plots/confusion.csv"]["title"]]
    assert sorted((r["actual"], r["predicted"]) for r in confusion) == \
        sorted(analysis.confusion_rows(after["confusion"]))
    assert ("dog", "cat") not in {(r["actual"], r["predicted"]) for r in confusion}  # no dog detection on a cat
    assert {r["loss"] for r in plots[PLOTS[f"{TRAIN}/iter_log.csv"]["title"]]} == {"5.0", "4.5", "4.333333333333333"}
    assert {r["field"] for r in plots[PLOTS[f"{TRAIN}/train_log.csv"]["title"]]} == \
        set(PLOTS[f"{TRAIN}/train_log.csv"]["y"])

    run("dvc", "plots", "diff", "HEAD~1", "HEAD", "--out", "diff")
    plots = rendered((tmp_path / "diff/index.html").read_text())
    for title, rows in plots.items():
        assert {r["rev"] for r in rows} == {"HEAD~1", "HEAD"}, title
    pr = plots[PLOTS[f"{EVAL}/plots/pr_curves.csv"]["title"]]
    for rev, expected in (("HEAD~1", pr_before), ("HEAD", pr_after)):
        assert [{k: r[k] for k in ("class", "recall", "precision")} for r in pr if r["rev"] == rev] == expected
    assert pr_before != pr_after
