"""Benchmark the report stage on generated inputs: a synthetic val set of ``--images`` images with predictions,
evaluation outputs, training logs and an MLflow store with two training runs, each with an evaluation.

    python -m benchmarks.bench_report --images 500 --json docs/bench_report.json

The stage is timed as the user runs it (``python stages/report.py ...`` in a fresh interpreter: start-up,
imports, reading, figures, page, MLflow logging), best of ``--repeat`` runs. :func:`make_project` also builds
the inputs of tests/test_report.py.

Predictions: each object is found with probability 0.8 (a jittered box, the right class 90% of the time, the
object's outline as its mask, score 0.2-1), plus 30 stray boxes per image (two up to score 0.7, the rest below
0.3), about what a detector keeps at ``evaluate.score_thr`` 0.05. The iteration log has 4800 rows. The
evaluation files are made by the evaluate stage's own functions (COCOeval, the analyses), as the stage would.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from detpipe import analysis, config, metrics, synthetic, tracking
from detpipe.conversion import convert_dataset
from detpipe.files import content_hash, tree_hash, write_json

ROOT = Path(__file__).resolve().parents[1]
EPOCHS, ITERS_PER_EPOCH = 12, 400  # a 12-epoch schedule's iteration log: 4800 rows
STRAYS = 30  # low-scoring boxes per image, as a detector keeps at evaluate.score_thr 0.05


def _predictions(coco: dict, rng: random.Random, masks: bool) -> list[dict]:
    n_classes = len(coco["categories"])
    dets = []
    by_image: dict[int, list] = {}
    for ann in coco["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    for image in coco["images"]:
        w_img, h_img = image["width"], image["height"]
        for ann in by_image.get(image["id"], []):
            if ann.get("iscrowd") or rng.random() > 0.8:
                continue
            x, y, w, h = ann["bbox"]
            box = [x + rng.gauss(0, w / 10), y + rng.gauss(0, h / 10), w * rng.uniform(0.8, 1.2),
                   h * rng.uniform(0.8, 1.2)]
            cat = ann["category_id"] if rng.random() < 0.9 else rng.randrange(n_classes) + 1
            det = {"image_id": image["id"], "category_id": cat, "bbox": [round(v, 2) for v in box],
                   "score": round(rng.uniform(0.2, 1.0), 4)}
            if masks and ann.get("segmentation"):
                det["segmentation"] = ann["segmentation"]
            dets.append(det)
        for k in range(STRAYS):
            w, h = rng.uniform(4, w_img / 3), rng.uniform(4, h_img / 3)
            top = 0.7 if k < 2 else 0.3  # a couple of confident false positives, the rest low scores
            dets.append({"image_id": image["id"], "category_id": rng.randrange(n_classes) + 1,
                         "bbox": [round(rng.uniform(0, w_img - w), 2), round(rng.uniform(0, h_img - h), 2),
                                  round(w, 2), round(h, 2)], "score": round(rng.uniform(0.05, top), 4)})
    return dets


def _write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def _train_logs(folder: Path, rng: random.Random, epochs: int, iters: int, final_map: float) -> None:
    """``train_log.csv`` and ``iter_log.csv`` as the train stage writes them: decaying losses, a warm-up and steps
    in the learning rate, validation every epoch."""
    iter_rows, epoch_rows = [], []
    for e in range(1, epochs + 1):
        lr = 0.02 * (0.1 if e > epochs * 0.75 else 1.0)
        for i in range(iters):
            it = (e - 1) * iters + i + 1
            lr_now = lr * min(1.0, it / 20)
            loss = 2.5 * (0.25 + 0.75 / (1 + it / 40)) + rng.gauss(0, 0.08)
            iter_rows.append({"epoch": e, "iter": it, "lr": f"{lr_now:.6g}", "loss": f"{loss:.5f}"})
        mean = sum(float(r["loss"]) for r in iter_rows[-iters:]) / iters
        progress = e / epochs
        epoch_rows.append({"epoch": e, "train/lr": lr, "train/loss": round(mean, 5),
                           "train/loss_classifier": round(mean * 0.45, 5),
                           "train/loss_bbox_regression": round(mean * 0.35, 5),
                           "train/loss_bbox_ctrness": round(mean * 0.2, 5), "train/img_per_s": 40.0,
                           "val/bbox_mAP": round(final_map * progress, 4),
                           "val/bbox_mAP_50": round(min(1.0, 1.6 * final_map * progress), 4)})
    _write_csv(folder / "iter_log.csv", iter_rows)
    _write_csv(folder / "train_log.csv", epoch_rows)


def _evaluation(out: Path, coco: dict, dets: list[dict], masks: bool) -> dict:
    """The evaluate stage's files for ``dets``: metrics.json, per_class.csv, predictions.json, analysis.json,
    plots/."""
    out.mkdir(parents=True, exist_ok=True)
    results = {"bbox": metrics.coco_evaluate(coco, dets, "bbox")}
    if masks:
        results["segm"] = metrics.coco_evaluate(coco, dets, "segm")
    found = analysis.analyse(coco, dets)
    flat = {**metrics.named_stats(results), "num_images": len(coco["images"]), "num_detections": len(dets),
            "voc_mAP_50": found["mAP_50"], "voc_mAP_50_11pt": found["mAP_50_11pt"]}
    write_json(out / "metrics.json", flat)
    (out / "predictions.json").write_text(json.dumps(dets))
    types = list(results)
    rows = [{"class": name, **{f"{t}_{k}": "" if (v := results[t]["per_class"][name][src]) is None else round(v, 4)
                                for t in types for k, src in (("AP", "AP"), ("AP_50", "AP50"))}}
            for name in results["bbox"]["per_class"]]
    _write_csv(out / "per_class.csv", rows)
    per_class = {name: {"num_gts": v["num_gts"], "num_dets": v["num_dets"],
                        **{f"coco_{k}": x for k, x in results["bbox"]["per_class"][name].items()},
                        "voc_AP_50": v["AP_50"], "voc_AP_50_11pt": v["AP_50_11pt"]}
                 for name, v in found["per_class"].items()}
    write_json(out / "analysis.json", {"iou_thr": found["iou_thr"], "score_thr": found["score_thr"],
                                       "voc_mAP_50": found["mAP_50"], "voc_mAP_50_11pt": found["mAP_50_11pt"],
                                       "per_class": per_class, **{k: found[k] for k in
                                                                  ("confusion", "worst_images", "best_images")}})
    analysis.write_plots(out / "plots", found)
    return flat


def make_project(root: Path, num_val: int, num_train: int = 20, image_size: int = 256, masks: bool = True,
                 seed: int = 0) -> dict:
    """Every input of the report stage under ``root`` (``data/raw``, ``data/coco``, ``runs/train``,
    ``runs/eval``, ``mlflow.db``): two training runs of experiment ``bench`` in the store, each with an
    evaluation child run; ``runs/`` holds the second. Returns ``{"run_id", "earlier_run_id", "metrics",
    "earlier_metrics"}`` (the metrics: each run's ``metrics.json``).

    Uses the store ``tracking.tracking_uri(root)``: call it with ``MLFLOW_TRACKING_URI`` unset or pointing at
    ``root/mlflow.db``.
    """
    root = Path(root)
    rng = random.Random(seed)
    raw, coco_dir = root / "data/raw", root / "data/coco"
    synthetic.generate(raw, num_train=num_train, num_val=num_val, image_size=image_size, max_objects=6, seed=seed)
    convert_dataset("via", raw, coco_dir, list(synthetic.CLASSES), min_box_size=2, content_hash=content_hash(raw))
    val = json.loads((coco_dir / "val.json").read_text())
    model = "maskrcnn" if masks else "fcos"
    cfg = config.load(ROOT / "params/detpipe.yaml", ["experiment=bench", f"model.name={model}"])
    hashes = {"data_hash": tree_hash(coco_dir), "raw_data_hash": content_hash(raw)}
    run_ids, evaluations = [], []
    for k, quality in enumerate((0.6, 0.8)):  # an earlier, worse run, then the run the report is about
        run = tracking.Run.start("bench", f"{cfg.model.name}-synthetic-run{k + 1}",
                                 {"stage": "train", "launcher": "manual", "data_hash": hashes["data_hash"]}, root)
        run.log_params({**config.flatten({"model": config.dict_of(cfg.model)}), "train.lr": 0.01 * (k + 1)})
        train_dir, eval_dir = root / "runs/train", root / "runs/eval"
        train_dir.mkdir(parents=True, exist_ok=True)
        local = random.Random(seed + k)
        dets = [d for d in _predictions(val, local, masks) if local.random() < quality or d["score"] > 0.5]
        found = _evaluation(eval_dir, val, dets, masks)
        _train_logs(train_dir, rng, EPOCHS, ITERS_PER_EPOCH, found["bbox_mAP"])
        (train_dir / "config.yaml").write_text(config.dump(cfg))
        (train_dir / "model.pt").write_bytes(b"not read by the report")
        write_json(train_dir / "run.json", {"run_id": run.run_id, "experiment": "bench",
                                            "tracking_uri": tracking.tracking_uri(root),
                                            "model_uri": f"runs:/{run.run_id}/model", "device": "cpu",
                                            "git_commit": "0123456789abcdef0123456789abcdef01234567", **hashes})
        child = run.child("evaluate-val", {"stage": "evaluate"})
        child.log_params({"evaluate.score_thr": cfg.evaluate.score_thr, "split": "val"})
        child.log_metrics({k: v for k, v in found.items() if isinstance(v, (int, float))})
        write_json(eval_dir / "run.json", {"run_id": child.run_id, "parent_run_id": run.run_id,
                                           "tracking_uri": tracking.tracking_uri(root)})
        child.end()
        run.end()
        run_ids.append(run.run_id)
        evaluations.append(found)
    return {"run_id": run_ids[1], "earlier_run_id": run_ids[0], "metrics": evaluations[1],
            "earlier_metrics": evaluations[0]}


def stage_command(root: Path) -> list[str]:
    return [sys.executable, str(ROOT / "stages/report.py"), "--params", str(ROOT / "params/detpipe.yaml"),
            "--set", "experiment=bench", "--data", "data/coco", "--images", "data/raw", "--model", "runs/train",
            "--eval", "runs/eval", "--out", "reports/index.html", "--figures", "reports/figures"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=500, help="val images (default: %(default)s)")
    p.add_argument("--repeat", type=int, default=3, help="timed runs, best kept (default: %(default)s)")
    p.add_argument("--json", type=Path, help="also write the numbers to this JSON file")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}"}
        os.environ["MLFLOW_TRACKING_URI"] = env["MLFLOW_TRACKING_URI"]
        start = time.perf_counter()
        made = make_project(root, args.images)
        setup = time.perf_counter() - start
        times = []
        for _ in range(args.repeat):
            start = time.perf_counter()
            subprocess.run(stage_command(root), cwd=root, env=env, check=True, capture_output=True)
            times.append(time.perf_counter() - start)
        page = root / "reports/index.html"
        figures = sorted((root / "reports/figures").iterdir())
        result = {
            "val_images": args.images, "detections": made["metrics"]["num_detections"],
            "iterations_logged": EPOCHS * ITERS_PER_EPOCH, "report_stage_s": round(min(times), 2),
            "all_runs_s": [round(t, 2) for t in times], "page_MB": round(page.stat().st_size / 1e6, 2),
            "figures": len(figures), "setup_s": round(setup, 1),
            "cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "python": platform.python_version(),
        }
    print(f"| val images | detections | report stage (best of {args.repeat}) | page | figures |")
    print("|---|---|---|---|---|")
    print(f"| {result['val_images']} | {result['detections']} | {result['report_stage_s']} s | "
          f"{result['page_MB']} MB | {result['figures']} |")
    print(json.dumps(result, indent=1))
    if args.json:
        write_json(args.json, result)


if __name__ == "__main__":
    main()
