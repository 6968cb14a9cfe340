"""How well Mask R-CNN's training targets survive torchvision's inference paste, per ``train.mask_targets``.

    python -m benchmarks.bench_mask_round_trip --json docs/bench_mask_round_trip.json
    python -m benchmarks.bench_mask_round_trip --coco data/coco/val.json --image-root data/raw --sizes 64 96 128

The round trip a perfect mask head makes: each object's own box as the proposal in the image the model resized to
``--sizes`` (its short side; ``--max-size`` caps the long one), its 28x28 training target (``full``: torchvision's,
from the image-sized mask resized with the image; ``cropped``: detpipe's, from the object's crop), pasted back
into the original image as torchvision's inference pastes predicted masks (``paste_masks_in_image``), thresholded
at 0.5 and compared with the object's mask: mean IoU and the mean offset of the centroids (pixels, x and y).
Without ``--coco`` the photo-like set of bench_mask_targets is generated (``--images`` images).
"""

from __future__ import annotations

import argparse
import platform
import tempfile
from pathlib import Path

import torch
from torchvision.models.detection.roi_heads import paste_masks_in_image, project_masks_on_boxes

from benchmarks.bench_default import cpu_model
from benchmarks.bench_mask_targets import the_set
from detpipe.datasets import CocoDetection
from detpipe.files import write_json
from detpipe.models import build_model

KINDS = ("full", "cropped")


def centroids(masks: torch.Tensor) -> torch.Tensor:
    """(x, y) of each of the N x H x W ``masks``' centroid, in pixels (pixel i's centre at i)."""
    ys, xs = torch.meshgrid(torch.arange(masks.shape[1]), torch.arange(masks.shape[2]), indexing="ij")
    weights = masks.flatten(1).float()
    return torch.stack([weights @ xs.flatten().float(), weights @ ys.flatten().float()], 1) / weights.sum(1,
                                                                                                       keepdim=True)


def round_trip(coco: Path, root: Path, size: int, max_size: int, images: int) -> list[dict]:
    model = build_model("maskrcnn", "resnet10", 2, min_size=size, max_size=max_size, fpn_channels=16)
    sets = {kind: CocoDetection(coco, root, with_masks=True, mask_targets=kind) for kind in KINDS}
    count = min(images, len(sets["full"]))
    full = [sets["full"][i] for i in range(count)]  # loaded once: the truth, and the full kind's items
    rows = []
    for kind in KINDS:
        ious, offsets = [], []
        for i in range(count):
            image, target = full[i] if kind == "full" else sets[kind][i]
            truth = full[i][1]["masks"].bool()
            with torch.no_grad():
                batch, (resized,) = model.transform.train()([image.float() / 255], [dict(target)])
            shape, boxes = batch.image_sizes[0], resized["boxes"]
            idx = torch.arange(len(boxes))
            if kind == "full":
                targets = project_masks_on_boxes(resized["masks"], boxes, idx, 28)
            else:
                in_crops = model.roi_heads.boxes_in_crops(boxes, resized["mask_frames"], shape)
                targets = project_masks_on_boxes(resized["mask_crops"], in_crops, idx, 28)
            height, width = image.shape[-2:]
            back = paste_masks_in_image(targets[:, None], target["boxes"], (height, width), padding=1)[:, 0] > 0.5
            real = truth.flatten(1).any(1)  # objects whose outline covers no pixel have no mask to compare
            back, truth = back[real], truth[real]
            ious += ((back & truth).flatten(1).sum(1) / (back | truth).flatten(1).sum(1)).tolist()
            kept = back.flatten(1).any(1)
            offsets += (centroids(back[kept]) - centroids(truth[kept])).tolist()
        if not offsets:
            raise SystemExit(f"error: {coco}: no object with a mask among the first {images} images")
        dx, dy = torch.tensor(offsets).mean(0).tolist()
        rows.append({"size": size, "mask_targets": kind, "objects": len(ious),
                     "mean_iou": round(sum(ious) / len(ious), 4), "offset_x": round(dx, 3), "offset_y": round(dy, 3)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--coco", type=Path, help="a COCO file with outlines (default: a generated photo-like set)")
    parser.add_argument("--image-root", type=Path, help="its images' folder (with --coco)")
    parser.add_argument("--images", type=int, default=48, help="images to use (and to generate)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[400, 600, 800, 1200])
    parser.add_argument("--max-size", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        coco, root = the_set(args, Path(tmp))
        rows = [row for size in args.sizes for row in round_trip(coco, root, size, args.max_size, args.images)]
    print(f"{'size':>5} {'mask targets':<13}{'objects':>8}{'mean IoU':>10}{'offset x':>10}{'offset y':>10}")
    for r in rows:
        print(f"{r['size']:>5} {r['mask_targets']:<13}{r['objects']:>8}{r['mean_iou']:>10}{r['offset_x']:>10}"
              f"{r['offset_y']:>10}")
    print(f"CPU: {cpu_model()}")
    if args.json:
        write_json(args.json, {"command": "python -m benchmarks.bench_mask_round_trip",
                               "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()
                                            if k != "json"},
                               "machine": {"cpu": cpu_model(), "python": platform.python_version(),
                                           "torch": torch.__version__}, "results": rows})


if __name__ == "__main__":
    main()
