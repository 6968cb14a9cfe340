"""Training loop and batched prediction for torchvision detectors."""

from __future__ import annotations

import math
import random
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from detpipe.data import CocoDetection, collate
from detpipe.io import atomic_torch_save


def set_threads(threads: int) -> None:
    """Use ``threads`` CPU threads (0: every core). Snakemake exports OMP_NUM_THREADS=1 to single-thread
    rules, which would make training on the CPU about half as fast on two cores; the param decides instead."""
    import os

    torch.set_num_threads(threads or os.cpu_count() or 1)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        from detpipe.errors import DetpipeError

        raise DetpipeError("device: 'cuda' requested but no CUDA device is available")
    return torch.device(name)


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def lr_factor(it: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the peak learning rate at iteration ``it``: linear warm-up, then the schedule."""
    if it < warmup:
        return 0.001 + (1 - 0.001) * it / warmup
    if schedule == "cosine":
        progress = (it - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "step":
        return 0.1 ** sum(it >= total * f for f in (2 / 3, 8 / 9))
    return 1.0


def _to_device(images, targets, device):
    images = [im.to(device, non_blocking=True).float().div_(255) for im in images]
    targets = [{k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in t.items()}
               for t in targets]
    return images, targets


def _hflip(images, targets, gen: torch.Generator, prob: float):
    """Flip images and their targets left-right, drawing from ``gen`` so the result is seeded."""
    for i, (im, t) in enumerate(zip(images, targets)):
        if prob and torch.rand((), generator=gen).item() < prob:
            width = im.shape[-1]
            images[i] = im.flip(-1)
            boxes = t["boxes"].clone()
            boxes[:, [0, 2]] = width - t["boxes"][:, [2, 0]]
            t["boxes"] = boxes
            if "masks" in t:
                t["masks"] = t["masks"].flip(-1)
    return images, targets


def train(model, train_set: CocoDetection, val_set: CocoDetection, tcfg, *, device: torch.device, seed: int,
          out_dir: Path, on_epoch: Callable[[int, dict], None] = lambda e, m: None,
          log=lambda msg: print(msg, file=sys.stderr, flush=True)) -> list[dict]:
    """Train for ``tcfg.epochs``; after each epoch evaluate on ``val_set``, checkpoint, and call ``on_epoch``.

    Writes ``iter_log.csv`` (one row per iteration) and ``last.pt`` (model, optimizer, epoch, RNG) to ``out_dir``.
    """

    gen = seed_everything(seed)
    loader = torch.utils.data.DataLoader(
        train_set, batch_size=tcfg.batch_size, shuffle=True, generator=gen, collate_fn=collate,
        num_workers=tcfg.num_workers, pin_memory=device.type == "cuda",
        worker_init_fn=lambda wid: np.random.seed(seed + wid), persistent_workers=tcfg.num_workers > 0)
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=tcfg.lr, momentum=tcfg.momentum, weight_decay=tcfg.weight_decay)
    total = tcfg.epochs * len(loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda it: lr_factor(it, total, tcfg.warmup_iters, tcfg.lr_schedule))
    use_amp = tcfg.amp and device.type == "cuda"
    aug_gen = torch.Generator().manual_seed(seed + 1)
    history, it, start = [], 0, time.time()
    iter_log = (out_dir / "iter_log.csv").open("w")
    iter_log.write("epoch,iter,lr,loss\n")
    for epoch in range(1, tcfg.epochs + 1):
        model.train()
        sums, seen, epoch_start = defaultdict(float), 0, time.time()
        for images, targets in loader:
            images, targets = _to_device(list(images), list(targets), device)
            images, targets = _hflip(images, targets, aug_gen, tcfg.hflip)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                losses = model(images, targets)
            loss = sum(losses.values())
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss is {loss.item()} at iteration {it}; lower train.lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 10.0)
            optimizer.step()
            scheduler.step()
            it += 1
            seen += len(images)
            for k, v in losses.items():
                sums[k] += v.item()
            sums["loss"] += loss.item()
            lr = optimizer.param_groups[0]["lr"]
            iter_log.write(f"{epoch},{it},{lr:.6g},{loss.item():.5f}\n")
            if it % tcfg.log_interval == 0 or it == total:
                eta = (time.time() - start) / it * (total - it)
                log(f"epoch {epoch}/{tcfg.epochs} iter {it}/{total} loss {loss.item():.3f} "
                    f"lr {lr:.4g} eta {eta:.0f}s")
        iter_log.flush()
        n = len(loader)
        row = {"epoch": epoch, "lr": optimizer.param_groups[0]["lr"],
               **{f"train_{k}": v / n for k, v in sums.items()},
               "train_img_per_s": seen / (time.time() - epoch_start)}
        _, evals = evaluate_model(model, val_set, device, batch_size=tcfg.batch_size)
        for iou_type, result in evals.items():
            row[f"val_{iou_type}_mAP"] = result["stats"]["mAP"]
            row[f"val_{iou_type}_mAP50"] = result["stats"]["mAP50"]
        history.append(row)
        log(f"epoch {epoch} done: loss {row['train_loss']:.3f} val bbox mAP50 {row['val_bbox_mAP50']:.3f}")
        atomic_torch_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                           "scheduler": scheduler.state_dict(), "epoch": epoch,
                           "rng": torch.get_rng_state(), "aug_rng": aug_gen.get_state()}, out_dir / "last.pt")
        on_epoch(epoch, row)
    iter_log.close()
    return history


@torch.no_grad()
def predict(model, dataset: CocoDetection, device: torch.device, batch_size: int = 8,
            score_thr: float = 0.0) -> list[dict]:
    """COCO result dicts (bbox in xywh, category ids of the dataset; RLE masks for mask models)."""
    from pycocotools import mask as mask_utils

    model.eval().to(device)
    results = []
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collate)
    for images, targets in loader:
        images, _ = _to_device(list(images), [], device)
        outputs = model(images)
        for out, target in zip(outputs, targets):
            keep = out["scores"] >= score_thr
            boxes = out["boxes"][keep].float().cpu().numpy()
            scores = out["scores"][keep].float().cpu().numpy()
            labels = out["labels"][keep].cpu().numpy()
            masks = (out["masks"][keep, 0] > 0.5).cpu().numpy() if "masks" in out else None
            for j in range(len(scores)):
                x1, y1, x2, y2 = (float(v) for v in boxes[j])
                det = {"image_id": int(target["image_id"]), "category_id": dataset.cat_ids[int(labels[j]) - 1],
                       "bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)],
                       "score": round(float(scores[j]), 4)}
                if masks is not None:
                    rle = mask_utils.encode(np.asfortranarray(masks[j].astype(np.uint8)))
                    det["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode()}
                results.append(det)
    return results


def evaluate_model(model, dataset: CocoDetection, device, batch_size: int = 8,
                   score_thr: float = 0.0) -> tuple[list[dict], dict]:
    """Predictions and ``{iou_type: coco_evaluate result}``; segm only for models that predict masks."""
    from detpipe.evaluation import coco_evaluate

    dets = predict(model, dataset, device, batch_size, score_thr)
    types = ["bbox", "segm"] if dataset.with_masks else ["bbox"]
    return dets, {t: coco_evaluate(dataset.coco, dets, t) for t in types}
