"""What ``model.fixed_canvas`` changes in the batches a detector sees: input shapes, and padded pixels.

    python -m benchmarks.bench_canvas --json docs/bench_canvas.json
    python -m benchmarks.bench_canvas --coco data/coco/train.json          # your own dataset's image sizes

Each new input shape makes cuDNN's algorithm search (``train.cudnn_benchmark``) time every convolution again, and
``torch.compile`` (``train.compile``) specialise again or fall back to dynamic shapes; padding costs compute. For
one epoch of ``--images`` images in batches of ``--batch``, drawn as the train stage draws them (shuffled, or
grouped by orientation with ``train.group_aspect_ratio``), the model's own transform (torchvision's resize to
``--min-size``/``--max-size``, then the batch padding) runs on blank images of the dataset's sizes, with and
without the canvas. Prints, per case, the distinct batch shapes and the share of each batch's pixels that are
padding; writes JSON. No timing: the speed these shapes give needs a GPU (docs/performance.md).

Without ``--coco`` the sizes are a seeded mix like COCO's photos: 640x480 and 480x640, 640x427 and 427x640,
and a tail of other widths and heights from 300 to 640 pixels.
"""

from __future__ import annotations

import argparse
import platform
import random
from pathlib import Path

import torch

from detpipe.engine import GroupedBatchSampler
from detpipe.files import read_json, write_json
from detpipe.models import build_model

COMMON = [((480, 640), 0.45), ((640, 480), 0.12), ((427, 640), 0.18), ((640, 427), 0.05)]  # (height, width)


def photo_sizes(n: int, seed: int) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    sizes = []
    for _ in range(n):
        r, acc = rng.random(), 0.0
        for size, share in COMMON:
            acc += share
            if r < acc:
                sizes.append(size)
                break
        else:  # the tail: any orientation, 300-640 px a side
            sizes.append((rng.randint(300, 640), rng.randint(300, 640)))
    return sizes


def batch_shapes(sizes, batch: int, grouped: bool, canvas: bool, min_size: int, max_size: int, seed: int) -> dict:
    torch.manual_seed(0)
    transform = build_model("fasterrcnn", "resnet10", 2, min_size=min_size, max_size=max_size, fpn_channels=32,
                            fixed_canvas=canvas).transform.eval()
    sampler = torch.utils.data.RandomSampler(range(len(sizes)), generator=torch.Generator().manual_seed(seed))
    if grouped:
        batches = GroupedBatchSampler(sampler, [int(w >= h) for h, w in sizes], batch)
    else:
        batches = torch.utils.data.BatchSampler(sampler, batch, drop_last=False)
    shapes, image_px, batch_px = {}, 0, 0
    with torch.no_grad():
        for indices in batches:
            images = transform([torch.zeros(3, *sizes[i]) for i in indices])[0]
            shape = tuple(images.tensors.shape[-2:])
            shapes[shape] = shapes.get(shape, 0) + 1
            image_px += sum(h * w for h, w in images.image_sizes)
            batch_px += images.tensors.shape[0] * shape[0] * shape[1]
    return {"grouped": grouped, "fixed_canvas": canvas, "batches": sum(shapes.values()), "shapes": len(shapes),
            "padding_share": round(1 - image_px / batch_px, 4),
            "most_common": [[list(s), c] for s, c in sorted(shapes.items(), key=lambda kv: -kv[1])[:5]]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--coco", type=Path, help="take the image sizes of this COCO file (default: a photo-like mix)")
    p.add_argument("--images", type=int, default=1000, help="generated sizes (without --coco)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--min-size", type=int, default=800)
    p.add_argument("--max-size", type=int, default=1333)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="write the results here")
    args = p.parse_args()
    if args.coco:
        sizes = [(img["height"], img["width"]) for img in read_json(args.coco, "COCO file")["images"]]
    else:
        sizes = photo_sizes(args.images, args.seed)
    torch.set_num_threads(2)
    rows = [batch_shapes(sizes, args.batch, grouped, canvas, args.min_size, args.max_size, args.seed)
            for grouped in (False, True) for canvas in (False, True)]
    print(f"{len(sizes)} images ({args.coco or 'photo-like mix'}), batch {args.batch}, "
          f"min/max size {args.min_size}/{args.max_size}")
    print(f"{'batches':<24}{'fixed_canvas':<14}{'shapes':>7}{'padding':>9}  most common shapes (batches)")
    for r in rows:
        common = ", ".join(f"{h}x{w} ({c})" for (h, w), c in r["most_common"][:3])
        print(f"{'grouped by orientation' if r['grouped'] else 'shuffled':<24}{str(r['fixed_canvas']).lower():<14}"
              f"{r['shapes']:>7}{100 * r['padding_share']:>8.1f}%  {common}")
    if args.json:
        setup = {"command": "python -m benchmarks.bench_canvas" + (f" --coco {args.coco}" if args.coco else ""),
                 "images": len(sizes), "batch": args.batch, "min_size": args.min_size, "max_size": args.max_size,
                 "seed": args.seed, "sizes": str(args.coco) if args.coco else "photo-like mix",
                 "torch": torch.__version__, "python": platform.python_version()}
        write_json(args.json, {"setup": setup, "results": rows})


if __name__ == "__main__":
    main()
