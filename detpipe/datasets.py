"""A torch Dataset over a COCO file: image tensors and torchvision-style targets (boxes, labels, masks)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from detpipe.files import read_json
from detpipe.images import ann_mask, read_rgb


class CocoDetection(torch.utils.data.Dataset):
    """Images from ``image_root``; model labels are 1..K in the order of the file's categories.

    ``transforms`` is an ``(image, target)`` callable applied to each item (see :mod:`detpipe.transforms`).
    """

    def __init__(self, coco_file: Path, image_root: Path, with_masks: bool = False, transforms=None):
        self.coco = read_json(coco_file, "COCO file")
        self.image_root = Path(image_root)
        self.with_masks = with_masks
        self.transforms = transforms
        self.cat_ids = [c["id"] for c in self.coco["categories"]]
        self.class_names = [c["name"] for c in self.coco["categories"]]
        self.label_of = {cid: i + 1 for i, cid in enumerate(self.cat_ids)}
        self.images = self.coco["images"]
        self.anns: dict[int, list[dict]] = {img["id"]: [] for img in self.images}
        for ann in self.coco["annotations"]:
            if not ann.get("iscrowd", 0):  # crowd / ignore regions are for evaluation only
                self.anns[ann["image_id"]].append(ann)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        info = self.images[index]
        image = read_rgb(self.image_root / info["file_name"])
        image = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)
        anns = self.anns[info["id"]]
        boxes = torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2],
                               a["bbox"][1] + a["bbox"][3]] for a in anns], dtype=torch.float32).reshape(-1, 4)
        target = {
            "boxes": boxes,
            "labels": torch.tensor([self.label_of[a["category_id"]] for a in anns], dtype=torch.int64),
            "image_id": info["id"],
        }
        if self.with_masks:
            masks = np.zeros((len(anns), info["height"], info["width"]), dtype=np.uint8)
            for i, ann in enumerate(anns):
                masks[i] = ann_mask(ann, info["height"], info["width"])
            target["masks"] = torch.from_numpy(masks)
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target


def collate(batch):
    return tuple(zip(*batch))
