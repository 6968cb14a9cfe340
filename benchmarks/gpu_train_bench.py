"""Training speed on a GPU: detpipe's loop with its speed levers beside a plain torchvision loop, same data.

    python -m benchmarks.gpu_train_bench --json gpu_train_bench.json     # on a GPU machine, one call (~5 min)
    python -m benchmarks.gpu_train_bench --smoke                         # the same code on the CPU, tiny sizes

Generates photo-like JPEGs (800x1333 by default, 1-8 boxes each, box-shaped masks) in a temporary folder,
then for each model (torchvision builders via detpipe.models.build_model, no weights) and each precision (fp32,
bf16 autocast) trains, on the same images and batches of 8:

* ``plain``: the loop of torchvision's detection references: PIL decode and float conversion in DataLoader workers,
  ``.to(device)``, ``loss.item()`` every iteration, plain SGD;
* ``ours``: ``detpipe.engine.train_one_epoch`` with the levers of docs/training.md ("GPU speed"): losses read at
  log points only, fused SGD, channels_last, pinned memory and persistent workers, JPEGs decoded on the GPU
  (nvJPEG, which drains the stream before each batch's decode), cuDNN benchmark except for Mask R-CNN
  (``--cudnn-benchmark``),
  torch.compile of the backbone with ``--compile``; it clips gradients (``train.clip_grad_norm`` 10) as the
  train stage does;
* ``ours-worker-decode``: the same, but JPEGs decoded to uint8 in the DataLoader workers (``train.gpu_decode:
  false``): no drain, a pinned uint8 copy per image instead;
* ``ours-grouped`` and ``ours-canvas`` (asked for by ``--loops``, for ``--photo-sizes``: images of many sizes):
  ``ours-worker-decode`` with batches grouped by orientation (``train.group_aspect_ratio``), and that with
  ``model.fixed_canvas`` too (compiled with static shapes under ``--compile``): the canvas's share alone;
* ``ours-full-masks`` (asked for by ``--loops``): ``ours-worker-decode`` with torchvision's image-sized mask
  targets (``train.mask_targets: full``); every other loop of ours has the default, masks cut to the objects:
  for Mask R-CNN, the share of ``mask_targets`` alone;
* ``ours-parallel-rpn`` (asked for by ``--loops``): ``ours-worker-decode`` with ``train.parallel_rpn`` (Faster and
  Mask R-CNN: each image's RPN proposals filtered in a thread and CUDA stream of its own);
* ``ours-sync-free`` (asked for by ``--loops``): ``ours-worker-decode`` with ``train.sync_free_inputs`` (no
  host-device sync before the backbone), ``ours-sync-free-rpn``, that with ``train.parallel_rpn`` too (Faster and
  Mask R-CNN), and ``ours-sync-free-loss``, that with ``train.sync_free_loss`` too (FCOS: no sync in the step).

``--check-rpn`` first checks, on the device, that ``train.parallel_rpn`` keeps torchvision's proposals bit for bit
(8 sets of random proposals as dense as at 800x1333, fp32 and bf16 autocast) and times both filterings.

Prints images per second after the warm-up iterations, each loop's ratio to plain and peak GPU memory; writes
JSON. ``--profile FILE`` then profiles ``ours`` (or the ``--profile-loop``) on the first model (torch.profiler,
the timed iterations) and writes to FILE how busy the GPU was, each part of the model's CPU and GPU time, and the
top operators by GPU and by CPU time; on a GPU, one more run of that loop then counts its host-device syncs by the
lines they came from.
Imports neither pycocotools nor MLflow (the lent GPU machines have neither).
"""

from __future__ import annotations

import argparse
import collections
import functools
import gc
import json
import platform
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image, ImageDraw

try:
    from benchmarks.bench_canvas import photo_sizes
    from detpipe import engine
    from detpipe.datasets import CocoDetection, collate
    from detpipe.models import build_model
    from detpipe.rpn import ParallelRPN, parallel_rpn
    from detpipe.syncfree import sync_free_inputs, sync_free_loss
except ModuleNotFoundError as exc:  # the GPU machine's image lacks some of detpipe's small dependencies
    sys.exit(f"error: Python package {exc.name} is missing: carry its wheel (docs/performance.md, GPU training)")

LOOPS = ("plain", "ours", "ours-worker-decode", "ours-grouped", "ours-canvas", "ours-full-masks", "ours-parallel-rpn",
         "ours-sync-free", "ours-sync-free-rpn", "ours-sync-free-loss")
MODELS = ("fasterrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn", "retinanet_resnet50_fpn", "fcos_resnet50_fpn")
CLASSES = 5
RPN_MODELS = ("fasterrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn")  # the loops with parallel_rpn run for these only
# where SyncCensus attributes a sync: the innermost lines in these folders (anything else is torch's own code)
OURS_AND_TORCHVISION = (Path(engine.__file__).resolve().parent, Path(__file__).resolve().parent,
                        Path(torchvision.__file__).resolve().parent)


def make_images(folder: Path, distinct: int, total: int, height: int, width: int, seed: int = 0,
                sizes: list[tuple[int, int]] | None = None) -> Path:
    """``distinct`` JPEGs (smooth background, noise, filled shapes) listed ``total`` times in a COCO file; all
    ``height`` x ``width``, or image i ``sizes[i]``."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    boxes_of, size_of = [], []
    for i in range(distinct):
        height, width = sizes[i] if sizes else (height, width)
        size_of.append((height, width))
        yy, xx = np.mgrid[0:height, 0:width]
        base = (np.stack([xx / width, yy / height, (xx + yy) / (width + height)], -1) * rng.uniform(60, 200, 3))
        pixels = np.clip(base + rng.normal(0, 12, (height, width, 3)), 0, 255).astype(np.uint8)
        image = Image.fromarray(pixels)
        draw = ImageDraw.Draw(image)
        boxes = []
        for _ in range(rng.integers(1, 9)):
            w, h = rng.uniform(0.05, 0.4) * width, rng.uniform(0.05, 0.4) * height
            x, y = rng.uniform(0, width - w), rng.uniform(0, height - h)
            draw.ellipse([x, y, x + w, y + h], fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
            boxes.append(([round(x, 1), round(y, 1), round(w, 1), round(h, 1)], int(rng.integers(1, CLASSES + 1))))
        image.save(folder / f"{i:04d}.jpg", quality=90)
        boxes_of.append(boxes)
    images, anns = [], []
    for k in range(total):
        height, width = size_of[k % distinct]
        images.append({"id": k + 1, "file_name": f"{k % distinct:04d}.jpg", "width": width, "height": height})
        for bbox, cat in boxes_of[k % distinct]:
            anns.append({"id": len(anns) + 1, "image_id": k + 1, "category_id": cat, "bbox": bbox,
                         "area": bbox[2] * bbox[3], "iscrowd": 0})
    coco = {"images": images, "annotations": anns,
            "categories": [{"id": c, "name": f"class{c}"} for c in range(1, CLASSES + 1)]}
    (folder / "train.json").write_text(json.dumps(coco))
    return folder / "train.json"


class PlainDataset(torch.utils.data.Dataset):
    """As torchvision's detection references read COCO: a PIL image made a float tensor in the worker."""

    def __init__(self, coco_file: Path, with_masks: bool):
        self.coco, self.root, self.with_masks = json.loads(coco_file.read_text()), coco_file.parent, with_masks
        self.anns = {img["id"]: [] for img in self.coco["images"]}
        for ann in self.coco["annotations"]:
            self.anns[ann["image_id"]].append(ann)

    def __len__(self) -> int:
        return len(self.coco["images"])

    def __getitem__(self, index: int):
        from torchvision.transforms import functional as F

        info = self.coco["images"][index]
        image = F.to_tensor(Image.open(self.root / info["file_name"]).convert("RGB"))
        anns = self.anns[info["id"]]
        boxes = torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                              for a in anns], dtype=torch.float32)
        target = {"boxes": boxes, "labels": torch.tensor([a["category_id"] for a in anns])}
        if self.with_masks:
            masks = torch.zeros(len(anns), info["height"], info["width"], dtype=torch.uint8)
            for m, (x1, y1, x2, y2) in zip(masks, boxes.round().int().tolist()):
                m[y1:y2, x1:x2] = 1
            target["masks"] = masks
        return image, target


class SyncCensus:
    """Counts the host-device syncs that torch.cuda's sync debug mode reports, by the two innermost lines of
    torchvision, detpipe or this script that led to each (a context manager; CUDA only)."""

    def __init__(self):
        self.sites = collections.Counter()

    def __enter__(self):
        self.saved = warnings.showwarning, warnings.filters[:]
        warnings.simplefilter("always")  # every sync, not the first one per line
        warnings.showwarning = self.record
        torch.cuda.set_sync_debug_mode("warn")
        return self

    def record(self, message, *args, **kwargs):
        if "synchroniz" not in str(message):
            return self.saved[0](message, *args, **kwargs)
        stack = [f for f in traceback.extract_stack()[:-1] if not f.filename.endswith("warnings.py")]
        frames = [f for f in stack if any(Path(f.filename).resolve().is_relative_to(d) for d in OURS_AND_TORCHVISION)]
        frames = frames[-2:] or stack[-1:]  # else the innermost Python line (none: the backward's threads)
        self.sites[" < ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(frames)) or "?"] += 1

    def __exit__(self, *exc):
        torch.cuda.set_sync_debug_mode(0)
        warnings.showwarning, warnings.filters[:] = self.saved


class Timed:
    """Passes a loader's batches on; times the iterations after the first ``warmup`` (the GPU synced at both ends).
    ``profiler`` and ``census`` (a :class:`SyncCensus`) are on over those iterations only."""

    def __init__(self, loader, warmup: int, device: torch.device, profiler=None, census=None):
        self.loader, self.warmup, self.device, self.profiler, self.census = loader, warmup, device, profiler, census
        self.dataset = loader.dataset  # train_one_epoch decodes with the dataset's transforms
        self.start = self.end = None

    def __len__(self) -> int:
        return len(self.loader)

    def _sync(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def __iter__(self):
        counting = False
        try:
            for i, batch in enumerate(self.loader):
                if i == self.warmup:
                    self.start = self._sync()
                    if self.profiler is not None:
                        self.profiler.start()
                    if self.census is not None:
                        counting = self.census.__enter__()
                yield batch
        finally:  # also when the loop fails: the sync debug mode and the warning hooks back as they were
            if counting:
                self.census.__exit__()
        self.end = self._sync()
        if self.profiler is not None and self.start is not None:
            self.profiler.stop()


def plain_loop(model, loader, device: torch.device, amp: bool) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=1e-3, momentum=0.9, weight_decay=1e-4)
    model.train()
    for images, targets in loader:
        images = [im.to(device) for im in images]
        targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            losses = sum(model(images, targets).values())
        if not np.isfinite(losses.item()):
            raise FloatingPointError(f"loss is {losses.item()}")
        optimizer.zero_grad()
        losses.backward()
        optimizer.step()


def our_loop(model, loader, device: torch.device, amp: bool) -> None:
    optimizer = engine.build_optimizer(model, lr=1e-3, momentum=0.9, weight_decay=1e-4, fused=True)
    scheduler = engine.build_scheduler(optimizer, len(loader), 0, "constant")
    engine.train_one_epoch(model, optimizer, scheduler, loader, device, 1, amp=amp, amp_dtype=torch.bfloat16,
                           log_interval=20, deferred_sync=True, log=lambda msg: None)


def mark_phases(model) -> None:
    """Mark each forward of the model's parts (transform, backbone, RPN, RoI heads, dense head, dense losses) as a
    ``phase: NAME`` range for torch.profiler: its CPU time and the GPU time of the kernels it launched."""
    from torch.autograd.profiler import record_function

    def marked(name, call):
        def run(*args, **kwargs):
            with record_function(f"phase: {name}"):
                return call(*args, **kwargs)
        return run

    for name in ("transform", "backbone", "rpn", "roi_heads", "head"):
        part = getattr(model, name, None)
        if part is not None:
            part.forward = marked(name, part.forward)
    if hasattr(model, "compute_loss"):  # RetinaNet and FCOS: matching and losses outside their head
        model.compute_loss = marked("compute_loss", model.compute_loss)


def run_one(args, coco: Path, name: str, loop: str, amp: bool, device: torch.device, profiler=None,
            census=None) -> dict:
    masks = name.startswith("maskrcnn")
    torch.manual_seed(0)
    model = build_model(name, "resnet50", CLASSES + 1, min_size=args.min_size, max_size=args.max_size,
                        fixed_canvas=loop == "ours-canvas").to(device)
    if profiler is not None:
        mark_phases(model)
    generator = torch.Generator().manual_seed(0)
    cuda = device.type == "cuda"
    if loop == "plain":
        torch.backends.cudnn.benchmark = False
        loader = torch.utils.data.DataLoader(PlainDataset(coco, masks), batch_size=args.batch, shuffle=True,
                                             num_workers=args.workers, collate_fn=collate, generator=generator)
    else:
        benchmark = {"auto": not masks, "on": True, "off": False}[args.cudnn_benchmark]
        engine.speed_up(model, channels_last=True, compile=args.compile, cudnn_benchmark=cuda and benchmark,
                        static_shapes=loop == "ours-canvas")
        if loop in ("ours-parallel-rpn", "ours-sync-free-rpn"):
            parallel_rpn(model)
        if loop in ("ours-sync-free", "ours-sync-free-rpn", "ours-sync-free-loss"):
            sync_free_inputs(model)
        if loop == "ours-sync-free-loss":
            sync_free_loss(model)
        dataset = CocoDetection(coco, coco.parent, with_masks=masks, encoded=cuda and loop == "ours",
                                mask_targets="full" if loop == "ours-full-masks" else "cropped")
        loader = engine.train_loader(dataset, args.batch, args.workers, generator, device, pin_memory=True,
                                     prefetch_factor=4, persistent_workers=args.workers > 0,
                                     group_aspect_ratio=loop in ("ours-grouped", "ours-canvas"))
    timed = Timed(loader, args.warmup, device, profiler, census)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    (plain_loop if loop == "plain" else our_loop)(model, timed, device, amp)
    images = (len(loader) - args.warmup) * args.batch
    row = {"model": name, "loop": loop, "amp": "bf16" if amp else "fp32", "images_timed": images,
           "img_per_s": round(images / (timed.end - timed.start), 2),
           "peak_mem_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if cuda else None,
           "rpn": type(model.rpn).__name__ if hasattr(model, "rpn") else None,
           "sync_free": type(model).__name__.startswith("SyncFree"),
           "sync_free_loss": type(getattr(model, "head", None)).__name__.startswith("SyncFree")}
    del model, loader, timed
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny: 160x128 images, batch 2, 1 model, 2 timed iterations")
    p.add_argument("--models", nargs="+", choices=MODELS, help=f"default: all four ({', '.join(MODELS)})")
    p.add_argument("--amp", choices=("both", "off", "on"), default="both", help="fp32, bf16 autocast, or both")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--iters", type=int, default=20, help="timed iterations per run")
    p.add_argument("--warmup", type=int, default=5, help="iterations before timing starts")
    p.add_argument("--workers", type=int, default=8, help="DataLoader workers of both loops")
    p.add_argument("--compile", action="store_true", help="ours: torch.compile the backbone (warm-up then compiles)")
    p.add_argument("--loops", nargs="+", choices=LOOPS, default=list(LOOPS[:3]), help="default: the first three")
    p.add_argument("--photo-sizes", action="store_true",
                   help="images of a photo-like mix of sizes and orientations (bench_canvas) instead of one size")
    p.add_argument("--cudnn-benchmark", choices=("auto", "on", "off"), default="auto",
                   help="ours: cuDNN's algorithm search per input shape; auto: on but for Mask R-CNN")
    p.add_argument("--check-rpn", action="store_true", help="first check and time train.parallel_rpn's filtering")
    p.add_argument("--profile", type=Path, help="then profile a loop of ours on the first model; write the tables here")
    p.add_argument("--profile-loop", choices=LOOPS[1:], default="ours", help="the loop --profile profiles (ours)")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", type=Path, help="write the results here")
    args = p.parse_args()
    height, width = 800, 1333
    args.min_size, args.max_size = 800, 1333
    if args.smoke:
        height, width, args.min_size, args.max_size = 128, 160, 128, 160
        args.batch, args.iters, args.warmup, args.workers = 2, 2, 1, 0
        args.models, args.amp = args.models or ["fcos_resnet50_fpn"], "off"
    device = engine.resolve_device(args.device)
    precisions = {"both": (False, True), "off": (False,), "on": (True,)}[args.amp]
    results = []
    info = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
            "torch": torch.__version__, "python": platform.python_version(), "batch": args.batch,
            "image_size": "photo-like mix" if args.photo_sizes else [height, width],
            "timed_iters": args.iters, "warmup_iters": args.warmup, "workers": args.workers,
            "compile": args.compile, "cudnn_benchmark": args.cudnn_benchmark, "smoke": args.smoke}

    def save():  # after each model too: a time limit then keeps what is done
        if args.json:
            args.json.write_text(json.dumps({"setup": info, "results": results}, indent=1) + "\n")

    if args.check_rpn:
        results.append(check_rpn(device, 2 if args.smoke else 8))
        print(json.dumps(results[-1]), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        distinct = min(32, args.batch * (args.warmup + args.iters))
        sizes = photo_sizes(distinct, 0) if args.photo_sizes else None
        coco = make_images(Path(tmp), distinct, args.batch * (args.warmup + args.iters), height, width, sizes=sizes)
        for name in args.models or MODELS:
            for amp in precisions:
                runs = {}
                for loop in args.loops:
                    if loop in ("ours-parallel-rpn", "ours-sync-free-rpn") and name not in RPN_MODELS:
                        continue  # no RPN: the same as ours-worker-decode
                    if loop == "ours-sync-free-loss" and not name.startswith("fcos"):
                        continue  # the same as ours-sync-free
                    try:
                        runs[loop] = run_one(args, coco, name, loop, amp, device)
                    except Exception as exc:  # one failure (out of memory, a NaN) must not lose the other runs
                        runs[loop] = {"model": name, "loop": loop, "amp": "bf16" if amp else "fp32",
                                      "error": f"{type(exc).__name__}: {exc}"[:500]}
                        gc.collect()
                        if device.type == "cuda":
                            torch.cuda.empty_cache()
                    print(json.dumps(runs[loop]), flush=True)
                for row in runs.values():
                    if row["loop"] != "plain" and "img_per_s" in row and "img_per_s" in runs.get("plain", {}):
                        row["ratio_to_plain"] = round(row["img_per_s"] / runs["plain"]["img_per_s"], 3)
                results += runs.values()
                save()
        print(f"{'model':26} {'amp':5} {'loop':19} {'img/s':>7} {'/plain':>7} {'peak GiB':>8}")
        for row in results:
            if "model" not in row:
                continue
            ips, ratio, peak = (f"{row[k]}" if row.get(k) is not None else "-"
                                for k in ("img_per_s", "ratio_to_plain", "peak_mem_gib"))
            print(f"{row['model']:26} {row['amp']:5} {row['loop']:19} {ips:>7} {ratio:>7} {peak:>8} "
                  f"{row.get('error', '')[:60]}")
        save()  # before the profile, which a time limit may cut short
        if args.profile:
            profile(args, coco, (args.models or MODELS)[0], precisions[-1], device)


def check_rpn(device: torch.device, images: int) -> dict:
    """torchvision's RPN filtering and ``train.parallel_rpn``'s on the same proposals (``images`` random sets as
    dense as an 800x1333 image's, each image its own size, Faster R-CNN's training settings), in fp32 and in the
    dtypes the RPN hands over under bf16 autocast (boxes fp32, objectness bf16): equal bit for bit, at every one
    of 10 repeats, with the inputs overwritten and fresh tensors of the filtering's own sizes filled with NaN on
    the main stream right after each call, without a sync (a missing stream wait would let the side streams read
    them)? And each filtering's time."""
    from torchvision.models.detection.rpn import RegionProposalNetwork

    model = build_model("fasterrcnn_resnet50_fpn", "resnet50", CLASSES + 1, min_size=800, max_size=1333)
    parallel_rpn(model)
    rpn = model.rpn.to(device).train()
    g = torch.Generator(device).manual_seed(0)
    per_level = [3 * h * w for h, w in ((200, 336), (100, 168), (50, 84), (25, 42), (13, 21))]
    count, top_n = sum(per_level), sum(min(n, rpn._pre_nms_top_n["training"]) for n in per_level)
    xy = torch.rand(images, count, 2, device=device, generator=g) * torch.tensor([1333, 800], device=device)
    wh = torch.rand(images, count, 2, device=device, generator=g) * 300 + 0.5
    proposals, objectness = torch.cat([xy, xy + wh], 2), torch.randn(images, count, device=device, generator=g)
    shapes = [(800 - 24 * i, 1333 - 40 * i) for i in range(images)]
    row = {"check": "parallel_rpn", "images": images, "boxes_per_image": count, "repeats": 10}
    ParallelRPN.parallel_on_cpu = device.type != "cuda"  # the smoke run's threads on the CPU
    try:
        for amp in (False, True):
            key = "bf16" if amp else "fp32"
            scores = objectness.to(torch.bfloat16) if amp else objectness
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                want = RegionProposalNetwork.filter_proposals(rpn, proposals, scores, shapes, per_level)
                equal = True
                for name, filter_ in (("torchvision", functools.partial(RegionProposalNetwork.filter_proposals, rpn)),
                                      ("parallel", rpn.filter_proposals)):
                    filter_(proposals, scores, shapes, per_level)  # warm-up (threads, streams, kernels)
                    spent = 0.0
                    for _ in range(10):
                        boxes_in, scores_in = proposals.clone(), scores.clone()
                        if device.type == "cuda":
                            torch.cuda.synchronize(device)
                        began = time.perf_counter()
                        got = filter_(boxes_in, scores_in, shapes, per_level)
                        boxes_in.fill_(float("nan"))  # queued on the main stream, no sync
                        scores_in.fill_(float("nan"))
                        scratch = [torch.full((images, top_n, *size), float("nan"), device=device)  # in the blocks
                                   for size in ((4,), ())]  # the filtering's own top-n copies freed, if not waited on
                        del scratch
                        if device.type == "cuda":
                            torch.cuda.synchronize(device)
                        spent += time.perf_counter() - began
                        equal &= all(torch.equal(a, b) for a, b in zip(want[0] + want[1], got[0] + got[1]))
                    row[f"{key}_{name}_ms"] = round(spent * 100, 2)
            row[f"{key}_equal"] = equal
            row[f"{key}_kept"] = [len(b) for b in want[0]]
    finally:
        ParallelRPN.parallel_on_cpu = False
    return row


def profile(args, coco: Path, name: str, amp: bool, device: torch.device) -> None:
    """``args.profile_loop`` on ``name`` under torch.profiler over the timed iterations: the top operators by GPU
    and by CPU time, and the GPU's busy share (its kernels' time over the wall time; low: the host holds it back)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    cuda = device.type == "cuda"
    prof = torch_profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else []))
    row = run_one(args, coco, name, args.profile_loop, amp, device, profiler=prof)  # Timed starts and stops it
    events = prof.key_averages()
    wall_s = row["images_timed"] / row["img_per_s"]
    device_s = sum(e.self_device_time_total for e in events  # kernels (as the table's footer sums them)
                   if e.device_type == DeviceType.CUDA and not e.is_user_annotation) / 1e6
    head = f"{name} {args.profile_loop} {row['amp']}: {row['img_per_s']} img/s under the profiler, wall {wall_s:.2f} s"
    if cuda:
        head += f", GPU kernels {device_s:.2f} s ({100 * device_s / wall_s:.0f} % of the wall time)"
    phases = ["phase           where  CPU s  device s  calls"] + [  # the GPU's row: the span of its kernels
        f"{e.key[7:]:15} {e.device_type.name:5} {e.cpu_time_total / 1e6:6.2f} {e.device_time_total / 1e6:9.2f} "
        f"{e.count:6}" for e in sorted(events, key=lambda e: (e.key, e.device_type.name))
        if e.key.startswith("phase: ")]
    tables = [events.table(sort_by=key, row_limit=25) for key in
              (["self_device_time_total"] if cuda else []) + ["self_cpu_time_total"]]
    args.profile.write_text("\n\n".join([head, "\n".join(phases), *tables]) + "\n")
    print("\n".join(phases), flush=True)
    if cuda:  # a second run, as the profiler's overhead would distort the census and the census the profile
        census = SyncCensus()
        run_one(args, coco, name, args.profile_loop, amp, device, census=census)
        per_iter = sum(census.sites.values()) / args.iters
        lines = [f"host-device syncs per timed iteration of {args.profile_loop} (no profiler): {per_iter:.1f}, "
                 "by where from:"]
        lines += [f"{n / args.iters:7.1f}  {site}" for site, n in census.sites.most_common(40)]
        with args.profile.open("a") as f:
            f.write("\n" + "\n".join(lines) + "\n")
        print("\n".join(lines), flush=True)
    print(head, flush=True)


if __name__ == "__main__":
    main()
