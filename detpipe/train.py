"""The train stage: check inputs, build data and model, open the MLflow run, loop over epochs, write outputs.

Outputs (one folder, written whole or not at all): ``model.pt``, ``last.pt`` (model, optimizer, schedule,
epoch, RNG), ``train_log.csv`` (one row per epoch), ``iter_log.csv`` (one row per iteration),
``config.yaml`` (the resolved params) and ``run.json`` (the MLflow run and what it was trained on).
"""

from __future__ import annotations

import csv
import sys
import time
from pathlib import Path

import torch

from detpipe import config, engine, tracking
from detpipe.datasets import CocoDetection
from detpipe.errors import DetpipeError
from detpipe.files import atomic_dir, atomic_torch_save, read_json_keys, write_json, write_text
from detpipe.models import build_model, has_masks
from detpipe.transforms import train_transforms


def write_csv(path: Path, rows: list[dict]) -> None:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def _datasets(cfg: config.Config, data_dir: Path, image_root: Path) -> tuple[CocoDetection, CocoDetection, dict]:
    """The train and val sets and ``stats.json``, or a one-line error about the first missing or unusable input."""
    for needed in (data_dir / "train.json", data_dir / "val.json", data_dir / "stats.json"):
        if not needed.is_file():
            raise DetpipeError(f"{needed}: missing; run the convert stage first")
    if not image_root.is_dir():
        raise DetpipeError(f"{image_root}: image folder does not exist; run the download stage first")
    stats = read_json_keys(data_dir / "stats.json", "conversion stats", ("content_hash",))
    masks = has_masks(cfg.model.name)
    train_set = CocoDetection(data_dir / "train.json", image_root, with_masks=masks,
                              transforms=train_transforms(cfg.train.hflip, cfg.seed + 1))
    val_set = CocoDetection(data_dir / "val.json", image_root, with_masks=masks)
    if len(train_set) == 0:
        raise DetpipeError(f"{data_dir / 'train.json'}: the train split has no images")
    if masks and not any("segmentation" in a for a in train_set.coco["annotations"]):
        raise DetpipeError(f"{data_dir / 'train.json'}: model.name {cfg.model.name} needs outlines, but this "
                           "dataset has boxes only; pick a box model (fasterrcnn, retinanet, fcos, ssdlite)")
    return train_set, val_set, stats


def run(cfg: config.Config, data_dir: Path, image_root: Path, out: Path) -> list[dict]:
    """Train the model of ``cfg`` on ``data_dir``'s train split; returns the per-epoch log."""
    data_dir, image_root, out = Path(data_dir), Path(image_root), Path(out)
    train_set, val_set, stats = _datasets(cfg, data_dir, image_root)
    device = engine.resolve_device(cfg.device)
    engine.set_threads(cfg.threads)
    engine.seed_everything(cfg.seed)
    m, t = cfg.model, cfg.train
    model = build_model(m.name, m.backbone, len(train_set.cat_ids) + 1, min_size=m.min_size,
                        max_size=m.max_size, fpn_channels=m.fpn_channels, pretrained_backbone=m.pretrained_backbone)
    print(f"resolved config:\n{config.dump(cfg)}", file=sys.stderr)
    # Everything a user can get wrong is checked above: only now is an MLflow run opened.
    commit = tracking.git_commit()
    run = tracking.Run.start(cfg.experiment, run_name=f"{m.name}-{m.backbone}-{time.strftime('%Y%m%d-%H%M%S')}",
                             tags={"git_commit": commit, "dataset": cfg.dataset,
                                   "data_hash": stats["content_hash"], "device": str(device)})
    run.log_params(config.flatten(config.dict_of(cfg)))
    # Seeded again after the model is built, so the data order does not depend on how many weights it drew.
    loader = engine.train_loader(train_set, t.batch_size, t.num_workers, engine.seed_everything(cfg.seed), device)
    model.to(device)
    optimizer = engine.build_optimizer(model, t.lr, t.momentum, t.weight_decay)
    total = t.epochs * len(loader)
    scheduler = engine.build_scheduler(optimizer, total, t.warmup_iters, t.lr_schedule)

    history: list[dict] = []
    try:
        with atomic_dir(out) as tmp:
            write_text(tmp / "config.yaml", config.dump(cfg))
            run.log_artifact(tmp / "config.yaml")
            with open(tmp / "iter_log.csv", "w") as iter_log:
                iter_log.write("epoch,iter,lr,loss\n")
                for epoch in range(1, t.epochs + 1):
                    row = engine.train_one_epoch(
                        model, optimizer, scheduler, loader, device, epoch, amp=t.amp,
                        first_iter=(epoch - 1) * len(loader), total_iters=total, log_interval=t.log_interval,
                        iter_log=iter_log)
                    _, evals = engine.evaluate(model, val_set, device, batch_size=t.batch_size)
                    for iou_type, result in evals.items():
                        row[f"val_{iou_type}_mAP"] = result["stats"]["mAP"]
                        row[f"val_{iou_type}_mAP50"] = result["stats"]["mAP50"]
                    history.append(row)
                    print(f"epoch {epoch}/{t.epochs} done: loss {row['train_loss']:.3f} "
                          f"val bbox mAP50 {row['val_bbox_mAP50']:.3f}", file=sys.stderr, flush=True)
                    atomic_torch_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                       "scheduler": scheduler.state_dict(), "epoch": epoch,
                                       "rng": torch.get_rng_state(), "aug_rng": train_set.transforms.state()},
                                      tmp / "last.pt")
                    run.log_metrics(row, step=epoch)
            write_csv(tmp / "train_log.csv", history)
            meta = {"model": config.dict_of(cfg.model), "classes": train_set.class_names,
                    "cat_ids": train_set.cat_ids}
            atomic_torch_save({"model": model.state_dict(), "meta": meta}, tmp / "model.pt")
            write_json(tmp / "run.json", {"run_id": run.run_id, "experiment": cfg.experiment,
                                          "tracking_uri": tracking.tracking_uri(), "device": str(device),
                                          "git_commit": commit, "data_hash": stats["content_hash"]})
            run.log_artifact(tmp / "train_log.csv")
    except engine.NonFiniteLoss as exc:
        run.end("FAILED")
        raise DetpipeError(f"train: {exc}; try a lower train.lr (now {t.lr:g}) or more train.warmup_iters, "
                           "and check the data's boxes") from None
    except KeyboardInterrupt:
        run.end("KILLED")
        raise
    except BaseException:
        run.end("FAILED")
        raise
    run.end("FINISHED")  # evaluate and report still add their metrics and artifacts to this run
    return history
