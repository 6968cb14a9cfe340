"""What ``train.mask_targets: cropped`` saves a Mask R-CNN's training, against torchvision's image-sized masks.

    python -m benchmarks.bench_mask_targets --json docs/bench_mask_targets.json
    python -m benchmarks.bench_mask_targets --coco data/coco/train.json --image-root data/raw   # your own dataset

Without ``--coco`` it writes a seeded photo-like set: ``--images`` JPEGs of bench_canvas' COCO-like sizes, each with
1 + Poisson(6) objects (COCO has 7.3 per image) whose outlines (16 vertices) have radii drawn log-uniformly from 6
to 200 px, so that about as many are small as large. For ``full`` and then ``cropped`` mask targets it measures,
on the same images, augmentation draws and model seed:

1. loading: the train set's items as the train stage makes them (outlines rasterised, ``--hflip`` and
   ``--scale-range`` augmentation), in ms per image, and the bytes of mask targets per image (what the DataLoader
   collates, pins and copies to the GPU);
2. the model's transform of batches of ``--batch`` (torchvision resizes image-sized masks with the images to
   ``--min-size``/``--max-size``; crops are left as they are): ms per batch, and the bytes of masks after it
   (torchvision resizes them in float32, four times that, before making them bytes again);
3. ``--iters`` training iterations of a small Mask R-CNN (ResNet-10, 64-channel FPN, a mask head as wide or
   ``--mask-head-channels`` wide) at those sizes on this CPU, after one untimed: seconds per iteration and the
   mask loss.

Figures are CPU figures; what the smaller copies and resizes give on a GPU is not measured here.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from benchmarks.bench_canvas import photo_sizes
from benchmarks.bench_default import cpu_model
from detpipe.datasets import CocoDetection
from detpipe.files import read_json, write_json
from detpipe.models import build_model
from detpipe.transforms import train_transforms

KINDS = ("full", "cropped")


def write_set(root: Path, count: int, seed: int) -> Path:
    """JPEGs and a COCO file of photo-like images with COCO-like objects; returns the COCO file."""
    rng = np.random.default_rng(seed)
    images, anns = [], []
    for i, (height, width) in enumerate(photo_sizes(count, seed)):
        picture = Image.new("RGB", (width, height), tuple(int(v) for v in rng.integers(0, 256, 3)))
        draw = ImageDraw.Draw(picture)
        for _ in range(1 + int(rng.poisson(6))):
            r = math.exp(rng.uniform(math.log(6), math.log(200)))
            cx, cy = rng.uniform(0, width), rng.uniform(0, height)
            t = np.sort(rng.uniform(0, 2 * math.pi, 16))
            radius = r * rng.uniform(0.6, 1, 16)
            xs = np.clip(cx + radius * np.cos(t), 0, width)
            ys = np.clip(cy + radius * np.sin(t), 0, height)
            if xs.max() - xs.min() < 2 or ys.max() - ys.min() < 2:
                continue
            draw.polygon(list(zip(xs, ys)), fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": 1, "iscrowd": 0,
                         "bbox": [float(xs.min()), float(ys.min()), float(xs.max() - xs.min()),
                                  float(ys.max() - ys.min())],
                         "area": float((xs.max() - xs.min()) * (ys.max() - ys.min())),
                         "segmentation": [[round(float(v), 1) for v in np.stack([xs, ys], 1).ravel()]]})
        picture.save(root / f"{i:05d}.jpg", quality=90)
        images.append({"id": i + 1, "file_name": f"{i:05d}.jpg", "height": height, "width": width})
    write_json(root / "coco.json", {"images": images, "annotations": anns,
                                    "categories": [{"id": 1, "name": "object"}]})
    return root / "coco.json"


def the_set(args, tmp: Path) -> tuple[Path, Path]:
    """``--coco`` and its image folder (checked), or a set written to ``tmp`` by :func:`write_set`."""
    if not args.coco:
        return write_set(tmp, args.images, args.seed), tmp
    read_json(args.coco, "COCO file")  # a one-line error for a bad file
    return args.coco, args.image_root or args.coco.parent


def mask_bytes(target: dict) -> int:
    return sum(target[k].numel() * target[k].element_size() for k in ("masks", "mask_crops") if k in target)


def measure(coco: Path, image_root: Path, kind: str, args) -> dict:
    dataset = CocoDetection(coco, image_root, with_masks=True, mask_targets=kind,
                            transforms=train_transforms(args.hflip, args.seed, tuple(args.scale_range)))
    count = min(len(dataset), args.images)
    start, items = time.perf_counter(), [dataset[i] for i in range(count)]
    load_ms = (time.perf_counter() - start) / count * 1e3
    torch.manual_seed(args.seed)
    model = build_model("maskrcnn", "resnet10", 2, min_size=args.min_size, max_size=args.max_size, fpn_channels=64,
                        mask_head_channels=args.mask_head_channels)
    batches = [items[i:i + args.batch] for i in range(0, count - args.batch + 1, args.batch)]
    as_input = lambda batch: ([im.float() / 255 for im, _ in batch], [dict(t) for _, t in batch])
    transform_s, resized_bytes = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            images, targets = as_input(batch)
            start = time.perf_counter()
            _, out = model.transform.train()(images, targets)
            transform_s += time.perf_counter() - start
            resized_bytes += sum(mask_bytes(t) for t in out)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.002, momentum=0.9)
    iter_s, loss_mask = [], []
    torch.manual_seed(args.seed)  # the same proposals sampled for both kinds
    for i in range(args.iters + 1):
        images, targets = as_input(batches[i % len(batches)])
        start = time.perf_counter()
        losses = model(images, targets)
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
        if i:  # the first one warms up
            iter_s.append(time.perf_counter() - start)
            loss_mask.append(round(losses["loss_mask"].item(), 4))
    return {"mask_targets": kind, "images": count, "objects_per_image": round(
                sum(len(t["labels"]) for _, t in items) / count, 2),
            "load_ms_per_image": round(load_ms, 2),
            "mask_target_kb_per_image": round(sum(mask_bytes(t) for _, t in items) / count / 1024, 1),
            "transform_ms_per_batch": round(transform_s / len(batches) * 1e3, 1),
            "resized_mask_mb_per_batch": round(resized_bytes / len(batches) / 2**20, 2),
            "train_s_per_iter": round(sum(iter_s) / len(iter_s), 3), "loss_mask": loss_mask}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--coco", type=Path, help="a COCO file with outlines (default: a generated photo-like set)")
    parser.add_argument("--image-root", type=Path, help="its images' folder (with --coco)")
    parser.add_argument("--images", type=int, default=96, help="images to load (and to generate)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--iters", type=int, default=3, help="timed training iterations (one more untimed)")
    parser.add_argument("--min-size", type=int, default=800)
    parser.add_argument("--max-size", type=int, default=1333)
    parser.add_argument("--hflip", type=float, default=0.5)
    parser.add_argument("--scale-range", type=float, nargs=2, default=[0.8, 1.25])
    parser.add_argument("--mask-head-channels", type=int, help="the mask head's width (default: the FPN's, 64; "
                        "256 is torchvision's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        coco, root = the_set(args, Path(tmp))
        results = [measure(coco, root, kind, args) for kind in KINDS]
    print(f"{'mask targets':<13}{'load ms/img':>12}{'mask KB/img':>12}{'transform ms/batch':>19}"
          f"{'resized MB/batch':>17}{'train s/iter':>13}  loss_mask")
    for r in results:
        print(f"{r['mask_targets']:<13}{r['load_ms_per_image']:>12}{r['mask_target_kb_per_image']:>12}"
              f"{r['transform_ms_per_batch']:>19}{r['resized_mask_mb_per_batch']:>17}{r['train_s_per_iter']:>13}"
              f"  {r['loss_mask']}")
    full, cropped = results
    print(f"{results[0]['objects_per_image']} objects per image; cropped/full: loading "
          f"{cropped['load_ms_per_image'] / full['load_ms_per_image']:.2f}x, mask bytes "
          f"{cropped['mask_target_kb_per_image'] / full['mask_target_kb_per_image']:.3f}x, transform "
          f"{cropped['transform_ms_per_batch'] / full['transform_ms_per_batch']:.2f}x, training iteration "
          f"{cropped['train_s_per_iter'] / full['train_s_per_iter']:.2f}x   CPU: {cpu_model()}")
    if args.json:
        settings = {k: v for k, v in vars(args).items() if k != "json"}
        write_json(args.json, {"command": "python -m benchmarks.bench_mask_targets", "settings": json.loads(
            json.dumps(settings, default=str)), "machine": {"cpu": cpu_model(), "python": platform.python_version(),
                                                           "torch": torch.__version__,
                                                           "threads": torch.get_num_threads()},
                               "results": results})


if __name__ == "__main__":
    main()
