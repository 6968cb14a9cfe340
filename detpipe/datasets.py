"""A torch Dataset over a COCO file: image tensors and torchvision-style targets (boxes, labels, masks)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from detpipe.files import read_json
from detpipe.images import ann_mask, read_rgb


class CocoDetection(torch.utils.data.Dataset):
    """Images from ``image_root``; model labels are 1..K in the order of the file's categories.

    ``transforms`` is an ``(image, target)`` callable applied to each item (see :mod:`detpipe.transforms`).
    With ``encoded`` (``train.gpu_decode``), a plain JPEG (RGB or grayscale, no EXIF rotation) comes as its file's
    bytes, a 1-D uint8 tensor, with its target not yet transformed: :func:`decode_on_device` finishes both in
    the training loop. Other images are decoded here, as without it.
    """

    def __init__(self, coco_file: Path, image_root: Path, with_masks: bool = False, transforms=None,
                 encoded: bool = False):
        self.coco_file = Path(coco_file)
        self.coco = read_json(coco_file, "COCO file")
        self.image_root = Path(image_root)
        self.with_masks = with_masks
        self.transforms = transforms
        self.encoded = encoded
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
        path = self.image_root / info["file_name"]
        encoded = self.encoded and _plain_jpeg(path)
        if encoded:
            image = torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8)
        else:
            image = torch.from_numpy(np.asarray(read_rgb(path)).copy()).permute(2, 0, 1)
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
        if self.transforms is not None and not encoded:
            image, target = self.transforms(image, target)
        return image, target


def _plain_jpeg(path: Path) -> bool:
    """A JPEG that nvJPEG decodes to what :func:`read_rgb` gives: RGB or grayscale, not rotated by EXIF."""
    try:
        with Image.open(path) as im:  # reads the header only
            return im.format == "JPEG" and im.mode in ("RGB", "L") and im.getexif().get(0x0112, 1) == 1
    except OSError:
        return False  # read_rgb gives the one-line error


def decode_on_device(images: list, targets: list, device, transforms=None) -> tuple[list, list]:
    """Decode the encoded JPEGs among ``images`` on ``device`` (nvJPEG on CUDA, in one batch) and apply
    ``transforms`` to them there; images decoded by the dataset pass unchanged."""
    from torchvision.io import ImageReadMode, decode_jpeg

    at = [i for i, im in enumerate(images) if im.dim() == 1]
    if not at:
        return images, targets
    images, targets = list(images), list(targets)
    if torch.device(device).type == "cuda":
        # nvJPEG writes its outputs on torchvision's own stream, not ordered against ours, into memory the caching
        # allocator may hand out while our queued kernels still read it: NaN losses by iteration 2 to 4 on an
        # H100 (pytorch/vision#9606). Draining our stream first is the fix torchvision's report gives.
        torch.cuda.current_stream(device).synchronize()
    with warnings.catch_warnings():  # torchvision 0.29 points to TorchCodec; decode_jpeg still works
        warnings.simplefilter("ignore", DeprecationWarning)
        decoded = decode_jpeg([images[i] for i in at], mode=ImageReadMode.RGB, device=device)
    for i, image in zip(at, decoded):
        images[i], targets[i] = transforms(image, targets[i]) if transforms is not None else (image, targets[i])
    return images, targets


def collate(batch):
    return tuple(zip(*batch))
