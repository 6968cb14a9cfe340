"""A training forward that never waits for the GPU before the backbone (``train.sync_free_inputs``).

torchvision's detectors stop the host until the GPU is idle several times per image before their backbone runs:
the transform copies its mean and standard deviation to the device for every image and builds each box scale
from device tensors made from Python numbers (host-to-device copies, each a full sync), and the model then asks
the device whether any box is degenerate (a read back per image). On an H100 that is 56 syncs for a batch of 8
(docs/performance.md, the census): each of them waits until the previous iteration's backward and optimizer step
are done, so the GPU then idles while the host launches the whole forward pass.

Here, in training only, the transform keeps the constants on the device and scales the boxes by Python numbers,
and the model skips its degenerate-box check: the training loop checks the boxes on the host before they move
(``engine.check_boxes``, in ``engine.train_one_epoch``). The arithmetic is torchvision's, on the same values, so the
losses and gradients are the same bit for bit (tests/test_syncfree.py). Evaluation runs torchvision's own code.

Faster and Mask R-CNN, RetinaNet and FCOS get the forward (their loss steps keep their own syncs); every model
with torchvision's transform (SSD too) gets the transform, by detpipe.swap (a subclass's own version of a replaced
method is kept, with a warning). Checkpoints and logged models keep torchvision's classes (they are built afresh
when loaded); a swapped torchvision model pickles, and ``torch.jit.script`` scripts it as torchvision's class.

``train.sync_free_loss`` (:func:`sync_free_loss`, FCOS): the loss of FCOS's head without its seven syncs (a count
read back, and its foreground anchors selected by boolean masks, each a read of how many there are): the same
sums over masked tensors instead. With both, an FCOS training step never waits for the GPU. The classification
loss is the same bit for bit, the box and centre-ness losses differ in float rounding only (the sums run in
another order; tests/test_syncfree.py; on CUDA torchvision divides by a Python number, which CUDA turns into a
product with its reciprocal, and this by a device count: the classification loss may differ in its last bit).
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch
from torch.nn import functional as F
from torchvision.models.detection.faster_rcnn import FasterRCNN
from torchvision.models.detection.fcos import FCOS, FCOSHead
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.mask_rcnn import MaskRCNN
from torchvision.models.detection.retinanet import RetinaNet
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import sigmoid_focal_loss

from detpipe.swap import Lever, swap


def sync_free_inputs(model) -> bool:
    """Give ``model`` (in place) the transform and, for the families above, the training forward of this module.

    False if it has neither torchvision's transform nor one of those forwards, or they are a subclass's own."""
    changed = False
    if isinstance(getattr(model, "transform", None), GeneralizedRCNNTransform):
        changed |= swap(model.transform, SyncFreeTransform)
    for family, forward in _FORWARDS.items():
        if isinstance(model, family):
            changed |= swap(model, forward, _NAMED)
            break
    return changed


def sync_free_loss(model) -> bool:
    """Give an FCOS model's head (in place) the loss of :class:`SyncFreeFCOSHead`; False for other models."""
    head = getattr(model, "head", None)
    return isinstance(model, FCOS) and isinstance(head, FCOSHead) and swap(head, SyncFreeFCOSHead)


class _SyncFree(Lever):
    PREFIX, KEPT = "SyncFree", "with its host-device syncs"


_NO_BOXES = torch.zeros((0, 4))  # handed to torchvision's resize, which then scales no device boxes


class SyncFreeTransform(_SyncFree, GeneralizedRCNNTransform):
    """torchvision's transform; in training, its constants kept on the device and the boxes scaled by Python
    numbers (the same float32 ratios it computes)."""

    TORCHVISION, REPLACES = GeneralizedRCNNTransform, ("normalize", "resize")

    def __prepare_scriptable__(self):
        plain = super().__prepare_scriptable__()
        plain.__dict__.pop("_constants", None)  # the cache of normalize (a dict TorchScript cannot type)
        return plain

    def normalize(self, image):
        if not (self.training and image.is_floating_point()):
            return super().normalize(image)
        key = (image.dtype, image.device)
        cache = self.__dict__.setdefault("_constants", {})
        if key not in cache:
            cache[key] = tuple(torch.as_tensor(v, dtype=image.dtype, device=image.device)[:, None, None]
                               for v in (self.image_mean, self.image_std))
        mean, std = cache[key]
        return (image - mean) / std

    def resize(self, image, target=None):
        if not self.training or target is None or target["boxes"].dtype != torch.float32:
            return super().resize(image, target)
        boxes, (height, width) = target["boxes"], image.shape[-2:]
        image, target = super().resize(image, {**target, "boxes": _NO_BOXES})
        # torchvision's ratios: float32 tensors divided; as Python numbers they multiply the boxes alike
        ry, rx = (float(np.float32(new) / np.float32(old)) for new, old in zip(image.shape[-2:], (height, width)))
        x1, y1, x2, y2 = boxes.unbind(1)
        target["boxes"] = torch.stack((x1 * rx, y1 * ry, x2 * rx, y2 * ry), dim=1)
        return image, target


class _TrainingForward(_SyncFree):
    """The training forward of torchvision's detectors without the degenerate-box check; in evaluation, theirs."""

    REPLACES = ("forward",)

    def forward(self, images, targets=None):
        if not self.training or targets is None or torch.jit.is_scripting():
            return super().forward(images, targets)
        for target in targets:  # torchvision's checks of the targets' type and shape (on the host)
            boxes = target["boxes"]
            if not isinstance(boxes, torch.Tensor) or boxes.dim() != 2 or boxes.shape[-1] != 4:
                raise ValueError(f"Expected target boxes to be a tensor of shape [N, 4], got "
                                 f"{getattr(boxes, 'shape', type(boxes))}.")
        images, targets = self.transform(images, targets)
        features = self.backbone(images.tensors)
        if isinstance(features, torch.Tensor):
            features = OrderedDict([("0", features)])
        return self.losses(images, features, targets)


class SyncFreeRCNN(_TrainingForward, GeneralizedRCNN):
    TORCHVISION = GeneralizedRCNN

    def losses(self, images, features, targets):
        proposals, proposal_losses = self.rpn(images, features, targets)
        _, detector_losses = self.roi_heads(features, proposals, images.image_sizes, targets)
        return {**detector_losses, **proposal_losses}  # torchvision's order


class SyncFreeRetinaNet(_TrainingForward, RetinaNet):
    TORCHVISION = RetinaNet

    def losses(self, images, features, targets):
        features = list(features.values())
        return self.compute_loss(targets, self.head(features), self.anchor_generator(images, features))


class SyncFreeFCOS(_TrainingForward, FCOS):
    TORCHVISION = FCOS

    def losses(self, images, features, targets):
        features = list(features.values())
        return self.compute_loss(targets, self.head(features), self.anchor_generator(images, features),
                                 [x.size(2) * x.size(3) for x in features])


class SyncFreeFasterRCNN(SyncFreeRCNN, FasterRCNN):
    pass


class SyncFreeMaskRCNN(SyncFreeRCNN, MaskRCNN):
    pass


_FORWARDS = {GeneralizedRCNN: SyncFreeRCNN, RetinaNet: SyncFreeRetinaNet, FCOS: SyncFreeFCOS}
_NAMED = {FasterRCNN: SyncFreeFasterRCNN, MaskRCNN: SyncFreeMaskRCNN}  # importable: the models pickle


class SyncFreeFCOSHead(_SyncFree, FCOSHead):
    """torchvision's FCOS head whose loss masks the background anchors out instead of selecting the foreground."""

    TORCHVISION, REPLACES = FCOSHead, ("compute_loss",)

    def compute_loss(self, targets, head_outputs, anchors, matched_idxs):
        cls_logits, regression, ctrness = (head_outputs[k] for k in ("cls_logits", "bbox_regression", "bbox_ctrness"))
        classes, boxes = [], []
        for target, matched in zip(targets, matched_idxs):
            if target["labels"].numel() == 0:  # no object: every anchor is background
                classes.append(torch.full_like(matched, -1))
                boxes.append(target["boxes"].new_zeros((len(matched), 4)))
            else:
                classes.append(torch.where(matched < 0, -1, target["labels"][matched.clip(min=0)]))
                boxes.append(target["boxes"][matched.clip(min=0)])
        classes, boxes, anchors = torch.stack(classes), torch.stack(boxes), torch.stack(anchors)
        foreground = classes >= 0
        count = foreground.sum().clamp(min=1)  # torchvision's max(1, number of foreground anchors), not read back

        one_hot = torch.zeros_like(cls_logits).scatter_(2, classes.clamp(min=0)[..., None],
                                                        foreground[..., None].to(cls_logits.dtype))
        loss_cls = sigmoid_focal_loss(cls_logits, one_hot, reduction="sum")
        # a background anchor's prediction becomes its target box: an overflowing one (fp16) adds no NaN gradient
        pred_boxes = torch.where(foreground[..., None], self.box_coder.decode(regression, anchors), boxes)
        loss_box = torch.where(foreground, _giou_loss(pred_boxes, boxes), 0).sum()
        encoded = self.box_coder.encode(anchors, boxes)
        left_right, top_bottom = encoded[..., 0::2], encoded[..., 1::2]  # not [0, 2]: a list index is a copy
        centred = torch.sqrt((left_right.min(dim=-1)[0] / left_right.max(dim=-1)[0])
                             * (top_bottom.min(dim=-1)[0] / top_bottom.max(dim=-1)[0]))
        centred = torch.where(foreground, centred, 0)  # a background anchor's is NaN where it lies outside its box
        loss_ctr = F.binary_cross_entropy_with_logits(ctrness.squeeze(dim=2), centred, reduction="none")
        loss_ctr = torch.where(foreground, loss_ctr, 0).sum()
        return {"classification": loss_cls / count, "bbox_regression": loss_box / count,
                "bbox_ctrness": loss_ctr / count}


def _giou_loss(boxes1, boxes2, eps: float = 1e-7):
    """torchvision's ``generalized_box_iou_loss(..., reduction="none")``, its intersection computed everywhere and
    kept where the boxes overlap (``torch.where``) instead of on the overlapping pairs selected by a mask: the same
    values and gradients, no sync."""
    boxes1, boxes2 = (b if b.dtype in (torch.float32, torch.float64) else b.float() for b in (boxes1, boxes2))
    x1, y1, x2, y2 = boxes1.unbind(dim=-1)
    x1g, y1g, x2g, y2g = boxes2.unbind(dim=-1)
    xi1, yi1, xi2, yi2 = torch.max(x1, x1g), torch.max(y1, y1g), torch.min(x2, x2g), torch.min(y2, y2g)
    inter = torch.where((yi2 > yi1) & (xi2 > xi1), (xi2 - xi1) * (yi2 - yi1), 0)
    union = (x2 - x1) * (y2 - y1) + (x2g - x1g) * (y2g - y1g) - inter
    iou = inter / (union + eps)
    enclosing = (torch.max(x2, x2g) - torch.min(x1, x1g)) * (torch.max(y2, y2g) - torch.min(y1, y1g))
    return 1 - (iou - ((enclosing - union) / (enclosing + eps)))
