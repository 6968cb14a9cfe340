"""The train stage: data, model, MLflow run and outputs around :func:`detpipe.engine.train`."""

from __future__ import annotations

import csv
import json
import sys
import time
from pathlib import Path

from detpipe import config, tracking
from detpipe.data import CocoDetection
from detpipe.errors import DetpipeError
from detpipe.io import atomic_dir, atomic_torch_save, write_json, write_text
from detpipe.models import build_model, has_masks


def write_csv(path: Path, rows: list[dict]) -> None:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def run_training(cfg: config.Config, data_dir: Path, image_root: Path, out: Path) -> list[dict]:
    from detpipe import engine

    for needed in (data_dir / "train.json", data_dir / "val.json", data_dir / "stats.json"):
        if not needed.is_file():
            raise DetpipeError(f"{needed}: missing; run the convert stage first")
    if not image_root.is_dir():
        raise DetpipeError(f"{image_root}: image folder does not exist; run the download stage first")
    masks = has_masks(cfg.model.name)
    train_set = CocoDetection(data_dir / "train.json", image_root, with_masks=masks)
    val_set = CocoDetection(data_dir / "val.json", image_root, with_masks=masks)
    if len(train_set) == 0:
        raise DetpipeError(f"{data_dir / 'train.json'}: the train split has no images")
    if masks and not any("segmentation" in a for a in train_set.coco["annotations"]):
        raise DetpipeError(f"{data_dir / 'train.json'}: model.name {cfg.model.name} needs outlines, but this "
                           "dataset has boxes only; pick a box model (fasterrcnn, retinanet, fcos, ssdlite)")
    stats = json.loads((data_dir / "stats.json").read_text())
    print(f"resolved config:\n{config.dump(cfg)}", file=sys.stderr)
    device = engine.resolve_device(cfg.device)
    engine.set_threads(cfg.threads)
    engine.seed_everything(cfg.seed)
    m = cfg.model
    model = build_model(m.name, m.backbone, len(train_set.cat_ids) + 1, min_size=m.min_size,
                        max_size=m.max_size, fpn_channels=m.fpn_channels, pretrained_backbone=m.pretrained_backbone)
    commit = tracking.git_commit()
    run = tracking.Run.start(cfg.experiment, run_name=f"{m.name}-{m.backbone}-{time.strftime('%Y%m%d-%H%M%S')}",
                             tags={"git_commit": commit, "dataset": cfg.dataset,
                                   "data_hash": stats["content_hash"], "device": str(device)})
    run.log_params(config.flatten(config.dict_of(cfg)))
    try:
        with atomic_dir(out) as tmp:
            write_text(tmp / "config.yaml", config.dump(cfg))
            run.log_artifact(tmp / "config.yaml")
            history = engine.train(model, train_set, val_set, cfg.train, device=device, seed=cfg.seed,
                                   out_dir=tmp, on_epoch=lambda epoch, row: run.log_metrics(row, step=epoch))
            write_csv(tmp / "train_log.csv", history)
            meta = {"model": config.dict_of(cfg.model), "classes": train_set.class_names,
                    "cat_ids": train_set.cat_ids}
            atomic_torch_save({"model": model.state_dict(), "meta": meta}, tmp / "model.pt")
            write_json(tmp / "run.json", {"run_id": run.run_id, "experiment": cfg.experiment,
                                          "tracking_uri": tracking.tracking_uri(), "device": str(device),
                                          "git_commit": commit, "data_hash": stats["content_hash"]})
            run.log_artifact(tmp / "train_log.csv")
    except BaseException:
        run.end("FAILED")
        raise
    run.end("FINISHED")  # evaluate and report still add their metrics and artifacts to this run
    return history
