"""The training loop and batched prediction for torchvision detectors, one epoch at a time.

Shaped like torchvision's ``references/detection/engine.py``: :func:`train_one_epoch` returns its log
row, :func:`evaluate` is separate; the optimizer and the schedule are built apart; augmentation is the
dataset's business (:mod:`detpipe.transforms`), not the loop's.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from torch.utils._foreach_utils import _get_fused_kernels_supported_devices  # what fused=True takes
from tqdm import tqdm

from detpipe import distributed
from detpipe.datasets import CocoDetection, collate, decode_on_device
from detpipe.errors import DetpipeError, check_terminated
from detpipe.metrics import Detections, ResultsFile, coco_evaluate
from detpipe.transforms import seed_worker


class NonFiniteLoss(FloatingPointError):
    """The loss became NaN or infinite; the caller says what to change."""

    def __init__(self, value: float, iteration: int, epoch: int):
        super().__init__(f"loss is {value} at iteration {iteration} (epoch {epoch})")
        self.value, self.iteration, self.epoch = value, iteration, epoch


def set_threads(threads: int) -> None:
    """Use ``threads`` CPU threads (0: every core this process may use: a SLURM job's ``--cpus-per-task``, else
    the CPUs it is pinned to). Snakemake exports OMP_NUM_THREADS=1 to single-thread rules, which would make
    training on the CPU about half as fast on two cores; the param decides instead."""
    torch.set_num_threads(threads or usable_cpus())


def usable_cpus() -> int:
    slurm = os.environ.get("SLURM_CPUS_PER_TASK", "")
    return int(slurm) if slurm.isdigit() and int(slurm) > 0 else len(os.sched_getaffinity(0)) or 1


def resolve_device(device) -> torch.device:
    """``auto`` (CUDA when present), ``cpu``, ``cuda[:N]`` or a ``torch.device``; absent CUDA is a user error."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise DetpipeError(f"device: {device!r} requested but no CUDA device is available")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError):
        raise DetpipeError(f"device: unknown device {device!r}; use auto, cpu or cuda") from None


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


class GroupedBatchSampler(torch.utils.data.Sampler):
    """Batches of images from one group (wide or tall), in the order ``sampler`` draws them.

    As torchvision's references do: fewer mixed batches means less padding. Each index comes exactly once per
    epoch; the groups' incomplete batches are joined at the end.
    """

    def __init__(self, sampler, group_ids: list[int], batch_size: int):
        self.sampler, self.group_ids, self.batch_size = sampler, group_ids, batch_size

    def __iter__(self):
        pending: dict[int, list[int]] = defaultdict(list)
        for index in self.sampler:
            group = pending[self.group_ids[index]]
            group.append(index)
            if len(group) == self.batch_size:
                yield list(group)
                group.clear()
        rest = [i for g in sorted(pending) for i in pending[g]]
        for start in range(0, len(rest), self.batch_size):
            yield rest[start:start + self.batch_size]

    def __len__(self) -> int:
        return math.ceil(len(self.group_ids) / self.batch_size)


def train_loader(dataset: CocoDetection, batch_size: int, num_workers: int, generator: torch.Generator,
                 device: torch.device, group_aspect_ratio: bool = False, world: distributed.World | None = None,
                 seed: int = 0, *, pin_memory: bool = True, prefetch_factor: int = 2,
                 persistent_workers: bool = False) -> torch.utils.data.DataLoader:
    """Shuffled batches in an order drawn from ``generator``; workers reseed the dataset's transforms.

    In a distributed training each process gets ``batch_size / world.size`` images of every batch, from a
    DistributedSampler seeded with ``seed`` (call ``loader.sampler.set_epoch(epoch)`` before each epoch).
    ``pin_memory`` pins batches for CUDA (ignored on the CPU); ``prefetch_factor`` (batches loaded ahead per
    worker) and ``persistent_workers`` (workers kept between epochs) apply with ``num_workers`` > 0 only.
    """
    common = {"collate_fn": collate, "num_workers": num_workers, "pin_memory": pin_memory and device.type == "cuda",
              "worker_init_fn": seed_worker}
    if num_workers:
        common.update(prefetch_factor=prefetch_factor, persistent_workers=persistent_workers)
    if world is not None and world.active:
        sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=world.size, rank=world.rank,
                                                      shuffle=True, seed=seed)
        rank_gen = torch.Generator().manual_seed(seed + world.rank)  # workers' seeds differ between ranks
        return torch.utils.data.DataLoader(dataset, batch_size=batch_size // world.size, sampler=sampler,
                                           generator=rank_gen, **common)
    if group_aspect_ratio:
        groups = [int(img["width"] >= img["height"]) for img in dataset.images]
        sampler = GroupedBatchSampler(torch.utils.data.RandomSampler(dataset, generator=generator), groups,
                                      batch_size)
        return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, **common)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=generator, **common)


def parameter_groups(model: torch.nn.Module, weight_decay: float, decay_norm_and_bias: bool = True) -> list[dict]:
    """Trainable parameters; with ``decay_norm_and_bias`` off, norm layers' weights and biases get no decay."""
    if decay_norm_and_bias:
        return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": weight_decay}]
    norms = (torch.nn.modules.batchnorm._NormBase, torch.nn.GroupNorm, torch.nn.LayerNorm)
    decay, no_decay = [], []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if p.requires_grad:
                (no_decay if isinstance(module, norms) or name == "bias" else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: torch.nn.Module, name: str = "sgd", *, lr: float, momentum: float = 0.9,
                    weight_decay: float = 0.0, decay_norm_and_bias: bool = True,
                    fused: bool = False) -> torch.optim.Optimizer:
    """SGD with momentum or AdamW over the model's trainable parameters (build it after ``model.to(device)``).

    ``fused``: one fused kernel per step where torch has one for the parameters' device, else the multi-tensor
    (``foreach``) implementation; off, torch picks its default.
    """
    groups = parameter_groups(model, weight_decay, decay_norm_and_bias)
    if name == "adamw":
        make = lambda **kw: torch.optim.AdamW(groups, lr=lr, betas=(momentum, 0.999), **kw)
    elif name == "sgd":
        make = lambda **kw: torch.optim.SGD(groups, lr=lr, momentum=momentum, **kw)
    else:
        raise ValueError(f"unknown optimizer {name!r}")
    if not fused:
        return make()
    params = [p for group in groups for p in group["params"]]
    supported = _get_fused_kernels_supported_devices()
    if all(p.device.type in supported and torch.is_floating_point(p) for p in params):
        return make(fused=True)
    return make(foreach=True)


def speed_up(model: torch.nn.Module, *, channels_last: bool = False, compile: bool = False,
             cudnn_benchmark: bool = False, static_shapes: bool = False) -> torch.nn.Module:
    """The training speed levers of docs/training.md, applied to ``model`` in place (after ``model.to(device)``).

    ``channels_last`` stores 4-D weights NHWC (faster convolutions on tensor cores); ``compile`` compiles the
    backbone (with its FPN) with ``torch.compile``, in place, so the state dict keeps its keys: with
    ``static_shapes`` (the model pads to ``model.fixed_canvas``'s few sizes) one graph per input shape, else
    torch's default, which turns to dynamic shapes at the second shape; ``cudnn_benchmark`` lets cuDNN time its
    algorithms per input shape (set for the whole process; slower for models with changing shapes, such as
    Mask R-CNN). (``train.parallel_rpn`` is applied by the train stage: :func:`detpipe.rpn.parallel_rpn`.)
    """
    torch.backends.cudnn.benchmark = cudnn_benchmark
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if compile:
        model.backbone.compile(dynamic=False if static_shapes else None)
    return model


def lr_factor(it: int, total: int, warmup: int, schedule: str, milestones: tuple[int, ...] = ()) -> float:
    """Multiplier of the peak learning rate at iteration ``it``: linear warm-up, then the schedule.

    ``milestones`` (for ``multistep``) are in iterations.
    """
    if it < warmup:
        return 0.001 + (1 - 0.001) * it / warmup
    if schedule == "cosine":
        progress = (it - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "step":
        return 0.1 ** sum(it >= total * f for f in (2 / 3, 8 / 9))
    if schedule == "multistep":
        return 0.1 ** sum(it >= m for m in milestones)
    return 1.0


def build_scheduler(optimizer: torch.optim.Optimizer, total_iters: int, warmup_iters: int, schedule: str,
                    milestones: tuple[int, ...] = ()):
    """A per-iteration schedule (``step()`` after every optimizer step) over ``total_iters``."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda it: lr_factor(it, total_iters, warmup_iters, schedule, tuple(milestones)))


def check_boxes(targets) -> None:
    """Raise a one-line error naming the first box of ``targets`` without a positive width and height:
    torchvision's models check that on the device after their resize (a sync per image), ``train.sync_free_inputs``
    here, before the boxes move (no sync for the host tensors of a DataLoader). The dataset layer keeps boxes of
    at least ``convert.min_box_size`` pixels, which no resize of the model brings to zero."""
    for index, target in enumerate(targets):
        boxes = target["boxes"]
        if not boxes.numel():
            continue
        bad = (boxes[:, 2:] <= boxes[:, :2]).any(dim=1)
        if bad.any():
            where = f"image {target['image_id']}" if "image_id" in target else f"target {index} of the batch"
            raise DetpipeError(f"{where}: box {boxes[bad][0].tolist()} (x1, y1, x2, y2) has no positive width "
                               "and height")


def to_device(images, targets, device: torch.device):
    """uint8 CHW images to float in [0, 1] on ``device``; target tensors moved along."""
    images = [im.to(device, non_blocking=True).float().div_(255) for im in images]
    targets = [{k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in t.items()}
               for t in targets]
    return images, targets


def train_one_epoch(model, optimizer, scheduler, loader, device: torch.device, epoch: int, *, amp: bool = False,
                    amp_dtype: torch.dtype = torch.bfloat16, scaler=None, clip_norm: float = 10.0,
                    first_iter: int = 0, total_iters: int | None = None, log_interval: int = 20, iter_log=None,
                    progress: bool = False, world: distributed.World | None = None, deferred_sync: bool = True,
                    log=lambda msg: print(msg, file=sys.stderr, flush=True)) -> dict:
    """One pass over ``loader``; returns the epoch's log row (mean of each loss, last lr, images per second).

    ``first_iter`` counts the iterations of earlier epochs (for the ETA and ``iter_log``, a CSV file
    written one row per iteration). AMP runs on CUDA only; float16 needs a ``torch.amp.GradScaler``.
    ``clip_norm`` 0 turns clipping off. ``progress`` shows a bar (iteration, loss, lr, ETA) instead of a log
    line every ``log_interval`` iterations. A NaN or infinite loss raises :class:`NonFiniteLoss` naming the
    first iteration that had one.

    ``deferred_sync``: the losses stay on the device and are read (one host sync) only every ``log_interval``
    iterations and at the end of the epoch, where the buffered ``iter_log`` rows are written and a non-finite
    loss is caught: a GPU is never kept waiting in between. Off, they are read every iteration and a
    non-finite loss stops training before its step. Both give the same sums, log rows and files.
    """
    model.train()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    use_amp = amp and device.type == "cuda"
    scaler = scaler or torch.amp.GradScaler(device.type, enabled=False)
    world = world or distributed.World()
    transforms = getattr(loader.dataset, "transforms", None)
    total = total_iters or first_iter + len(loader)
    sums, seen, it, epoch_start = defaultdict(float), 0, first_iter, time.time()
    pending = []  # (iteration, lr, loss names, the losses and their sum, on the device) not yet read
    bar = tqdm(total=len(loader), desc=f"epoch {epoch}", unit="it", file=sys.stderr, leave=False,
               disable=not progress)

    def read_pending() -> float:
        """The pending losses, read in one sync, into the sums, ``iter_log`` and the bar; returns the last loss."""
        rows = torch.stack([values for *_, values in pending]).tolist()
        bad = next((j for j, row in enumerate(rows) if not math.isfinite(row[-1])), None)
        for (i, lr, names, _), row in zip(pending[:bad], rows[:bad]):
            for name, value in zip(names, row):
                sums[name] += value
            sums["loss"] += row[-1]
            if iter_log is not None:
                iter_log.write(f"{epoch},{i},{lr:.6g},{row[-1]:.5f}\n")
        if deferred_sync and distributed.any_true(bad is not None, world):  # every process stops
            j = len(rows) - 1 if bad is None else bad
            raise NonFiniteLoss(rows[j][-1], pending[j][0], epoch)
        bar.set_postfix(loss=f"{rows[-1][-1]:.3f}", lr=f"{pending[-1][1]:.4g}", refresh=False)
        pending.clear()
        return rows[-1][-1]

    for images, targets in loader:
        check_terminated()  # a SIGTERM whose KeyboardInterrupt a finaliser swallowed
        images, targets = list(images), list(targets)
        if any(im.dim() == 1 for im in images):  # JPEG bytes (train.gpu_decode): decoded on the device
            images, targets = decode_on_device(images, targets, device, transforms)
        check_boxes(targets)
        images, targets = to_device(images, targets, device)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
            losses = model(images, targets)
        loss = sum(losses.values())
        if not deferred_sync and distributed.any_true(not torch.isfinite(loss), world):  # every process stops
            raise NonFiniteLoss(loss.item(), it + 1, epoch)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if clip_norm:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, clip_norm)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        it += 1
        seen += len(images)
        lr = optimizer.param_groups[0]["lr"]
        pending.append((it, lr, tuple(losses), torch.stack([v.detach() for v in (*losses.values(), loss)])))
        bar.update()
        at_log = it % log_interval == 0 or it == total
        if at_log or not deferred_sync:
            last_loss = read_pending()
        if not progress and at_log:
            eta = (time.time() - epoch_start) / (it - first_iter) * (total - it)  # at this epoch's pace
            log(f"epoch {epoch} iter {it}/{total} loss {last_loss:.3f} lr {lr:.4g} eta {eta:.0f}s")
    if pending:
        read_pending()
    bar.close()
    if iter_log is not None:
        iter_log.flush()
    n = len(loader)
    return {"epoch": epoch, "lr": optimizer.param_groups[0]["lr"],
            **{f"train_{k}": v / n for k, v in sums.items()},
            "train_img_per_s": seen / (time.time() - epoch_start), "train_seconds": time.time() - epoch_start}


@torch.no_grad()
def predict(model, dataset: CocoDetection, device: torch.device, batch_size: int = 8, score_thr: float = 0.0,
            predictions_file: Path | None = None) -> Detections:
    """The detections scoring at least ``score_thr``, as columns (category ids of the dataset, bbox x, y, w, h).
    Label 0 is the background: RetinaNet's and FCOS's sigmoid heads can give it, and it is dropped, as
    ``inference_detector`` drops it (until 2026-11-27 it became the last class).

    With ``predictions_file`` they are also written there as COCO results JSON, RLE masks included for mask
    models, batch by batch as the model produces them: no list of result dicts for the whole set is ever held.
    """
    from pycocotools import mask as mask_utils  # heavy: imported when predicting, not when the module loads

    model.eval().to(device)
    parts, info = [], {image["id"]: image for image in dataset.images}
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collate)
    with contextlib.ExitStack() as stack:
        results_file = stack.enter_context(ResultsFile(predictions_file)) if predictions_file else None
        for images, targets in loader:
            check_terminated()
            images, _ = to_device(list(images), [], device)
            outputs, segmentations = [], []  # per image: (id, boxes, scores, labels); per detection: its RLE
            for image, out, target in zip(images, model(images), targets):
                boxes, scores = out["boxes"].float().cpu().numpy(), out["scores"].float().cpu().numpy()
                _check_output(dataset.coco_file, info[int(target["image_id"])], image, boxes, scores)
                keep = (out["scores"] >= score_thr) & (out["labels"] >= 1)  # 0: background (sigmoid heads give it)
                kept = keep.cpu().numpy()
                outputs.append((int(target["image_id"]), boxes[kept], scores[kept], out["labels"][keep].cpu().numpy()))
                if results_file is not None and "masks" in out and kept.any():
                    masks = (out["masks"][keep, 0] > 0.5).cpu().numpy().view(np.uint8)  # N x H x W
                    segmentations += [{"size": rle["size"], "counts": rle["counts"].decode()}
                                      for rle in mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0)))]
            parts.append(Detections.from_outputs(outputs, dataset.cat_ids))  # the batch at once: far faster
            if results_file is not None:
                results_file.add_detections(parts[-1], segmentations)
    return Detections.concat(parts)


def _check_output(coco_file: Path, info: dict, image: torch.Tensor, boxes: np.ndarray, scores: np.ndarray) -> None:
    """The model's detections on an image are finite, and in the pixels of the image the COCO file describes: else
    scores and masks would be wrong or unusable (ultrafast-pycocotools hangs on masks of another size)."""
    if tuple(image.shape[-2:]) != (info["height"], info["width"]):
        raise DetpipeError(f"{coco_file}: {info['file_name']} is {image.shape[-1]}x{image.shape[-2]} pixels, the "
                           f"file says {info['width']}x{info['height']}; run the convert stage again")
    if not (np.isfinite(boxes).all() and np.isfinite(scores).all()):
        raise DetpipeError(f"{info['file_name']}: the model's boxes or scores are NaN or infinite; its weights are "
                           f"broken (train it again, with a lower train.lr)")


def evaluate(model, dataset: CocoDetection, device, batch_size: int = 8, score_thr: float = 0.0,
             backend: str = "ultrafast", predictions_file: Path | None = None) -> tuple[Detections, dict]:
    """Predictions (columns) and ``{iou_type: coco_evaluate result}``; segm only for models that predict masks.

    ``backend``: the COCO evaluation library (``evaluate.backend``, see :mod:`detpipe.metrics`).
    The predictions are written as COCO results JSON to ``predictions_file`` (else to a temporary file) as they
    are made, and the library reads that file and the dataset's own COCO file: nothing is written for it alone.
    """
    types = ["bbox", "segm"] if dataset.with_masks else ["bbox"]
    with contextlib.ExitStack() as stack:
        if predictions_file is None:
            predictions_file = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="detpipe-val-"))) / "p.json"
        dets = predict(model, dataset, device, batch_size, score_thr, predictions_file)
        files = dataset.coco_file, predictions_file
        return dets, {t: coco_evaluate(dataset.coco, dets, t, backend, files=files) for t in types}
