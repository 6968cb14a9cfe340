"""A torch Dataset over a COCO file: image tensors and torchvision-style targets (boxes, labels, masks)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from detpipe.errors import DetpipeError
from detpipe.files import read_json
from detpipe.images import ann_crop, ann_mask, read_rgb

MASK_TARGETS = ("cropped", "full", "none")


class CocoDetection(torch.utils.data.Dataset):
    """Images from ``image_root``; model labels are 1..K in the order of the file's categories.

    ``transforms`` is an ``(image, target)`` callable applied to each item (see :mod:`detpipe.transforms`).
    With ``encoded`` (``train.gpu_decode``), a plain JPEG (RGB or grayscale, no EXIF rotation) comes as its file's
    bytes, a 1-D uint8 tensor, with its target not yet transformed: :func:`decode_on_device` finishes both in
    the training loop. Other images are decoded here, as without it.

    ``with_masks``: the set is a mask model's (its evaluation scores segm too); ``mask_targets`` says how its targets
    hold the objects' masks (``train.mask_targets``): ``full``, torchvision's ``masks``, one image-sized bitmap per
    object; ``cropped``, each object's bitmap cut to the object (:func:`cropped_masks`); ``none``, no masks (what
    prediction needs: validation and evaluation).
    """

    def __init__(self, coco_file: Path, image_root: Path, with_masks: bool = False, transforms=None,
                 encoded: bool = False, mask_targets: str = "cropped"):
        if mask_targets not in MASK_TARGETS:
            raise DetpipeError(f"mask targets {mask_targets!r}: choose one of {', '.join(MASK_TARGETS)}")
        self.coco_file = Path(coco_file)
        self.coco = read_json(coco_file, "COCO file")
        self.image_root = Path(image_root)
        self.with_masks = with_masks
        self.mask_targets = mask_targets if with_masks else "none"
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
        if self.mask_targets == "full":
            masks = np.zeros((len(anns), info["height"], info["width"]), dtype=np.uint8)
            for i, ann in enumerate(anns):
                masks[i] = ann_mask(ann, info["height"], info["width"])
            target["masks"] = torch.from_numpy(masks)
        elif self.mask_targets == "cropped":
            target.update(cropped_masks(anns, info["height"], info["width"]))
        if self.transforms is not None and not encoded:
            image, target = self.transforms(image, target)
        return image, target


def cropped_masks(anns: list[dict], height: int, width: int) -> dict:
    """The objects' masks cut to each object, as a target's ``mask_crops`` and ``mask_frames``.

    ``mask_crops`` (N x h x w uint8) stacks :func:`ann_crop`'s crops, each at the top left, zeros elsewhere;
    ``mask_frames`` (N x 4 float32) places each in the image: ``(ox, oy, sx, sy)`` such that the point ``u`` of
    a crop (pixel edges at integers, as for ``x``) lies at ``x = (ox + u / sx) * width`` of the image, and likewise
    for ``y``. Coordinates relative to the image's size survive the model's resize; the transforms of
    :mod:`detpipe.transforms` move the frames, and the model's RoI heads sample the crops where its proposals lie.
    """
    crops = [ann_crop(ann, height, width) for ann in anns]
    stack = np.zeros((len(crops), max((c.shape[0] for c, _, _ in crops), default=1),
                      max((c.shape[1] for c, _, _ in crops), default=1)), dtype=np.uint8)
    frames = np.zeros((len(crops), 4), dtype=np.float32)
    for i, (crop, x0, y0) in enumerate(crops):
        stack[i, :crop.shape[0], :crop.shape[1]] = crop
        frames[i] = (x0 / width, y0 / height, width, height)
    return {"mask_crops": torch.from_numpy(stack), "mask_frames": torch.from_numpy(frames)}


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
