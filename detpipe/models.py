"""Names to torchvision detectors, and weights (a torchvision weights name or a file) into them.

Two kinds of ``model.name`` (docs/models.md has the table):

* the small models ``fasterrcnn``, ``maskrcnn``, ``retinanet``, ``fcos``, ``ssdlite``: architecture × ``backbone``
  with a narrow feature pyramid (``fpn_channels``), trained from scratch on a CPU by the default params;
* torchvision's detectors by their builder name (``fasterrcnn_resnet50_fpn``, …), built as torchvision builds them
  (``backbone`` and ``fpn_channels`` do not apply), with COCO weights to fine-tune from: ``weights``.

``load_weights`` puts a weights name or file into a built model; tensors whose shape no longer fits (the
class-specific head layers, for another number of classes) keep their fresh initialisation and are listed.
"""

from __future__ import annotations

import functools
import hashlib
import re
import sys
from collections import OrderedDict
from functools import partial
from itertools import islice
from pathlib import Path

from detpipe.errors import DetpipeError, listing

SMALL = ("fasterrcnn", "maskrcnn", "retinanet", "fcos", "ssdlite")
BUILDERS = ("fasterrcnn_resnet50_fpn", "fasterrcnn_resnet50_fpn_v2", "fasterrcnn_mobilenet_v3_large_fpn",
            "fasterrcnn_mobilenet_v3_large_320_fpn", "maskrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn_v2",
            "retinanet_resnet50_fpn", "retinanet_resnet50_fpn_v2", "fcos_resnet50_fpn", "ssd300_vgg16",
            "ssdlite320_mobilenet_v3_large")
ARCHITECTURES = SMALL + BUILDERS
BACKBONES = ("resnet10", "resnet18", "resnet34", "resnet50", "mobilenet_v3_large")
MASK_MODELS = ("maskrcnn", "maskrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn_v2")
ARCH_DEFAULT = -1  # score_thresh, nms_thresh, detections_per_img: keep the architecture's own default
ONE_STAGE = ("retinanet", "fcos")  # the small ones with a P3-P7 pyramid, of which pyramid_levels keeps the finest
LEVELS = 5
STAGES = 4  # ResNet stages (C2-C5) built; backbone_stages builds fewer for the one-stage models' pyramid

# What torchvision's builders do differently when they load weights (their ``is_trained`` branch): these six put
# FrozenBatchNorm2d in the backbone; every builder but ssdlite also freezes the backbone's first stages.
_FROZEN_BN = ("fasterrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn", "retinanet_resnet50_fpn", "fcos_resnet50_fpn",
              "fasterrcnn_mobilenet_v3_large_fpn", "fasterrcnn_mobilenet_v3_large_320_fpn")
_ZERO_EPS = ("fasterrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn", "retinanet_resnet50_fpn")  # with COCO_V1 weights
# ImageNet weights of the backbone for ``pretrained_backbone``, as torchvision's legacy ``pretrained_backbone=True``
_BACKBONE_WEIGHTS = {"ssd300_vgg16": "IMAGENET1K_FEATURES"}  # the rest: IMAGENET1K_V1
_HASH = re.compile(r"-([a-f0-9]*)\.")  # torch.hub's: torchvision's file names end in -<sha256 prefix>.pth


def has_masks(name: str) -> bool:
    return name in MASK_MODELS


def build_model(name: str, backbone: str, num_classes: int, *, min_size: int, max_size: int,
                fpn_channels: int = 256, pretrained_backbone: bool = False, score_thresh: float = ARCH_DEFAULT,
                nms_thresh: float = ARCH_DEFAULT, detections_per_img: int = ARCH_DEFAULT, weights: str = "",
                load: bool = True, pyramid_levels: int = LEVELS, backbone_stages: int = STAGES,
                fixed_canvas: bool = False, mask_head_channels: int | None = None):
    """A detector with ``num_classes`` outputs (background included) that resizes images to min/max_size.

    ``score_thresh``, ``nms_thresh`` and ``detections_per_img`` set its post-processing; -1 keeps the
    architecture's default. ``weights`` (a torchvision weights name for a builder name, or a weights file) are
    loaded with :func:`load_weights`; the names of the tensors left at their initialisation are in
    ``model.weights_not_loaded``. A builder model given weights is laid out as torchvision lays it out for
    pretrained weights (frozen BatchNorm and first stages, see docs/models.md), also with ``load=False``, which
    builds that layout without reading ``weights`` (to load a checkpoint trained from them). ``pretrained_backbone``
    loads torchvision's ImageNet backbone weights (downloaded once); builder names ignore it when given ``weights``.
    ``pyramid_levels``: the small ``retinanet`` and ``fcos`` predict from that many of the finest pyramid levels,
    P3 first (5 is torchvision's P3-P7); the other models ignore it, as builder names ignore ``fpn_channels``.
    ``backbone_stages``: the small ``retinanet`` and ``fcos`` build their ResNet's first 2-4 stages only, and the
    pyramid's top-down pathway starts from the last one built (4: C5, torchvision's; 3: C4; 2: C3); fewer stages
    need ``pyramid_levels`` of at most ``backbone_stages - 1``. The other models ignore it.
    ``fixed_canvas``: every batch is padded to one of three fixed sizes (:func:`canvas_size`) instead of to its
    largest image rounded up to 32 pixels, so the network sees a few input shapes only (for cuDNN's algorithm
    search and ``torch.compile``); SSD models, which resize to one square already, ignore it.
    ``mask_head_channels``: the width of the small ``maskrcnn``'s mask head, ``fpn_channels`` when None (checkpoints
    saved before the head followed the pyramid's width have torchvision's 256: :func:`load_checkpoint` reads it
    from their weights).

    The small models without pretrained weights use trainable BatchNorm: torchvision's default FrozenBatchNorm
    keeps ImageNet statistics and never learns from scratch. SSD models resize to a square: the small ``ssdlite``
    to ``min_size``, the two SSD builders to their fixed 300 and 320 pixels.
    """
    if name not in ARCHITECTURES:
        raise DetpipeError(f"model.name: unknown model {name!r}; choose one of {', '.join(ARCHITECTURES)}")
    post = _postprocess(name, score_thresh, nms_thresh, detections_per_img)
    if not 1 <= pyramid_levels <= LEVELS:
        raise DetpipeError(f"model.pyramid_levels must be from 1 (P3 alone) to {LEVELS} (P3-P7), got {pyramid_levels}")
    if not 2 <= backbone_stages <= STAGES:
        raise DetpipeError(f"model.backbone_stages must be from 2 (C2-C3) to {STAGES} (C2-C5), got {backbone_stages}")
    one_stage = name in ONE_STAGE
    levels, stages = pyramid_levels, backbone_stages
    if one_stage and stages < STAGES and levels > stages - 1:  # as config.check_pyramid (a test keeps them equal)
        built = "P3 only, 1 level" if stages == 2 else f"P3-P{stages + 1}, at most {stages - 1} levels"
        raise DetpipeError(f"model.pyramid_levels {levels} needs model.backbone_stages >= {min(levels + 1, STAGES)}: "
                           f"backbone_stages {stages} builds {built}")
    if weights and not _is_path(weights):  # a misspelt name fails before anything is built
        try:
            _weights_member(name, weights)
        except DetpipeError as exc:
            raise DetpipeError(f"model.weights: {exc}") from None
    try:
        if name in BUILDERS:
            model = _build_torchvision(name, num_classes, min_size=min_size, max_size=max_size, post=post,
                                       pretrained_backbone=pretrained_backbone and not weights, weights=weights)
        else:
            model = _build_small(name, backbone, num_classes, min_size=min_size, max_size=max_size, post=post,
                                 fpn_channels=fpn_channels, pretrained_backbone=pretrained_backbone,
                                 levels=pyramid_levels if one_stage else LEVELS,
                                 stages=backbone_stages if one_stage else STAGES,
                                 mask_head_channels=mask_head_channels or fpn_channels)
    except OSError as exc:  # no internet for the ImageNet backbone weights
        if not pretrained_backbone:
            raise
        raise DetpipeError(f"model.pretrained_backbone: cannot download the backbone's ImageNet weights ({exc}); "
                           "connect once, or set it to false") from None
    if name.startswith("fcos"):  # detpipe's fcos and fcos_resnet50_fpn, before any weights are loaded
        _live_box_regression(model)
    if fixed_canvas and "ssd" not in name:
        _use_canvas(model)
    if name in MASK_MODELS:  # also trains on mask targets cropped to the objects (train.mask_targets)
        model.roi_heads.__class__ = _crop_aware_heads_class()
    model.weights_not_loaded = []
    if weights and load:
        try:
            model.weights_not_loaded = load_weights(model, weights, name)
        except DetpipeError as exc:
            raise DetpipeError(f"model.weights: {exc}") from None
    return model


def build_from_params(m, num_classes: int):
    """The detector of a params ``model`` section (``cfg.model``) for ``num_classes`` object classes (the
    background class is added here): what the train stage trains and the tutorial's ``build_detector`` returns."""
    return build_model(m.name, m.backbone, num_classes + 1, min_size=m.min_size, max_size=m.max_size,
                       fpn_channels=m.fpn_channels, pretrained_backbone=m.pretrained_backbone,
                       score_thresh=m.score_thresh, nms_thresh=m.nms_thresh,
                       detections_per_img=m.detections_per_img, weights=m.weights, pyramid_levels=m.pyramid_levels,
                       backbone_stages=m.backbone_stages, fixed_canvas=m.fixed_canvas)


def canvas_size(height: int, width: int, min_size: int, max_size: int, divisible: int = 32) -> tuple[int, int]:
    """The fixed size a batch whose largest image is ``height`` x ``width`` is padded to with ``fixed_canvas``.

    With S and L the short and long sides torchvision resizes images to at most (``min_size`` and ``max_size``,
    rounded up to ``divisible``), it is the first of (S, L), (L, S) and (L, L) that holds the batch: one shape
    for landscape batches, one for portrait ones, one for batches that mix them. A larger batch (not resized,
    say) is padded as torchvision pads it: to its own size rounded up.
    """
    return _canvas_transform_class().canvas_size(height, width, min_size, max_size, divisible)


@functools.cache
def _canvas_transform_class():
    # Defined here and self-contained on purpose (as _finest_levels_class): MLflow's cloudpickle stores it by value,
    # so a logged model with the canvas loads where detpipe is not installed.
    import torchvision
    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    class CanvasTransform(GeneralizedRCNNTransform):
        """torchvision's resize and normalisation; batches padded to :func:`canvas_size` (``model.fixed_canvas``)."""

        @staticmethod
        def canvas_size(height, width, min_size, max_size, divisible=32):
            up = lambda v: -(-v // divisible) * divisible
            short, long = up(min(min_size, max_size)), up(max_size)
            for canvas in ((short, long), (long, short), (long, long)):
                if height <= canvas[0] and width <= canvas[1]:
                    return canvas
            return up(height), up(width)

        def batch_images(self, images, size_divisible: int = 32):
            if torchvision._is_tracing():  # ONNX export: torchvision's own padding
                return super().batch_images(images, size_divisible)
            height, width = self.canvas_size(max(im.shape[-2] for im in images), max(im.shape[-1] for im in images),
                                             max(self.min_size), self.max_size, size_divisible)
            batched = images[0].new_zeros((len(images), images[0].shape[0], height, width))
            for image, padded in zip(images, batched):
                padded[:, :image.shape[-2], :image.shape[-1]].copy_(image)
            return batched

    return CanvasTransform


def _use_canvas(model) -> None:
    """Pad ``model``'s batches to the canvas, and set its RoI poolers' scales from the backbone's strides.

    torchvision's MultiScaleRoIAlign guesses each level's scale once, on its first call, from the padded feature
    size over the largest image's: with the canvas's padding (a 375 px high image on an 800 px canvas) that
    guess comes out twice too large, for good. So the scales are set here, from one small forward of the backbone
    in eval mode (its BatchNorm statistics stay as they are).
    """
    import torch
    from torchvision.ops.poolers import _setup_scales

    t = model.transform
    model.transform = _canvas_transform_class()(t.min_size, t.max_size, t.image_mean, t.image_std,
                                                size_divisible=t.size_divisible, fixed_size=t.fixed_size,
                                                _skip_resize=t._skip_resize)
    heads = getattr(model, "roi_heads", None)
    if heads is None:
        return
    side, training = 256, model.backbone.training  # 256: a multiple of every stride, so the scales are exact
    model.backbone.eval()
    with torch.no_grad():
        features = model.backbone(torch.zeros(1, 3, side, side))
    model.backbone.train(training)
    for pool in (heads.box_roi_pool, heads.mask_roi_pool):
        if pool is not None:
            pool.scales, pool.map_levels = _setup_scales([features[k] for k in pool.featmap_names], [(side, side)],
                                                         pool.canonical_scale, pool.canonical_level)


@functools.cache
def _crop_aware_heads_class():
    # Self-contained, as _canvas_transform_class: a logged mask model loads where detpipe is not installed.
    import torch
    from torchvision.models.detection.roi_heads import RoIHeads, fastrcnn_loss, maskrcnn_loss

    class CropAwareRoIHeads(RoIHeads):
        """torchvision's RoIHeads; in training they also take masks cut to their objects (targets with
        ``mask_crops`` and ``mask_frames``, :func:`detpipe.datasets.cropped_masks`) instead of image-sized ``masks``.

        Each positive proposal's 28x28 mask target is ``roi_align`` of its object's mask over the proposal, sampled
        from the object's crop at the proposal's place in it rather than from an image-sized bitmap resized with the
        image, and at each bin's true place (:meth:`boxes_in_crops`). Everything else is torchvision's: sampling,
        losses, inference.
        """

        @staticmethod
        def boxes_in_crops(boxes, frames, image_shape):
            """``boxes`` of the resized image (x1, y1, x2, y2, pixel edges at integers) in the coordinates of
            their crops (``frames``, one row per box) as ``roi_align`` reads them (pixel i at i): each target bin
            samples its object at the bin's true place (``aligned=True``, as mmdetection samples its targets).

            torchvision reads the box itself as ``roi_align`` coordinates: its targets, pasted back by its own
            inference, lie up to half a pixel up and left of their objects, less where its nearest-neighbour resize
            of the masks happens to offset that. These lie within 0.06 px at every scale
            (tests/test_mask_targets.py; docs/performance.md)."""
            boxes, (height, width) = boxes.float(), image_shape  # autocast hands bf16 proposals: too coarse here
            size = boxes.new_empty(4)  # filled on the device: no copy from the host (a sync), and a true division
            size[0::2], size[1::2] = width, height  # (CUDA divides by a Python number with its reciprocal)
            origin, scale = frames[:, :2].repeat(1, 2), frames[:, 2:].repeat(1, 2)  # a list index is a device copy
            return (boxes / size - origin) * scale - 0.5

        @staticmethod
        def cropped(targets) -> bool:
            """Do ``targets`` hold cropped masks (all of them; a mix is an error)?"""
            has = [("mask_crops" in t and "mask_frames" in t) for t in targets or []]
            if any(has) and not all(has):
                raise ValueError("every target needs mask_crops and mask_frames, or none of them")
            return bool(has) and all(has)

        def check_targets(self, targets):
            cropped = self.cropped(targets)
            super().check_targets([dict(t, masks=t["mask_crops"]) for t in targets] if cropped else targets)

        def forward(self, features, proposals, image_shapes, targets=None):
            if not (self.training and self.cropped(targets)):
                return super().forward(features, proposals, image_shapes, targets)
            for t in targets:  # torchvision's checks
                if not t["boxes"].is_floating_point():
                    raise TypeError(f"target boxes must of float type, instead got {t['boxes'].dtype}")
                if t["labels"].dtype != torch.int64:
                    raise TypeError(f"target labels must of int64 type, instead got {t['labels'].dtype}")
            proposals, matched_idxs, labels, regression_targets = self.select_training_samples(proposals, targets)
            box_features = self.box_head(self.box_roi_pool(features, proposals, image_shapes))
            class_logits, box_regression = self.box_predictor(box_features)
            loss_classifier, loss_box_reg = fastrcnn_loss(class_logits, box_regression, labels, regression_targets)
            positive = [torch.where(image_labels > 0)[0] for image_labels in labels]
            mask_proposals = [p[i] for p, i in zip(proposals, positive)]
            matched = [m[i] for m, i in zip(matched_idxs, positive)]
            mask_features = self.mask_head(self.mask_roi_pool(features, mask_proposals, image_shapes))
            mask_logits = self.mask_predictor(mask_features)
            in_crops = [self.boxes_in_crops(p, t["mask_frames"][m], shape)
                        for p, m, t, shape in zip(mask_proposals, matched, targets, image_shapes)]
            loss_mask = maskrcnn_loss(mask_logits, in_crops, [t["mask_crops"] for t in targets],
                                      [t["labels"] for t in targets], matched)
            return [], {"loss_classifier": loss_classifier, "loss_box_reg": loss_box_reg, "loss_mask": loss_mask}

    return CropAwareRoIHeads


def _postprocess(name: str, score_thresh: float, nms_thresh: float, detections_per_img: int) -> dict:
    """The constructor's keyword arguments for the values that are not -1 (R-CNN models spell them ``box_*``)."""
    for key, value in (("score_thresh", score_thresh), ("nms_thresh", nms_thresh)):
        if value != ARCH_DEFAULT and not 0 <= value <= 1:
            raise DetpipeError(f"model.{key} must be -1 (the architecture's default) or from 0 to 1, got {value!r}")
    if detections_per_img != ARCH_DEFAULT and not detections_per_img >= 1:
        raise DetpipeError("model.detections_per_img must be -1 (the architecture's default) or at least 1, "
                           f"got {detections_per_img!r}")
    prefix = "box_" if name.startswith(("fasterrcnn", "maskrcnn")) else ""
    values = {"score_thresh": score_thresh, "nms_thresh": nms_thresh, "detections_per_img": detections_per_img}
    return {prefix + k: v for k, v in values.items() if v != ARCH_DEFAULT}


def _build_small(name, backbone, num_classes, *, min_size, max_size, fpn_channels, pretrained_backbone, post,
                 levels=LEVELS, stages=STAGES, mask_head_channels=256):
    from torch import nn
    from torchvision.models import detection as det
    from torchvision.models import resnet
    from torchvision.models.detection.backbone_utils import BackboneWithFPN, mobilenet_backbone
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7
    from torchvision.ops.misc import FrozenBatchNorm2d

    if backbone not in BACKBONES:
        raise DetpipeError(f"model.backbone: unknown backbone {backbone!r}; choose one of {', '.join(BACKBONES)}")
    weights = "DEFAULT" if pretrained_backbone else None
    norm = FrozenBatchNorm2d if pretrained_backbone else nn.BatchNorm2d
    size = {"min_size": min_size, "max_size": max_size}

    if name == "ssdlite":
        if backbone != "mobilenet_v3_large":
            raise DetpipeError("model.backbone: ssdlite needs backbone mobilenet_v3_large")
        model = det.ssdlite320_mobilenet_v3_large(num_classes=num_classes, weights_backbone=weights,
                                                  norm_layer=partial(nn.BatchNorm2d, eps=0.001, momentum=0.03),
                                                  **post)
        model.transform.fixed_size = (min_size, min_size)  # SSD resizes to a square, 320 px by default
        return model
    one_stage = name in ONE_STAGE
    if name == "fcos" and (fpn_channels < 64 or fpn_channels % 32):
        # its head normalises with GroupNorm(32 groups); one channel per group fails on a 1x1 level
        raise DetpipeError(f"model.fpn_channels: fcos needs a multiple of 32 of at least 64, got {fpn_channels}")
    if backbone.startswith("resnet"):
        if backbone == "resnet10":  # ResNet-18 with one block per stage: no ImageNet weights, trained from scratch
            if pretrained_backbone:
                raise DetpipeError("model.pretrained_backbone: resnet10 has no ImageNet weights; use resnet18 or set "
                                   "it to false")
            body = resnet.ResNet(resnet.BasicBlock, [1, 1, 1, 1], norm_layer=norm)
        else:
            body = resnet.__dict__[backbone](weights=weights, norm_layer=norm)
        if pretrained_backbone:  # fine-tune the top stages only, as torchvision's recipes do
            for pname, p in body.named_parameters():
                p.requires_grad_(pname.startswith(("layer2", "layer3", "layer4")))
        layers = list(range(2, stages + 1)) if one_stage else [1, 2, 3, 4]  # IntermediateLayerGetter drops the rest
        base = 256 if backbone == "resnet50" else 64  # channels out of layer1; each later stage doubles them
        body = (_finest_levels_class() if levels < LEVELS else BackboneWithFPN)(
            body, {f"layer{k}": str(i) for i, k in enumerate(layers)},
            [base * 2 ** (k - 1) for k in layers], fpn_channels,
            extra_blocks=LastLevelP6P7(fpn_channels, fpn_channels) if one_stage and levels > 3 else None)
        if levels < LEVELS:
            _keep_finest_levels(body, levels)
            size["anchor_generator"] = _finest_anchors(name, levels)
    elif one_stage:
        raise DetpipeError(f"model.backbone: {name} needs a resnet backbone, not {backbone}")
    else:
        body = mobilenet_backbone(backbone_name=backbone, fpn=True, weights=weights, norm_layer=norm,
                                  trainable_layers=6 if not pretrained_backbone else 3)
        size["rpn_anchor_generator"] = det.anchor_utils.AnchorGenerator(
            ((32, 64, 128, 256, 512),) * 3, ((0.5, 1.0, 2.0),) * 3)
    if name == "fasterrcnn":
        return det.FasterRCNN(body, num_classes=num_classes, box_batch_size_per_image=128, **post, **size)
    if name == "maskrcnn":  # torchvision's mask head (four 3x3 convolutions, then the predictor), as wide as asked
        model = det.MaskRCNN(body, num_classes=num_classes, box_batch_size_per_image=128, **post, **size,
                             mask_head=det.mask_rcnn.MaskRCNNHeads(fpn_channels, (mask_head_channels,) * 4, 1))
        if mask_head_channels != 256:  # torchvision builds the predictor for its 256-wide head
            model.roi_heads.mask_predictor = det.mask_rcnn.MaskRCNNPredictor(mask_head_channels, mask_head_channels,
                                                                              num_classes)
        return model
    if name == "retinanet":
        return det.RetinaNet(body, num_classes=num_classes, **post, **size)
    # torchvision's score_thresh 0.2 costs recall
    return det.FCOS(body, num_classes=num_classes, **{"score_thresh": 0.05, **post}, **size)


def _keep_finest_levels(body, levels: int) -> None:
    """Make the one-stage pyramid ``body`` (a FinestLevels of P3-P7) return its ``levels`` finest maps only.

    The top-down pathway still runs from the last stage built, so P3 keeps the coarser stages' context; the
    convolutions that only made the dropped maps (P4/P5's output convs, P7's) become identities, so every parameter
    gets a gradient (DDP needs that) and no time is spent on them. The state_dict keeps BackboneWithFPN's names.
    """
    from torch import nn

    for i in range(levels, len(body.fpn.layer_blocks)):  # FPN outputs of C3, C4, C5: P3, P4, P5
        body.fpn.layer_blocks[i] = nn.Identity()
    if levels == 4:  # P6 is kept, P7 is not
        body.fpn.extra_blocks.p7 = nn.Identity()
    body.levels = levels


@functools.cache
def _finest_levels_class():
    # Defined here, not at module level, on purpose: MLflow's cloudpickle then stores the class by value, so a
    # logged model loads where detpipe is not installed (tests/test_tracking.py).
    from torchvision.models.detection.backbone_utils import BackboneWithFPN

    class FinestLevels(BackboneWithFPN):
        """A BackboneWithFPN whose output stops after its ``levels`` finest feature maps."""

        levels = LEVELS

        def forward(self, x):
            return OrderedDict(islice(super().forward(x).items(), self.levels))

    return FinestLevels


def _finest_anchors(name: str, levels: int):
    """torchvision's anchors of ``name`` (RetinaNet's three sizes and three ratios per level from 32 px, FCOS's one
    point per location sized from 8 px) for the ``levels`` finest levels."""
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.retinanet import _default_anchorgen

    if name == "retinanet":
        full = _default_anchorgen()
        return AnchorGenerator(full.sizes[:levels], full.aspect_ratios[:levels])
    return AnchorGenerator(tuple((8 * 2 ** i,) for i in range(levels)), ((1.0,),) * levels)  # FCOS.__init__'s


def _live_box_regression(fcos):
    """Start FCOS's box regression with every output alive.

    torchvision's regression head ends in a ReLU, with weights drawn from N(0, 0.01) and bias 0, so at
    initialisation about half of the (location, side) outputs are negative: they are clamped to 0 and get no
    gradient, and which half depends on the seed. Trained from scratch, that made the box loss of one seed
    learn half as fast as another's (docs/performance.md). A bias of 1 (sides of one anchor size, 8 px on P3)
    starts them on the live side (all of them with a 64-channel pyramid, over 99 % with the R50 head's 256), as
    the classifier's bias starts at its prior. Loaded weights replace it.
    """
    from torch import nn

    nn.init.constant_(fcos.head.regression_head.bbox_reg.bias, 1.0)
    return fcos


def _build_torchvision(name, num_classes, *, min_size, max_size, pretrained_backbone, post, weights):
    from torchvision.models import get_model

    kwargs = dict(post)
    if not name.startswith("ssd"):  # SSD builders fix their input size (300, 320) and take no min/max_size
        kwargs.update(min_size=min_size, max_size=max_size)
    backbone_weights = _BACKBONE_WEIGHTS.get(name, "IMAGENET1K_V1") if pretrained_backbone else None
    model = get_model(name, weights=None, weights_backbone=backbone_weights, num_classes=num_classes, **kwargs)
    if weights:
        _pretrained_layout(model, name, weights)
    return model


def _pretrained_layout(model, builder: str, weights: str) -> None:
    """Make ``model`` what torchvision's builder makes when it is given weights, before they are loaded:
    FrozenBatchNorm2d in the backbone (not in the v2 models and SSDs), the backbone's first stages frozen (its
    default ``trainable_backbone_layers``: 3 of 5 stages for ResNet, 3 of 6 for MobileNet, 4 of 5 for VGG, all
    for ssdlite) and, for the three original COCO_V1 weights, FrozenBatchNorm2d's eps at 0 as they were trained."""
    from torch import nn
    from torchvision.ops.misc import FrozenBatchNorm2d

    if builder in _FROZEN_BN:
        _freeze_batchnorm(model.backbone.body, nn.BatchNorm2d, FrozenBatchNorm2d)
    if "resnet50" in builder:
        for pname, p in model.backbone.body.named_parameters():
            if not pname.startswith(("layer2", "layer3", "layer4")):
                p.requires_grad_(False)
    elif builder.startswith("fasterrcnn_mobilenet"):
        blocks = list(model.backbone.body.children())
        stages = [0] + [i for i, b in enumerate(blocks) if getattr(b, "_is_cn", False)] + [len(blocks) - 1]
        for block in blocks[:stages[len(stages) - 3]]:
            block.requires_grad_(False)
    elif builder == "ssd300_vgg16":
        model.backbone.features[:4].requires_grad_(False)  # conv1_1 and conv1_2
    if builder in _ZERO_EPS and _is_coco_v1(builder, weights):
        for module in model.modules():
            if isinstance(module, FrozenBatchNorm2d):
                module.eps = 0.0


def _freeze_batchnorm(module, batchnorm, frozen) -> None:
    for cname, child in module.named_children():
        if isinstance(child, batchnorm):
            new = frozen(child.num_features, eps=child.eps)
            for key in ("weight", "bias", "running_mean", "running_var"):
                getattr(new, key).copy_(getattr(child, key).detach())
            setattr(module, cname, new)
        else:
            _freeze_batchnorm(child, batchnorm, frozen)


def _is_coco_v1(builder: str, weights: str) -> bool:
    """Are ``weights`` torchvision's COCO_V1 of ``builder``: by name, or a file with its published name?"""
    from torchvision.models import get_model_weights

    member = get_model_weights(builder).__members__.get("COCO_V1")
    if member is None:
        return False
    if _is_path(weights):
        return Path(weights).name == member.url.rsplit("/", 1)[-1]
    return _weights_member(builder, weights) == member


def _is_path(source: str) -> bool:
    """A weights file, not a weights name: names (COCO_V1, DEFAULT, …) hold no dots or slashes."""
    return any(c in source for c in "./\\") or Path(source).is_file()


def _weights_member(builder: str | None, name: str):
    from torchvision.models import get_model_weights

    if builder not in BUILDERS:
        raise DetpipeError(f"weights {name!r}: named weights are torchvision's, for a builder name as model.name "
                           f"({BUILDERS[0]}, …), not {builder}; give the path of a weights file instead")
    enum = get_model_weights(builder)
    if name not in enum.__members__:
        raise DetpipeError(f"weights {name!r}: unknown for {builder}; choose one of {', '.join(enum.__members__)}, "
                           "or give the path of a weights file")
    return enum[name]


def fetch_weights(url: str) -> Path:
    """The file at ``url`` in torch's hub cache (``torch.hub.get_dir()/checkpoints``), downloaded when it is not
    there yet. A file name ending in ``-<hex>.pth`` (torchvision's) must have a sha256 starting with those digits:
    checked on download and again on each use, so a damaged or wrong file is refused, never loaded."""
    import torch

    name = url.rsplit("/", 1)[-1]
    target = Path(torch.hub.get_dir()) / "checkpoints" / name
    found = _HASH.search(name)
    prefix = found.group(1) if found and found.group(1) else None
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        print(f"downloading {url} into {target}", file=sys.stderr, flush=True)
        try:  # into a temporary file first, removed on any failure
            torch.hub.download_url_to_file(url, str(target), hash_prefix=prefix, progress=False)
        except RuntimeError as exc:  # torch's "invalid hash value (expected ..., got ...)"
            why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise DetpipeError(f"{url}: the download does not match the sha256 in its name ({why}); "
                               "nothing was kept") from None
        except OSError as exc:
            raise DetpipeError(f"{url}: cannot download ({getattr(exc, 'reason', exc)}); without internet, copy "
                               f"the file to {target}") from None
    elif prefix:
        digest = hashlib.sha256()
        with open(target, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        if not digest.hexdigest().startswith(prefix):
            raise DetpipeError(f"{target}: cached weights are damaged (sha256 {digest.hexdigest()[:16]}…, expected "
                               f"{prefix}…); delete the file to download it again")
    return target


def read_weights(source: str, builder: str | None = None) -> dict:
    """The state_dict named by ``source``: a torchvision weights name of ``builder`` (downloaded once, see
    :func:`fetch_weights`) or a file holding a state_dict, a detpipe checkpoint (``{"model": ..., "meta": ...}``,
    also ``last.pt``) or ``{"state_dict": ...}``."""
    import torch

    if _is_path(source):
        path = Path(source).expanduser()
        if not path.is_file():
            raise DetpipeError(f"{source}: weights file is missing")
    else:
        path = fetch_weights(_weights_member(builder, source).url)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, bad pickle, a pickled object that is not plain tensors …
        why = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise DetpipeError(f"{path}: not a readable weights file ({why})") from None
    for key in ("model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not (isinstance(obj, dict) and obj and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                  for k, v in obj.items())):
        raise DetpipeError(f"{path}: holds no state_dict (parameter names to tensors)")
    return obj


def load_weights(model, source: str, builder: str | None) -> list[str]:
    """Load the weights ``source`` names (see :func:`read_weights`) into ``model``; returns the names of its
    state_dict entries that were not loaded: those whose shape differs (the class-specific head layers when the
    number of classes differs from the weights', COCO's 91) keep their fresh initialisation. Weights lacking
    most of the model's names or shapes (another architecture, backbone or width) are refused."""
    state = read_weights(source, builder)
    own = model.state_dict()
    names = [k for k in own if not k.endswith("num_batches_tracked")]
    present = [k for k in names if k in state]
    if 2 * len(present) < len(names):
        missing = [k for k in names if k not in state]
        raise DetpipeError(f"{source}: weights of another architecture: {len(missing)} of the model's {len(names)} "
                           f"tensors are not in them ({listing(missing, 3)})")
    fits = {k: state[k] for k in own if k in state and tuple(state[k].shape) == tuple(own[k].shape)}
    if 2 * len([k for k in present if k in fits]) < len(names):
        raise DetpipeError(f"{source}: weights of another backbone or width: most of the model's {len(names)} "
                           f"tensors have other shapes in them ({listing([k for k in present if k not in fits], 3)})")
    model.load_state_dict(fits, strict=False)
    return [k for k in names if k not in fits]


def _mask_head_width(state_dict) -> int | None:
    """The mask-head width in a state dict (for the small maskrcnn, 256 in checkpoints saved before it followed
    ``fpn_channels``); None for models without masks. The builder models ignore it."""
    weight = state_dict.get("roi_heads.mask_head.0.0.weight")
    return None if weight is None else weight.shape[0]


def load_checkpoint(path, device="cpu"):
    """Rebuild the model saved by the train stage; returns ``(model, meta)`` with class names and ids."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise DetpipeError(f"{path}: checkpoint is missing; run the train stage first")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
        meta, m = ckpt["meta"], ckpt["meta"]["model"]
        post = {k: m.get(k, ARCH_DEFAULT) for k in ("score_thresh", "nms_thresh", "detections_per_img")}
        # The ImageNet backbone changes the shape of one model only: SSDlite's is built without its reduced tail.
        # (FrozenBatchNorm2d weights load into BatchNorm2d and compute the same in eval mode.)
        imagenet = m["name"] == "ssdlite320_mobilenet_v3_large" and m.get("pretrained_backbone", False)
        model = build_model(m["name"], m["backbone"], len(meta["classes"]) + 1, min_size=m["min_size"],
                            max_size=m["max_size"], fpn_channels=m["fpn_channels"], pretrained_backbone=imagenet,
                            **post, weights=m.get("weights", ""), load=False,  # the layout: the weights are in ckpt
                            pyramid_levels=m.get("pyramid_levels", LEVELS),  # saved before the key: P3-P7
                            backbone_stages=m.get("backbone_stages", STAGES),
                            fixed_canvas=m.get("fixed_canvas", False),
                            mask_head_channels=_mask_head_width(ckpt["model"]))
        model.load_state_dict(ckpt["model"])
    except DetpipeError as exc:
        raise DetpipeError(f"{path}: {exc}") from None
    except Exception as exc:  # torch raises many kinds for a damaged file: truncated zip, bad pickle, wrong keys
        why = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise DetpipeError(f"{path}: not a readable detpipe checkpoint ({why}); rerun the train stage") from None
    return model.to(device).eval(), meta
