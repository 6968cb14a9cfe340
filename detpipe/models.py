"""Names to torchvision detectors: architecture × backbone, with image size and weights from params."""

from __future__ import annotations

from functools import partial
from pathlib import Path

from detpipe.errors import DetpipeError

ARCHITECTURES = ("fasterrcnn", "maskrcnn", "retinanet", "fcos", "ssdlite")
BACKBONES = ("resnet18", "resnet34", "resnet50", "mobilenet_v3_large")


def has_masks(name: str) -> bool:
    return name == "maskrcnn"


def build_model(name: str, backbone: str, num_classes: int, *, min_size: int, max_size: int,
                fpn_channels: int = 256, pretrained_backbone: bool = False):
    """A detector with ``num_classes`` outputs (background included) that resizes images to min/max_size.

    Without pretrained weights the backbone uses trainable BatchNorm: torchvision's default
    FrozenBatchNorm keeps ImageNet statistics and never learns from scratch.
    """
    from torch import nn
    from torchvision.models import detection as det
    from torchvision.models import resnet
    from torchvision.models.detection.backbone_utils import BackboneWithFPN, mobilenet_backbone
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7
    from torchvision.ops.misc import FrozenBatchNorm2d

    if name not in ARCHITECTURES:
        raise DetpipeError(f"model.name: unknown model {name!r}; choose one of {', '.join(ARCHITECTURES)}")
    if backbone not in BACKBONES:
        raise DetpipeError(f"model.backbone: unknown backbone {backbone!r}; choose one of {', '.join(BACKBONES)}")
    weights = "DEFAULT" if pretrained_backbone else None
    norm = FrozenBatchNorm2d if pretrained_backbone else nn.BatchNorm2d
    size = {"min_size": min_size, "max_size": max_size}

    if name == "ssdlite":
        if backbone != "mobilenet_v3_large":
            raise DetpipeError("model.backbone: ssdlite needs backbone mobilenet_v3_large")
        model = det.ssdlite320_mobilenet_v3_large(num_classes=num_classes, weights_backbone=weights,
                                                  norm_layer=partial(nn.BatchNorm2d, eps=0.001, momentum=0.03))
        model.transform.fixed_size = (min_size, min_size)  # SSD resizes to a square, 320 px by default
        return model
    one_stage = name in ("retinanet", "fcos")
    if name == "fcos" and (fpn_channels < 64 or fpn_channels % 32):
        # its head normalises with GroupNorm(32 groups); one channel per group fails on a 1x1 level
        raise DetpipeError(f"model.fpn_channels: fcos needs a multiple of 32 of at least 64, got {fpn_channels}")
    if backbone.startswith("resnet"):
        body = resnet.__dict__[backbone](weights=weights, norm_layer=norm)
        if pretrained_backbone:  # fine-tune the top stages only, as torchvision's recipes do
            for pname, p in body.named_parameters():
                p.requires_grad_(pname.startswith(("layer2", "layer3", "layer4")))
        layers = [2, 3, 4] if one_stage else [1, 2, 3, 4]
        base = 256 if backbone == "resnet50" else 64  # channels out of layer1; each later stage doubles them
        body = BackboneWithFPN(
            body, {f"layer{k}": str(i) for i, k in enumerate(layers)},
            [base * 2 ** (k - 1) for k in layers], fpn_channels,
            extra_blocks=LastLevelP6P7(fpn_channels, fpn_channels) if one_stage else None)
    elif one_stage:
        raise DetpipeError(f"model.backbone: {name} needs a resnet backbone, not {backbone}")
    else:
        body = mobilenet_backbone(backbone_name=backbone, fpn=True, weights=weights, norm_layer=norm,
                                  trainable_layers=6 if not pretrained_backbone else 3)
        size["rpn_anchor_generator"] = det.anchor_utils.AnchorGenerator(
            ((32, 64, 128, 256, 512),) * 3, ((0.5, 1.0, 2.0),) * 3)
    if name == "fasterrcnn":
        return det.FasterRCNN(body, num_classes=num_classes, box_batch_size_per_image=128, **size)
    if name == "maskrcnn":
        return det.MaskRCNN(body, num_classes=num_classes, box_batch_size_per_image=128, **size)
    if name == "retinanet":
        return det.RetinaNet(body, num_classes=num_classes, **size)
    return det.FCOS(body, num_classes=num_classes, score_thresh=0.05, **size)  # torchvision's 0.2 costs recall


def load_checkpoint(path, device="cpu"):
    """Rebuild the model saved by the train stage; returns ``(model, meta)`` with class names and ids."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise DetpipeError(f"{path}: checkpoint is missing; run the train stage first")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
        meta, m = ckpt["meta"], ckpt["meta"]["model"]
        model = build_model(m["name"], m["backbone"], len(meta["classes"]) + 1, min_size=m["min_size"],
                            max_size=m["max_size"], fpn_channels=m["fpn_channels"])
        model.load_state_dict(ckpt["model"])
    except DetpipeError as exc:
        raise DetpipeError(f"{path}: {exc}") from None
    except Exception as exc:  # torch raises many kinds for a damaged file: truncated zip, bad pickle, wrong keys
        why = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise DetpipeError(f"{path}: not a readable detpipe checkpoint ({why}); rerun the train stage") from None
    return model.to(device).eval(), meta
