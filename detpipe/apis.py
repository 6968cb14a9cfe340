"""The mmdetection tutorial's three calls on torchvision detectors, plus its asynchronous interface.

    model = init_detector("params/detpipe.yaml", "runs/train/model.pt", device="cpu")
    result = inference_detector(model, "demo.jpg")
    show_result("demo.jpg", result, score_thr=0.3, out_file="out.jpg")

``result`` has mmdetection 2.x's shape, so tutorial code that indexes it keeps working:

* ``result[k]``: a float32 ``(n, 5)`` array ``[x1, y1, x2, y2, score]`` per class ``k`` (class order of
  the checkpoint; ``n`` may be 0), boxes in the input image's pixels;
* ``result.class_names``: the names of those classes;
* ``result.masks``: for mask models, per class a list of ``HxW`` bool arrays, one per row of ``result[k]``;
  ``None`` for box-only models;
* ``result.seconds``, ``result.batch_size`` and ``result.fps``: the wall time of the call that made it (its
  whole batch: tensors, forward pass, results back on the host), the images in that batch, and their ratio.

The tutorial's notebook training, over the same code as the train stage::

    cfg = load_config("params/detpipe.yaml", ["train.epochs=2"])
    train_set = build_dataset(cfg, "train")            # a torch Dataset: (uint8 CHW image, target dict)
    model = build_detector(cfg, len(train_set.class_names))
    history = train_detector(cfg, out="runs/notebook")  # the train stage's run(): MLflow run, model.pt, logs

A list of images gives a list of results, computed in one forward pass. ``await async_inference_detector(model,
imgs)`` runs the same inference in a worker thread, so an event loop (a web server) stays responsive.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

from detpipe import config as config_mod
from detpipe import engine
from detpipe import train as train_stage
from detpipe.datasets import CocoDetection
from detpipe.errors import DetpipeError
from detpipe.files import atomic_path
from detpipe.images import read_rgb
from detpipe.models import build_from_params, build_model, has_masks, load_checkpoint
from detpipe.transforms import train_transforms
from detpipe.visualize import draw

MODEL_KEYS = ("name", "backbone", "min_size", "max_size", "fpn_channels")
# Passed on to build_model when a config's model section has them (post-processing and weights params)
OPTIONAL_MODEL_KEYS = ("score_thresh", "nms_thresh", "detections_per_img", "weights", "pyramid_levels",
                      "backbone_stages", "fixed_canvas")


class DetResult(list):
    """Per-class ``(n, 5)`` box arrays (a list, as in mmdetection) that also knows its class names, and how long
    the inference that made it took."""

    def __init__(self, per_class, class_names, masks=None, seconds: float | None = None, batch_size: int = 1):
        super().__init__(per_class)
        self.class_names = list(class_names)
        self.masks = masks  # per class: list of HxW bool arrays, or None for box-only models
        self.seconds = seconds  # the whole batch's inference
        self.batch_size = batch_size

    @property
    def fps(self) -> float | None:
        """Images per second of the batch this result came in (None when not timed)."""
        return self.batch_size / self.seconds if self.seconds else None


def _model_spec(config) -> tuple[dict, list[str], str]:
    """The model section, class names and a name for errors, from a params file, a run's ``config.yaml`` or a dict.

    A run's ``runs/train/config.yaml`` is the resolved params with the dataset entry under ``data``: it is read as
    it is (the params file it came from and its dataset registry may have changed since).
    """
    if isinstance(config, dict):
        data, where = config_mod.dict_of(config), "config"
    else:
        where = str(config)
        data = config_mod.read_yaml(Path(config))
        if not (isinstance(data, dict) and isinstance(data.get("data"), dict)):
            data = config_mod.dict_of(config_mod.load(Path(config)))  # a params file: validated, dataset looked up
    model = data.get("model")
    for key in MODEL_KEYS:
        if not isinstance(model, dict) or key not in model:
            raise DetpipeError(f"{where}: missing key model.{key}")
    classes = (data.get("data") or {}).get("classes")
    if not classes:
        raise DetpipeError(f"{where}: data.classes is empty (the classes come from the data); "
                           "pass the run's checkpoint, which holds them")
    return model, list(classes), where


def init_detector(config=None, checkpoint=None, device="cpu"):
    """Build a detector from a params file (or a run's ``config.yaml``) and/or a train-stage checkpoint.

    With a checkpoint, the architecture and classes stored in it are used; ``config`` may then be None.
    Without one, the model named in ``config`` is built for the classes of its dataset: untrained, or with the
    weights its model section names.
    """
    dev = engine.resolve_device(device)
    if checkpoint is not None:
        model, meta = load_checkpoint(checkpoint, str(dev))
    else:
        if config is None:
            raise DetpipeError("init_detector: give a config, a checkpoint, or both")
        m, classes, where = _model_spec(config)
        extra = {k: m[k] for k in OPTIONAL_MODEL_KEYS if k in m}
        try:
            model = build_model(m["name"], m["backbone"], len(classes) + 1, min_size=m["min_size"],
                                max_size=m["max_size"], fpn_channels=m["fpn_channels"], **extra).to(dev).eval()
        except DetpipeError as exc:
            raise DetpipeError(f"{where}: {exc}") from None
        meta = {"model": m, "classes": classes, "cat_ids": list(range(1, len(classes) + 1))}
    model.meta = meta
    model.device = dev
    model.lock = threading.Lock()  # one inference at a time per model (see async_inference_detector)
    return model


def _as_pil(img) -> Image.Image:
    if isinstance(img, (str, Path)):
        return read_rgb(img)
    if isinstance(img, np.ndarray):  # an RGB array, HxWx3 uint8
        return Image.fromarray(img.astype(np.uint8)).convert("RGB")
    return img.convert("RGB")


def inference_detector(model, imgs):
    """Detect objects in one image or a list (paths, PIL images or RGB arrays); a list gives a list back.

    A list runs as one batch (one forward pass); images of different sizes may be mixed. Each result carries
    the batch's timing: ``seconds`` (from the decoded pictures to results on the host), ``batch_size``, ``fps``.
    """
    import torch

    single = not isinstance(imgs, (list, tuple))
    images = [_as_pil(i) for i in ([imgs] if single else imgs)]
    if not images:
        return []
    started = time.perf_counter()
    tensors = [torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).float().div(255).to(model.device)
               for im in images]
    with torch.no_grad():  # grad mode is per thread: this holds in async_inference_detector's worker too
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
    seconds = time.perf_counter() - started  # the outputs are on the host: a GPU has finished
    for result in results:
        result.seconds, result.batch_size = seconds, len(results)
    return results[0] if single else results


_FALLBACK_LOCK = threading.Lock()  # for models not made by init_detector


def _locked_inference(model, imgs):
    with getattr(model, "lock", _FALLBACK_LOCK):
        return inference_detector(model, imgs)


async def async_inference_detector(model, imgs):
    """:func:`inference_detector` in a worker thread, so the event loop keeps serving while the model runs.

    Calls on one model take turns (a lock per model): concurrent ``asyncio.gather`` calls give the same
    detections as the same calls one after another.
    """
    return await asyncio.to_thread(_locked_inference, model, imgs)


def show_result(img, result: DetResult, score_thr: float = 0.3, out_file=None) -> Image.Image:
    """Draw detections scoring at least ``score_thr`` (boxes, class names, scores, masks); save to ``out_file``
    when given (format from its suffix, PNG otherwise); return the picture."""
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


def load_config(path="params/detpipe.yaml", overrides: list[str] = ()) -> config_mod.Config:
    """Params as the stages read them (validated, with ``cfg.data`` the dataset's registry entry)."""
    return config_mod.load(Path(path), list(overrides))


def build_dataset(cfg: config_mod.Config, split: str = "train", data_dir="data/coco",
                  image_root="data/raw") -> CocoDetection:
    """A converted split as a torch Dataset; the train split gets the training augmentation of ``cfg``."""
    transforms = train_transforms(cfg.train.hflip, cfg.seed + 1, cfg.train.scale_range) if split == "train" else None
    return CocoDetection(Path(data_dir) / f"{split}.json", Path(image_root), with_masks=has_masks(cfg.model.name),
                         transforms=transforms, mask_targets=cfg.train.mask_targets)


def build_detector(cfg: config_mod.Config, num_classes: int):
    """The model of ``cfg`` for ``num_classes`` object classes (the background class is added here)."""
    return build_from_params(cfg.model, num_classes)


def train_detector(cfg: config_mod.Config, data_dir="data/coco", image_root="data/raw", out="runs/train") -> list[dict]:
    """Train exactly as the train stage does (same checks, MLflow run, resume, outputs); returns the epoch log."""
    return train_stage.run(cfg, Path(data_dir), Path(image_root), Path(out))
