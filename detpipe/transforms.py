"""Training augmentation as ``(image, target) -> (image, target)`` transforms of the dataset, seeded.

Images are uint8 CHW tensors, targets torchvision's dicts (``boxes`` x1, y1, x2, y2; optional ``masks``).
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
        for t in self.transforms:
            if hasattr(t, "reseed"):
                t.reseed(seed)

    def state(self) -> list:
        return [t.generator.get_state() for t in self.transforms if hasattr(t, "generator")]

    def load_state(self, states: list) -> None:
        for t, s in zip([t for t in self.transforms if hasattr(t, "generator")], states):
            t.generator.set_state(s)


class RandomHorizontalFlip:
    """Flip image, boxes and masks left-right with probability ``prob`` (no draw at all when it is 0)."""

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
        return image.flip(-1), target


def train_transforms(hflip: float, seed: int) -> Compose:
    """The training augmentation; its stream is seeded apart from the data order and weight init."""
    return Compose([RandomHorizontalFlip(hflip, seed)])


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
