"""The mmdetection tutorial's three calls on torchvision detectors.

    model = init_detector("params/detpipe.yaml", "runs/train/model.pt", device="cpu")
    result = inference_detector(model, "demo.jpg")
    show_result("demo.jpg", result, score_thr=0.3, out_file="out.jpg")

``result`` has mmdetection 2.x's shape: one ``(n, 5)`` array ``[x1, y1, x2, y2, score]`` per class,
or ``(bbox_result, segm_result)`` for mask models; it also carries ``class_names``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from detpipe import config as config_mod
from detpipe.errors import DetpipeError
from detpipe.files import atomic_path
from detpipe.images import read_rgb
from detpipe.models import build_model, load_checkpoint
from detpipe.visualize import draw


class DetResult(list):
    """Per-class ``(n, 5)`` box arrays (a list, as in mmdetection) that also knows its class names."""

    def __init__(self, per_class, class_names, masks=None):
        super().__init__(per_class)
        self.class_names = list(class_names)
        self.masks = masks  # per class: list of HxW bool arrays, or None for box-only models


def init_detector(config=None, checkpoint=None, device: str = "cpu"):
    """Build a detector from a params file (or a run's ``config.yaml``) and/or a train-stage checkpoint.

    With a checkpoint, the architecture and classes stored in it are used; ``config`` may then be None.
    Without one, the model named in ``config`` is built untrained for the classes of its dataset.
    """
    import torch  # heavy: imported when a model is built, so importing the API stays quick

    if checkpoint is not None:
        model, meta = load_checkpoint(checkpoint, device)
    else:
        if config is None:
            raise DetpipeError("init_detector: give a config, a checkpoint, or both")
        cfg = config if isinstance(config, dict) else config_mod.load(Path(config))
        cfg = config_mod.Config(cfg)
        classes = list(cfg.data.classes)
        m = cfg.model
        model = build_model(m.name, m.backbone, len(classes) + 1, min_size=m.min_size, max_size=m.max_size,
                            fpn_channels=m.fpn_channels).to(device).eval()
        meta = {"model": config_mod.dict_of(m), "classes": classes, "cat_ids": list(range(1, len(classes) + 1))}
    model.meta = meta
    model.device = torch.device(device)
    return model


def _as_pil(img) -> Image.Image:
    if isinstance(img, (str, Path)):
        return read_rgb(img)
    if isinstance(img, np.ndarray):  # an RGB array, HxWx3 uint8
        return Image.fromarray(img.astype(np.uint8)).convert("RGB")
    return img.convert("RGB")


def inference_detector(model, imgs):
    """Detect objects in one image or a list (paths, PIL images or RGB arrays); a list gives a list back."""
    import torch

    single = not isinstance(imgs, (list, tuple))
    images = [_as_pil(i) for i in ([imgs] if single else imgs)]
    tensors = [torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).float().div(255).to(model.device)
               for im in images]
    with torch.no_grad():
        outputs = model.eval()(tensors)
    names = model.meta["classes"]
    results = []
    for out in outputs:
        boxes = out["boxes"].float().cpu().numpy()
        scores = out["scores"].float().cpu().numpy()
        labels = out["labels"].cpu().numpy() - 1
        per_class = [np.hstack([boxes[labels == k], scores[labels == k, None]]).astype(np.float32)
                     for k in range(len(names))]
        masks = None
        if "masks" in out:
            binary = (out["masks"][:, 0] > 0.5).cpu().numpy()
            masks = [list(binary[labels == k]) for k in range(len(names))]
        results.append(DetResult(per_class, names, masks))
    return results[0] if single else results


def show_result(img, result: DetResult, score_thr: float = 0.3, out_file=None) -> Image.Image:
    """Draw detections scoring at least ``score_thr``; save to ``out_file`` when given; return the picture."""
    image = _as_pil(img)
    boxes, labels, scores, masks = [], [], [], []
    for k, dets in enumerate(result):
        for j, det in enumerate(dets):
            if det[4] >= score_thr:
                boxes.append(det[:4])
                labels.append(k)
                scores.append(float(det[4]))
                if result.masks is not None:
                    masks.append(result.masks[k][j])
    picture = draw(image, boxes, labels, result.class_names, scores, masks if result.masks is not None else None)
    if out_file is not None:
        out_file = Path(out_file)
        with atomic_path(out_file) as tmp:
            picture.save(tmp, format=Image.registered_extensions().get(out_file.suffix.lower(), "PNG"))
    return picture
