"""Params: YAML loading, dotted overrides, validation against one schema, dot access, a flat view for MLflow."""

from __future__ import annotations

import copy
import difflib
import math
import operator
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from detpipe.errors import DetpipeError

PARAMS_FILE = Path("params/detpipe.yaml")
DATASETS_FILE = Path("params/datasets.yaml")
REQUIRED = object()

# The choices of model.name and model.backbone; detpipe.models builds exactly these (a test keeps them equal).
# They are spelled out here so that reading params does not make every stage depend on the model code.
ARCHITECTURES = ("fasterrcnn", "maskrcnn", "retinanet", "fcos", "ssdlite",  # small, with model.backbone
                 "fasterrcnn_resnet50_fpn", "fasterrcnn_resnet50_fpn_v2", "fasterrcnn_mobilenet_v3_large_fpn",
                 "fasterrcnn_mobilenet_v3_large_320_fpn", "maskrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn_v2",
                 "retinanet_resnet50_fpn", "retinanet_resnet50_fpn_v2", "fcos_resnet50_fpn", "ssd300_vgg16",
                 "ssdlite320_mobilenet_v3_large")  # torchvision's builders, by name (docs/models.md)
BACKBONES = ("resnet10", "resnet18", "resnet34", "resnet50", "mobilenet_v3_large")
ONE_STAGE = ("retinanet", "fcos")  # the small ones that model.pyramid_levels and model.backbone_stages apply to


def check_pyramid(name: str, levels: int, stages: int) -> None:
    """A one-line error when ``stages`` backbone stages cannot make ``levels`` pyramid levels for ``name``: checked
    up front, before a stage opens a run; ``models.build_model`` refuses the same (tests/test_models.py)."""
    if name in ONE_STAGE and stages < 4 and levels > stages - 1:
        built = "P3 only, 1 level" if stages == 2 else f"P3-P{stages + 1}, at most {stages - 1} levels"
        raise DetpipeError(f"model.pyramid_levels {levels} needs model.backbone_stages >= {min(levels + 1, 4)}: "
                           f"backbone_stages {stages} builds {built}")


@dataclass(frozen=True)
class Key:
    """One param: its type (or tuple of allowed values), meaning, default (when it may be left out) and range."""

    kind: Any
    help: str
    default: Any = REQUIRED
    ge: float | None = None  # inclusive bounds
    le: float | None = None
    gt: float | None = None  # exclusive bounds
    lt: float | None = None

    def range_error(self, value) -> str | None:
        checks = ((self.ge, operator.ge, "at least"), (self.le, operator.le, "at most"),
                  (self.gt, operator.gt, "more than"), (self.lt, operator.lt, "less than"))
        for bound, holds, words in checks:
            if bound is not None and not holds(value, bound):
                return f"must be {words} {bound:g}, got {value!r}"
        return None


# Documented in docs/params.md (a test checks every key is there).
SCHEMA: dict[str, Any] = {
    "experiment": Key(str, "MLflow experiment name; runs of one experiment are compared in the report"),
    "seed": Key(int, "seed for weight init, data order and augmentation", ge=0),
    "device": Key(("auto", "cpu", "cuda"), "auto uses CUDA when present"),
    "threads": Key(int, "CPU threads for torch; 0 = every core (Snakemake would otherwise pin OMP to 1 thread)", ge=0),
    "dataset": Key(str, "name of an entry in params/datasets.yaml"),
    "preset": Key(str, "a file of params/presets/ (without .yaml) whose keys replace this file's: a whole setup in "
                       "one switch; \"\": none", ""),
    "download": {
        "retries": Key(int, "tries per archive after a dropped connection (resumed with HTTP Range)", ge=0),
        "max_unpacked_gb": Key(float, "refuse archives that unpack to more than this", gt=0),
        "max_ratio": Key(float, "refuse archives (and members) that unpack to more than this many times their "
                                "packed size: a zip bomb, not data", 200.0, gt=1),
        "cache": Key(str, "folder keeping verified archives, so a rerun downloads nothing"),
    },
    "convert": {
        "min_box_size": Key(float, "boxes narrower or shorter than this (pixels, after clipping) are dropped", ge=0),
        "strict": Key(bool, "clipped, dropped or mis-sized boxes are errors instead of counts"),
    },
    "model": {
        "name": Key(ARCHITECTURES, "detector: a small architecture, or a torchvision builder name"),
        "backbone": Key(BACKBONES, "backbone network (with an FPN) of the small architectures; builders ignore it"),
        "fpn_channels": Key(int, "feature-pyramid width; 256 is torchvision's, smaller is much faster on a CPU", ge=1),
        "pyramid_levels": Key(int, "small retinanet and fcos: the head predicts from this many of the finest pyramid "
                                   "levels, P3 first; 5 (P3-P7) is torchvision's, 1 is P3 alone", 5, ge=1, le=5),
        "backbone_stages": Key(int, "small retinanet and fcos: ResNet stages built, the pyramid's top-down pathway "
                                    "starting from the last (4: C5, torchvision's; 3: C4)", 4, ge=2, le=4),
        "fixed_canvas": Key(bool, "pad every batch to one of three fixed sizes (landscape, portrait, mixed) instead of "
                                  "its own: few input shapes for train.cudnn_benchmark and train.compile", False),
        "pretrained_backbone": Key(bool, "start from torchvision's ImageNet backbone weights (downloads once)"),
        "min_size": Key(int, "images are resized so their short side is this many pixels", ge=16),
        "max_size": Key(int, "...and their long side at most this many", ge=16),
        "weights": Key(str, "start from: a torchvision weights name of model.name (COCO_V1, DEFAULT, ...; downloaded "
                            "once) or a weights file; \"\": none", ""),
        "score_thresh": Key(float, "detections scoring below this are dropped; -1: the architecture's default",
                            -1.0, ge=-1, le=1),
        "nms_thresh": Key(float, "IoU above which non-maximum suppression drops the lower-scoring box; -1: the "
                                 "architecture's default", -1.0, ge=-1, le=1),
        "detections_per_img": Key(int, "most detections kept per image; -1: the architecture's default", -1, ge=-1),
    },
    "train": {
        "epochs": Key(int, "passes over the train split", ge=1),
        "batch_size": Key(int, "images per iteration", ge=1),
        "optimizer": Key(("sgd", "adamw"), "SGD with momentum, or AdamW", "sgd"),
        "lr": Key(float, "peak learning rate", gt=0),
        "momentum": Key(float, "SGD momentum (AdamW: beta1)", ge=0, lt=1),
        "weight_decay": Key(float, "weight decay (AdamW: decoupled)", ge=0),
        "decay_norm_and_bias": Key(bool, "false excludes norm layers' weights and every bias from weight decay", True),
        "warmup_iters": Key(int, "iterations of linear learning-rate warm-up", ge=0),
        "lr_schedule": Key(("cosine", "step", "multistep", "constant"),
                           "decay after warm-up; step divides by 10 at 2/3 and 8/9 of training, multistep at "
                           "milestones"),
        "milestones": Key(list, "epochs after which multistep divides the learning rate by 10", [8, 11]),
        "clip_grad_norm": Key(float, "clip the gradients' total norm to this; 0 turns clipping off", 10.0, ge=0),
        "hflip": Key(float, "probability of a horizontal flip per training image", ge=0, le=1),
        "scale_range": Key(list, "zoom each training image by a factor drawn from [low, high], keeping its size "
                                 "(crop or pad); [1, 1]: off", [1.0, 1.0]),
        "group_aspect_ratio": Key(bool, "batch images of like orientation (wide or tall) together: less padding",
                                  False),
        "amp": Key(bool, "mixed precision on CUDA (ignored on the CPU)"),
        "amp_dtype": Key(("bfloat16", "float16"), "autocast type; float16 uses a gradient scaler", "bfloat16"),
        "num_workers": Key(int, "DataLoader worker processes", ge=0),
        # Speed levers (docs/training.md, "GPU speed"): none changes what is trained beyond float rounding.
        "deferred_sync": Key(bool, "read the losses from the device only every log_interval iterations and at "
                                   "epoch end (no GPU sync per iteration); a NaN loss is caught there", True),
        "cudnn_benchmark": Key(bool, "cuDNN times its algorithms per input shape: faster for fixed shapes, slower "
                                     "for changing ones (Mask R-CNN)", False),
        "channels_last": Key(bool, "keep convolution weights NHWC (channels last)", False),
        "compile": Key(bool, "torch.compile the backbone with its FPN (slow to start; slower on the CPU)", False),
        "fused_optimizer": Key(bool, "fused optimizer step where torch has one for the device, else foreach", False),
        "pin_memory": Key(bool, "pin loaded batches in memory for faster copies to CUDA (ignored on the CPU)", True),
        "prefetch_factor": Key(int, "batches each DataLoader worker loads ahead (with num_workers > 0)", 2, ge=1),
        "persistent_workers": Key(bool, "keep DataLoader workers between epochs (with num_workers > 0)", False),
        "gpu_decode": Key(bool, "decode JPEGs on the GPU with nvJPEG in the training loop (device cuda only)", False),
        "parallel_rpn": Key(bool, "R-CNN models on CUDA: filter each image's RPN proposals (NMS) in a thread and CUDA "
                                  "stream of its own, not one image after the other; the same proposals", False),
        "sync_free_inputs": Key(bool, "Faster/Mask R-CNN, RetinaNet, FCOS: no host-device sync before the backbone "
                                      "(transform constants kept on the device, boxes checked on the host); the same "
                                      "losses", False),
        "sync_free_loss": Key(bool, "FCOS: its head's loss without host-device syncs (masked sums instead of "
                                    "selections); the same losses up to float rounding", False),
        "mask_targets": Key(("cropped", "full"), "mask models: each object's mask cut to the object (cropped) or "
                                                 "an image-sized bitmap per object (full, torchvision's)", "cropped"),
        "processes": Key(int, "training processes on this machine (torchrun, DistributedDataParallel): one per GPU, "
                              "or several on the CPU", 1, ge=1),
        "log_interval": Key(int, "print loss and ETA every this many iterations", ge=1),
        "val_interval": Key(int, "validate every this many epochs (and after the last)", 1, ge=1),
        "best_metric": Key(("last", "bbox_mAP", "bbox_mAP_50", "segm_mAP", "segm_mAP_50"),
                           "model.pt is the epoch best by this val metric; last: the final epoch", "last"),
        "early_stop": Key(int, "stop after this many validations without a better best_metric; 0: never", 0, ge=0),
        "load_from": Key(str, "fine-tune: weights only, from a checkpoint file or a weights name; \"\": none", ""),
        "resume": Key(("auto", "never"), "auto: a rerun after a crash, with the same inputs, continues from the "
                                         "latest epoch checkpoint", "auto"),
    },
    "evaluate": {
        "batch_size": Key(int, "images per inference batch", ge=1),
        "score_thr": Key(float, "detections below this score are not saved", ge=0, le=1),
        "backend": Key(("ultrafast", "pycocotools"), "library scoring COCOeval, here and in train's validation: "
                                                     "ultrafast-pycocotools (same numbers, much faster) or "
                                                     "pycocotools", "ultrafast"),
    },
    "report": {
        "num_samples": Key(int, "training images drawn with their ground truth; also the most worst and good "
                                "val images drawn", ge=0),
        "score_thr": Key(float, "detections below this score are not drawn", ge=0, le=1),
    },
}


def _job(threads: int, mem_mb: int, runtime: int) -> dict[str, Key]:
    """What one stage's job asks a cluster for (Snakemake resources; SLURM through workflow/profiles/slurm)."""
    return {
        "threads": Key(int, "CPU cores (Snakemake threads; SLURM --cpus-per-task)", threads, ge=1),
        "mem_mb": Key(int, "memory in MB (SLURM --mem)", mem_mb, ge=1),
        "runtime": Key(int, "wall-clock limit in minutes (SLURM --time)", runtime, ge=1),
        "gpus": Key(int, "GPUs (SLURM --gpus); needs device auto or cuda", 0, ge=0),
    }


# Read by the Snakefile only: no stage reads them, so changing one reruns nothing (docs/scale-out.md).
SCHEMA["resources"] = {"download": _job(1, 2000, 60), "convert": _job(1, 4000, 60), "train": _job(4, 16000, 240),
                       "evaluate": _job(2, 8000, 60), "report": _job(1, 4000, 30)}

DATASET_SCHEMA: dict[str, Any] = {
    "source": Key(("synthetic", "url", "local"), "where the raw files come from"),
    "format": Key(str, "raw annotation format: coco, kitti, via, voc, yolo or one registered in workflow/formats/"),
    "classes": Key(list, "class names in label order; [] takes every class the data has"),
    "splits": Key(dict, "split name -> where the format finds it (folder, list file or annotation file)", {}),
    "options": Key(dict, "format-specific options, passed to the loader as keyword arguments", {}),
    "val_fraction": Key(float, "share of images put in val when the data has no split files", 0.2, gt=0, lt=1),
    "split_seed": Key(int, "seed of that split", 0, ge=0),
    "description": Key(str, "one line about the dataset", ""),
}
ARCHIVE_SCHEMA: dict[str, Any] = {
    "url": Key(str, "http(s) or file URL, or a local path, of a zip/tar archive (or a local folder)"),
    "sha256": Key(str, "expected sha256 of the archive (\"\": download once and print it)"),
    "subdir": Key(str, "folder inside the archive that holds the dataset", ""),
}
SOURCE_SCHEMA: dict[str, dict[str, Any]] = {
    "synthetic": {"generate": {
        "num_train": Key(int, "train images", ge=1), "num_val": Key(int, "val images", ge=1),
        "image_size": Key(int, "square image side in pixels", ge=16),
        "max_objects": Key(int, "objects per image, at most", ge=1),
        "seed": Key(int, "generator seed", ge=0),
    }},
    "url": {"archives": Key(list, "archives unpacked together into data/raw, each {url, sha256, subdir}")},
    "local": {"path": Key(str, "folder holding the raw dataset")},
}


# The params-file keys the train stage reads (its DVC params; the report's reproduce command needs them too).
TRAINING_KEYS = ("preset", "experiment", "seed", "device", "threads", "model", "train", "evaluate.backend")


def dotted(data: dict, key: str):
    """``data["a"]["b"]`` for ``"a.b"``; None where a level is missing (as for a left-out optional key)."""
    for part in key.split("."):
        data = data.get(part) if isinstance(data, dict) else None
    return data


class Config(dict):
    """A dict with attribute access (``cfg.train.lr``), like mmcv's Config."""

    def __getattr__(self, key: str) -> Any:
        try:
            value = self[key]
        except KeyError:
            raise AttributeError(key) from None
        return Config(value) if isinstance(value, dict) and not isinstance(value, Config) else value


def read_yaml(path: Path, what: str = "params file") -> Any:
    return read_yaml_text(path, what)[0]


def read_yaml_text(path: Path, what: str = "params file") -> tuple[Any, str]:
    """The parsed YAML of ``path`` and its text as written; one-line errors name the file (and the line)."""
    try:
        text = Path(path).read_text()
        return yaml.safe_load(text), text
    except FileNotFoundError:
        raise DetpipeError(f"{path}: {what} is missing") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise DetpipeError(f"{path}{line}: malformed YAML in {what} ({getattr(exc, 'problem', exc)})") from None


def apply_override(data: dict, override: str) -> None:
    """Apply ``a.b=value`` in place; the value is parsed as YAML (``0.1``, ``true``, ``[a, b]``), and nothing after
    the ``=`` is the empty string (YAML would read null)."""
    key, sep, raw = override.partition("=")
    if not sep or not key:
        raise DetpipeError(f"--set {override!r}: expected KEY=VALUE")
    *parents, leaf = key.split(".")
    node = data
    for part in parents:
        if not isinstance(node.get(part), dict):
            raise DetpipeError(f"--set {override!r}: {part!r} is not a section")
        node = node[part]
    try:
        node[leaf] = parse_value(raw)
    except yaml.YAMLError as exc:
        raise DetpipeError(f"--set {key}: value {raw!r} is not valid YAML ({getattr(exc, 'problem', exc)})") from None


def parse_value(raw: str) -> Any:
    """A ``--set`` value: YAML (``0.1``, ``true``, ``[a, b]``), and nothing at all the empty string."""
    return yaml.safe_load(raw) if raw.strip() else ""


_EXPONENT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _check_value(value: Any, spec: Key, name: str, where: str) -> Any:
    """The value, converted where the schema allows (an integer for a float key); else a one-line error."""
    kind = spec.kind
    if isinstance(kind, tuple):
        if value not in kind:
            raise DetpipeError(f"{where}: {name} is {value!r}; choose one of {', '.join(map(str, kind))}")
        return value
    if kind is float and isinstance(value, str) and _EXPONENT.fullmatch(value.strip()):
        value = float(value)  # YAML 1.1 reads 1e-3 (no dot) as a string; people write it for learning rates
    if kind in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and isinstance(value, float)):
            noun = "an integer" if kind is int else "a number"
            raise DetpipeError(f"{where}: {name} must be {noun}, got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise DetpipeError(f"{where}: {name} must be a finite number, got {value!r}")
        value = kind(value)
        problem = spec.range_error(value)
        if problem:
            raise DetpipeError(f"{where}: {name} {problem}")
        return value
    if not isinstance(value, kind):
        article = "an" if kind.__name__[0] in "aeiou" else "a"
        raise DetpipeError(f"{where}: {name} must be {article} {kind.__name__}, got {value!r}")
    return value


def _validate(data: Any, schema: dict, where: str, prefix: str = "") -> None:
    if not isinstance(data, dict):
        raise DetpipeError(f"{where}: {prefix.rstrip('.') or 'top level'} must be a mapping")
    for key in data:
        if key not in schema:
            hint = difflib.get_close_matches(str(key), list(schema), n=1, cutoff=0.5)
            tip = f"; did you mean {prefix}{hint[0]}?" if hint else ""
            raise DetpipeError(f"{where}: unknown key {prefix}{key}{tip}")
    for key, spec in schema.items():
        name = prefix + key
        if key not in data and isinstance(spec, Key) and spec.default is not REQUIRED:
            data[key] = copy.deepcopy(spec.default)  # a list default must not be shared between loads
        if key not in data:
            raise DetpipeError(f"{where}: missing key {name}")
        if isinstance(spec, dict):
            _validate(data[key], spec, where, name + ".")
        else:
            data[key] = _check_value(data[key], spec, name, where)


def load(path: Path = PARAMS_FILE, overrides: list[str] = (), datasets: Path | None = None) -> Config:
    """Load and validate the params file; ``cfg.data`` holds the selected dataset's registry entry."""
    path = Path(path)
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise DetpipeError(f"{path}: expected a mapping of params")
    chosen = [o.partition("=")[2].strip() for o in overrides if o.partition("=")[0].strip() == "preset"]
    preset = chosen[-1] if chosen else data.get("preset") or ""
    if preset:
        _merge(data, read_preset(path.parent / PRESETS, preset))
    for item in overrides:
        apply_override(data, item)
    # where the values came from, on one line: the file, its preset, the --set values as typed
    where = str(path) + (f" + {PRESETS}/{preset}.yaml" if preset else "") + "".join(f" --set {o!r}" for o in overrides)
    resources = data.setdefault("resources", {})  # optional, as are its stages: every key has a default
    for stage in SCHEMA["resources"]:
        if isinstance(resources, dict) and resources.get(stage) in (None, ""):  # "": --set resources.train=
            resources[stage] = {}
    _validate(data, SCHEMA, where)
    milestones = data["train"]["milestones"]
    if not all(isinstance(m, int) and not isinstance(m, bool) and m >= 1 for m in milestones):
        raise DetpipeError(f"{where}: train.milestones must be a list of epoch numbers (>= 1), got {milestones!r}")
    if data["train"]["early_stop"] and data["train"]["best_metric"] == "last":
        raise DetpipeError(f"{where}: train.early_stop needs a train.best_metric to watch (bbox_mAP, ...), not 'last'")
    scales = data["train"]["scale_range"]
    if not (len(scales) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in scales)
            and 0 < scales[0] <= scales[1]):
        raise DetpipeError(f"{where}: train.scale_range must be [low, high] with 0 < low <= high, got {scales!r}")
    data["train"]["scale_range"] = [float(v) for v in scales]
    try:
        check_pyramid(data["model"]["name"], data["model"]["pyramid_levels"], data["model"]["backbone_stages"])
    except DetpipeError as exc:
        raise DetpipeError(f"{where}: {exc}") from None
    if data["model"]["max_size"] < data["model"]["min_size"]:
        raise DetpipeError(f"{where}: model.max_size ({data['model']['max_size']}) is less than model.min_size "
                           f"({data['model']['min_size']})")
    for stage, job in data["resources"].items():
        if job["gpus"] and data["device"] == "cpu":
            raise DetpipeError(f"{where}: resources.{stage}.gpus asks the cluster for {job['gpus']} GPU(s) but device "
                               "is cpu; set device to auto or cuda, or gpus to 0")
    gpus, processes = data["resources"]["train"]["gpus"], data["train"]["processes"]
    if gpus and processes > 1 and processes != gpus:
        raise DetpipeError(f"{where}: train.processes is {processes} but resources.train.gpus is {gpus}: on GPUs the "
                           "train stage runs one process per GPU, so make them equal")
    registry_path = Path(datasets) if datasets else path.parent / DATASETS_FILE.name
    data["data"] = load_dataset_entry(registry_path, data["dataset"])
    cfg = Config(data)
    cfg._cli = {"params_file": path, "overrides": list(overrides)}  # how it was made (tracking.launch_tags)
    return cfg


PRESETS = "presets"  # beside the params file


def read_preset(folder: Path, name: str) -> dict:
    """A preset's params, every key checked against the schema (an error names the preset file)."""
    path = folder / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in folder.glob("*.yaml"))
        hint = difflib.get_close_matches(name, known, n=1)
        tip = f"did you mean {hint[0]}? " if hint else ""
        raise DetpipeError(f"preset {name!r}: no file {path}; {tip}known: {', '.join(known) or 'none'}")
    data = read_yaml(path) or {}
    if not isinstance(data, dict) or "preset" in data:
        raise DetpipeError(f"{path}: a preset is a mapping of params (and cannot name another preset)")

    def check(node: dict, schema: dict, prefix: str) -> None:
        for key, value in node.items():
            if key not in schema:
                raise DetpipeError(f"{path}: unknown key {prefix}{key}")
            if isinstance(schema[key], dict):
                if not isinstance(value, dict):
                    raise DetpipeError(f"{path}: {prefix}{key} must be a mapping")
                check(value, schema[key], f"{prefix}{key}.")

    check(data, SCHEMA, "")
    return data


def _merge(base: dict, changes: dict) -> None:
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = copy.deepcopy(value)


def load_dataset_entry(registry_path: Path, name: str) -> dict:
    registry = read_yaml(registry_path) or {}
    if not isinstance(registry, dict):
        raise DetpipeError(f"{registry_path}: expected a mapping of dataset names")
    if name not in registry:
        hint = difflib.get_close_matches(name, list(registry), n=1)
        tip = f"; did you mean {hint[0]}?" if hint else f"; known: {', '.join(registry)}"
        raise DetpipeError(f"{registry_path}: unknown dataset {name!r}{tip}")
    entry = registry[name]
    where = f"{registry_path}: {name}"
    source = entry.get("source") if isinstance(entry, dict) else None
    _validate(entry, {**DATASET_SCHEMA, **SOURCE_SCHEMA.get(source, {})}, where)
    if not all(isinstance(c, str) for c in entry["classes"]):
        raise DetpipeError(f"{where}: classes must be a list of names")
    for i, archive in enumerate(entry.get("archives", [])):
        _validate(archive, ARCHIVE_SCHEMA, where, f"archives[{i}].")
    if not entry.get("archives", True):
        raise DetpipeError(f"{where}: archives is empty")
    return entry  # the format name is checked by the convert stage, which owns the format loaders


def flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 0.1}}`` -> ``{"train.lr": 0.1}`` for MLflow params."""
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def dump(cfg: dict) -> str:
    return yaml.safe_dump(dict_of(cfg), sort_keys=False)


def dict_of(value: Any) -> Any:
    return {k: dict_of(v) for k, v in value.items()} if isinstance(value, dict) else value
