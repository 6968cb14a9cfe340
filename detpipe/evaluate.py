"""The evaluate stage: predict on the val split with the trained model, score with COCOeval, write and log.

Outputs: ``predictions.json`` (COCO results), ``per_class.csv`` and ``metrics.json`` (for ``dvc metrics``).
Every input, the MLflow run included, is checked before anything is computed or written.
"""

from __future__ import annotations

import csv
from pathlib import Path

from detpipe import config, engine, tracking
from detpipe.datasets import CocoDetection
from detpipe.errors import DetpipeError
from detpipe.files import atomic_path, read_json_keys, write_json
from detpipe.models import has_masks, load_checkpoint

RUN_KEYS = ("run_id", "tracking_uri")


def _per_class_csv(path: Path, results: dict) -> None:
    types = list(results)
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["class", *[f"{t}_{k}" for t in types for k in ("AP", "AP50")]])
        for name in results["bbox"]["per_class"]:
            values = [results[t]["per_class"][name][k] for t in types for k in ("AP", "AP50")]
            writer.writerow([name, *["" if v is None else round(v, 4) for v in values]])  # "": no ground truth


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
    device = engine.resolve_device(cfg.device)
    model_file = Path(checkpoint) if checkpoint else train_dir / "model.pt"
    model, meta = load_checkpoint(model_file, device)
    run = None
    if checkpoint is None:
        run_info = read_json_keys(train_dir / "run.json", "training run record", RUN_KEYS)
        run = tracking.Run.existing(run_info["run_id"], train_dir / "run.json")
    dataset = CocoDetection(split_file, image_root, with_masks=has_masks(meta["model"]["name"]))
    if dataset.class_names != meta["classes"]:
        raise DetpipeError(f"{split_file}: classes {dataset.class_names} differ from the model's "
                           f"{meta['classes']} ({model_file}); evaluate a model trained on these classes")
    engine.set_threads(cfg.threads)
    dets, results = engine.evaluate(model, dataset, device, cfg.evaluate.batch_size, cfg.evaluate.score_thr)
    metrics = {t: r["stats"] for t, r in results.items()}
    metrics["num_images"] = len(dataset)
    metrics["num_detections"] = len(dets)
    write_json(out / "predictions.json", dets)
    _per_class_csv(out / "per_class.csv", results)
    write_json(out / "metrics.json", metrics)
    if run is not None:
        run.log_metrics({f"eval_{t}_{k}": v for t in results for k, v in metrics[t].items()})
        for name in ("metrics.json", "per_class.csv"):
            run.log_artifact(out / name, "eval")
    return metrics
