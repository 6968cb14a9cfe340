"""Training augmentation as ``(image, target) -> (image, target)`` transforms of the dataset, seeded.

Images are uint8 CHW tensors, targets torchvision's dicts (``boxes`` x1, y1, x2, y2; optional ``masks``, or
``mask_crops`` with their ``mask_frames``: :func:`detpipe.datasets.cropped_masks`).
A random transform draws from its own ``torch.Generator``: the same seed and data order give the same
augmentation. With DataLoader workers, :func:`seed_worker` gives each worker its own stream.
"""

from __future__ import annotations

import random

import numpy as np
import torch


class Compose:
    def __init__(self, transforms: list):
        self.transforms = list(transforms)

    def __call__(self, image, target):
        for t in self.transforms:
            image, target = t(image, target)
        return image, target

    def reseed(self, seed: int) -> None:
        for i, t in enumerate(self.transforms):
            if hasattr(t, "reseed"):
                t.reseed(seed + 1000 * i)  # each transform its own stream, as in train_transforms

    def state(self) -> list:
        return [t.generator.get_state() for t in self.transforms if hasattr(t, "generator")]

    def load_state(self, states: list) -> None:
        for t, s in zip([t for t in self.transforms if hasattr(t, "generator")], states):
            t.generator.set_state(s)


class RandomHorizontalFlip:
    """Flip image, boxes and masks (or mask crops) left-right with probability ``prob`` (no draw when it is 0)."""

    def __init__(self, prob: float, seed: int):
        self.prob = prob
        self.generator = torch.Generator().manual_seed(seed)

    def reseed(self, seed: int) -> None:
        self.generator.manual_seed(seed)

    def __call__(self, image, target):
        if not self.prob or torch.rand((), generator=self.generator).item() >= self.prob:
            return image, target
        width = image.shape[-1]
        target = dict(target)
        boxes = target["boxes"].clone()
        boxes[:, [0, 2]] = width - target["boxes"][:, [2, 0]]
        target["boxes"] = boxes
        if "masks" in target:
            target["masks"] = target["masks"].flip(-1)
        if "mask_crops" in target:  # the stack flips whole: its point u moves to w - u, x to 1 - x (of the width)
            crops, frames = target["mask_crops"], target["mask_frames"].clone()
            frames[:, 0] = 1 - frames[:, 0] - crops.shape[-1] / frames[:, 2]
            target["mask_crops"], target["mask_frames"] = crops.flip(-1), frames
        return image.flip(-1), target


class RandomScale:
    """Zoom by a factor drawn from ``[low, high]``, keeping the image's size: a larger image is cropped at a
    random place, a smaller one is padded (right and bottom). Objects change size, which the model's own
    resize to ``min_size`` would otherwise undo. Boxes are moved and clipped; those left under 2 px go, with
    their labels and masks. ``low == high == 1`` draws nothing and changes nothing."""

    def __init__(self, low: float, high: float, seed: int):
        self.low, self.high = low, high
        self.generator = torch.Generator().manual_seed(seed)

    def reseed(self, seed: int) -> None:
        self.generator.manual_seed(seed)

    def __call__(self, image, target):
        if self.low == self.high == 1.0:
            return image, target
        u = torch.rand((), generator=self.generator).item()
        factor = self.low + (self.high - self.low) * u
        _, height, width = image.shape
        new_h, new_w = max(1, round(height * factor)), max(1, round(width * factor))
        resized = torch.nn.functional.interpolate(image[None].float(), size=(new_h, new_w), mode="bilinear",
                                                  align_corners=False)[0].round().clamp(0, 255).to(image.dtype)
        x0 = int(torch.randint(0, new_w - width + 1, (), generator=self.generator)) if new_w > width else 0
        y0 = int(torch.randint(0, new_h - height + 1, (), generator=self.generator)) if new_h > height else 0
        out = torch.zeros_like(image)
        crop = resized[:, y0:y0 + height, x0:x0 + width]
        out[:, :crop.shape[1], :crop.shape[2]] = crop
        target = dict(target)
        scale = torch.tensor([new_w / width, new_h / height, new_w / width, new_h / height])
        boxes = target["boxes"] * scale - torch.tensor([x0, y0, x0, y0], dtype=torch.float32)
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, min(width, new_w - x0))
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, min(height, new_h - y0))
        keep = ((boxes[:, 2] - boxes[:, 0]) >= 2) & ((boxes[:, 3] - boxes[:, 1]) >= 2)
        target["boxes"], target["labels"] = boxes[keep], target["labels"][keep]
        if "masks" in target and len(target["masks"]):
            masks = torch.nn.functional.interpolate(target["masks"][None].float(), size=(new_h, new_w),
                                                    mode="nearest")[0].to(target["masks"].dtype)
            out_masks = torch.zeros_like(target["masks"])
            part = masks[:, y0:y0 + height, x0:x0 + width]
            out_masks[:, :part.shape[1], :part.shape[2]] = part
            target["masks"] = out_masks[keep]
        if "mask_crops" in target:  # the crops stay as they are; their frames move with the image
            crops, frames = target["mask_crops"], target["mask_frames"].clone()
            if new_w < width or new_h < height:
                crops = _clear_beyond_edges(crops, frames, new_w < width, new_h < height)
            for axis, (f, shift, size) in enumerate(((new_w / width, x0, width), (new_h / height, y0, height))):
                frames[:, axis] = frames[:, axis] * f - shift / size
                frames[:, axis + 2] = frames[:, axis + 2] / f
            target["mask_crops"], target["mask_frames"] = crops[keep], frames[keep]
        return out, target


def _clear_beyond_edges(crops, frames, right: bool, bottom: bool):
    """Zoomed out, the image's right and bottom edges come inside it, with padding beyond: what crops hold past
    them (their border, which repeats the edge for ``roi_align``) is cleared, as the padding clears full masks."""
    crops = crops.clone()
    for crop, (ox, oy, sx, sy) in zip(crops, frames.tolist()):
        if right:  # the edge x = 1 (of the width) is at u = (1 - ox) * sx in the crop
            crop[:, max(0, round((1 - ox) * sx)):] = 0
        if bottom:
            crop[max(0, round((1 - oy) * sy)):] = 0
    return crops


def train_transforms(hflip: float, seed: int, scale_range: tuple[float, float] = (1.0, 1.0)) -> Compose:
    """The training augmentation; each random transform has its own stream, seeded apart from the data order."""
    return Compose([RandomHorizontalFlip(hflip, seed), RandomScale(*scale_range, seed + 1000)])


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: a worker's copy of the transforms gets a stream of its own.

    Derived from the worker's torch seed, which the DataLoader draws from its seeded generator per epoch.
    """
    info = torch.utils.data.get_worker_info()
    seed = info.seed % 2**32
    random.seed(seed)
    np.random.seed(seed)
    transforms = getattr(info.dataset, "transforms", None)
    if transforms is not None:
        transforms.reseed(seed)
