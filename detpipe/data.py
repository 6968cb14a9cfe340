"""A torch Dataset over a COCO file: image tensors and torchvision-style targets (boxes, labels, masks)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from detpipe.errors import DetpipeError
from detpipe.io import read_json


def load_coco(path: Path) -> dict:
    return read_json(path, "COCO file")


def read_rgb(path: Path) -> Image.Image:
    """An image as a viewer shows it: EXIF rotation applied; grayscale, palette, RGBA and 16-bit made 8-bit RGB."""
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit: scale to 8 bits, convert("RGB") would clip
            im = Image.fromarray((np.asarray(im, dtype=np.uint32) >> 8).astype(np.uint8))
        return im.convert("RGB")


class CocoDetection(torch.utils.data.Dataset):
    """Images from ``image_root``; model labels are 1..K in the order of the file's categories."""

    def __init__(self, coco_file: Path, image_root: Path, with_masks: bool = False):
        self.coco = load_coco(coco_file)
        self.image_root = Path(image_root)
        self.with_masks = with_masks
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

    def load_image(self, index: int) -> Image.Image:
        path = self.image_root / self.images[index]["file_name"]
        try:
            return read_rgb(path)
        except OSError as exc:
            raise DetpipeError(f"{path}: cannot read image ({exc})") from None

    def __getitem__(self, index: int):
        info = self.images[index]
        image = torch.from_numpy(np.asarray(self.load_image(index)).copy()).permute(2, 0, 1)
        anns = self.anns[info["id"]]
        boxes = torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2],
                               a["bbox"][1] + a["bbox"][3]] for a in anns], dtype=torch.float32).reshape(-1, 4)
        target = {
            "boxes": boxes,
            "labels": torch.tensor([self.label_of[a["category_id"]] for a in anns], dtype=torch.int64),
            "image_id": info["id"],
        }
        if self.with_masks:
            target["masks"] = torch.from_numpy(self._masks(anns, info["height"], info["width"]))
        return image, target

    @staticmethod
    def _masks(anns: list[dict], height: int, width: int) -> np.ndarray:
        masks = np.zeros((len(anns), height, width), dtype=np.uint8)
        for i, ann in enumerate(anns):
            masks[i] = ann_mask(ann, height, width)
        return masks


def ann_mask(ann: dict, height: int, width: int) -> np.ndarray:
    """A COCO annotation's mask from its polygons or RLE; the filled box when it has no outline."""
    from pycocotools import mask as mask_utils

    seg = ann.get("segmentation")
    if not seg:
        mask = np.zeros((height, width), dtype=np.uint8)
        x, y, w, h = (int(round(v)) for v in ann["bbox"])
        mask[y:y + h, x:x + w] = 1
        return mask
    if isinstance(seg, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(seg, height, width))
    elif isinstance(seg["counts"], list):
        rle = mask_utils.frPyObjects(seg, height, width)
    else:
        rle = seg
    return mask_utils.decode(rle)


def collate(batch):
    return tuple(zip(*batch))
