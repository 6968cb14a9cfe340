"""The evaluate stage: predict on the val split with the trained model, score with COCOeval, write and log.

Outputs: ``predictions.json`` (COCO results), ``per_class.csv``, ``analysis.json`` and ``plots/`` (VOC mAP,
PR curves, confusion matrix, worst images: docs/evaluation.md), ``metrics.json`` (for ``dvc metrics``) and
``run.json``, written in a temporary folder that replaces the output folder whole once everything, MLflow's
logging included, has succeeded.
Every input, the MLflow run included, is checked before anything is computed or written. Each evaluation then
becomes a new MLflow child run of the training run (its params, metrics and every output file; docs/tracking.md),
named in ``run.json``: the training run itself is never written to.
"""

from __future__ import annotations

import csv
import hashlib
import sys
from pathlib import Path

from detpipe import config, engine, tracking
from detpipe.analysis import analyse, write_plots
from detpipe.datasets import CocoDetection
from detpipe.errors import DetpipeError
from detpipe.files import atomic_dir, check_output_folder, read_json_keys, tree_hash, write_json
from detpipe.metrics import named_stats
from detpipe.models import has_masks, load_checkpoint

RUN_KEYS = ("run_id", "tracking_uri")


def _per_class_csv(path: Path, results: dict) -> None:
    types = list(results)
    with open(path, "w", newline="") as f:  # inside the stage's atomic output folder
        writer = csv.writer(f)
        writer.writerow(["class", *[f"{t}_{k}" for t in types for k in ("AP", "AP_50")]])
        for name in results["bbox"]["per_class"]:
            values = [results[t]["per_class"][name][k] for t in types for k in ("AP", "AP50")]
            writer.writerow([name, *["" if v is None else round(v, 4) for v in values]])  # "": no ground truth


def _analysis_json(analysis: dict, coco: dict) -> dict:
    """The analyses (less the PR curves, in plots/) with COCO's per-class AP beside the VOC AP of each class."""
    per_class = {name: {"num_gts": voc["num_gts"], "num_dets": voc["num_dets"],
                        **{f"coco_{k}": v for k, v in coco["per_class"][name].items()},
                        "voc_AP_50": voc["AP_50"], "voc_AP_50_11pt": voc["AP_50_11pt"]}
                 for name, voc in analysis["per_class"].items()}
    return {"iou_thr": analysis["iou_thr"], "score_thr": analysis["score_thr"],
            "voc_mAP_50": analysis["mAP_50"], "voc_mAP_50_11pt": analysis["mAP_50_11pt"], "per_class": per_class,
            **{k: analysis[k] for k in ("confusion", "worst_images", "best_images")}}


def run(cfg: config.Config, data_dir: Path, image_root: Path, train_dir: Path, out: Path, *,
        checkpoint: Path | None = None, split: str = "val") -> dict:
    """Score ``train_dir``'s model on ``data_dir``'s ``split``; returns what ``metrics.json`` holds.

    With ``checkpoint`` (any train-stage ``model.pt``, the tutorial's ``tools/test.py``) that file is scored
    instead, and nothing is logged to MLflow: no training run is known to own the numbers.
    """
    data_dir, image_root, train_dir, out = Path(data_dir), Path(image_root), Path(train_dir), Path(out)
    split_file = data_dir / f"{split}.json"
    if not split_file.is_file():
        raise DetpipeError(f"{split_file}: missing; run the convert stage first (or pick another split)")
    if not image_root.is_dir():
        raise DetpipeError(f"{image_root}: image folder does not exist; run the download stage first")
    model_file = Path(checkpoint) if checkpoint else train_dir / "model.pt"
    check_output_folder(out, "metrics.json", "evaluate", {"the data": data_dir, "the images": image_root,
                                                          "the model": model_file, "the train output": train_dir})
    device = engine.resolve_device(cfg.device)
    model, meta = load_checkpoint(model_file, device)
    run = None
    if checkpoint is None:
        run_info = read_json_keys(train_dir / "run.json", "training run record", RUN_KEYS)
        run = tracking.Run.existing(run_info["run_id"], train_dir / "run.json")
    dataset = CocoDetection(split_file, image_root, with_masks=has_masks(meta["model"]["name"]), mask_targets="none")
    if dataset.class_names != meta["classes"]:
        raise DetpipeError(f"{split_file}: classes {dataset.class_names} differ from the model's "
                           f"{meta['classes']} ({model_file}); evaluate a model trained on these classes")
    engine.set_threads(cfg.threads)
    # One folder, replaced whole at the end (atomic_dir): a failure anywhere, MLflow's logging included, leaves the
    # earlier outputs as they were, and no file of an earlier evaluation (its run.json) stays beside new ones.
    # predictions.json (COCO results, one line) is written batch by batch as the model predicts, and scored as it
    # is: the library reads it and the split's file itself; the analyses use the detections' columns.
    with atomic_dir(out) as tmp:
        dets, results = engine.evaluate(model, dataset, device, cfg.evaluate.batch_size, cfg.evaluate.score_thr,
                                        cfg.evaluate.backend, predictions_file=tmp / "predictions.json")
        metrics = named_stats(results)  # flat: bbox_mAP, bbox_mAP_50, ..., segm_AR_l
        metrics["num_images"] = len(dataset)
        metrics["num_detections"] = len(dets)
        analysis = analyse(dataset.coco, dets)  # boxes only, also for mask models
        metrics["voc_mAP_50"], metrics["voc_mAP_50_11pt"] = analysis["mAP_50"], analysis["mAP_50_11pt"]
        _per_class_csv(tmp / "per_class.csv", results)
        write_json(tmp / "analysis.json", _analysis_json(analysis, results["bbox"]))
        write_plots(tmp / "plots", analysis)
        write_json(tmp / "metrics.json", metrics)
        if run is not None:
            _log_child(cfg, run, tmp, metrics, model_file, data_dir, split)
    masks = f", segm mAP {metrics['segm_mAP']:.4f}" if "segm_mAP" in metrics else ""
    print(f"evaluate -> {out}: bbox mAP {metrics['bbox_mAP']:.4f}, mAP@0.5 {metrics['bbox_mAP_50']:.4f}{masks} "
          f"({len(dataset)} {split} images, {len(dets)} detections)", file=sys.stderr)
    return metrics


def _log_child(cfg, parent: tracking.Run, out: Path, metrics: dict, model_file: Path, data_dir: Path,
               split: str) -> None:
    """A new MLflow child run of the training run: this evaluation's params, metrics and every output file.

    Its id goes into ``run.json`` beside the outputs, so the report knows which evaluation it shows.
    """
    child = parent.child(f"evaluate-{split}-thr{cfg.evaluate.score_thr:g}",
                         tags={"stage": "evaluate", "git_commit": tracking.git_commit(), **tracking.launch_tags(cfg)})
    try:
        child.log_params({**config.flatten({"evaluate": config.dict_of(cfg.evaluate)}), "split": split,
                          "checkpoint": str(model_file),
                          "checkpoint_sha256": hashlib.sha256(model_file.read_bytes()).hexdigest()[:16],
                          "data_hash": tree_hash(data_dir)})
        child.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        write_json(out / "run.json", {"run_id": child.run_id, "parent_run_id": parent.run_id,
                                      "tracking_uri": tracking.without_credentials(tracking.tracking_uri())})
        child.log_artifacts(out)
    except BaseException:
        child.end("FAILED")
        raise
    child.end()
