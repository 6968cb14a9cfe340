"""Params: YAML loading, dotted overrides, validation against one schema, dot access, a flat view for MLflow."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml

from detpipe.errors import DetpipeError
from detpipe.models import ARCHITECTURES, BACKBONES

PARAMS_FILE = Path("params/detpipe.yaml")
DATASETS_FILE = Path("params/datasets.yaml")

# key: (accepted type or tuple of allowed values, one-line meaning[, default when the key may be left out]).
# Documented in docs/params.md.
SCHEMA: dict[str, Any] = {
    "experiment": (str, "MLflow experiment name; runs of one experiment are compared in the report"),
    "seed": (int, "seed for weight init, data order and augmentation"),
    "device": (("auto", "cpu", "cuda"), "auto uses CUDA when present"),
    "threads": (int, "CPU threads for torch; 0 = every core (Snakemake would otherwise pin OMP to 1 thread)"),
    "dataset": (str, "name of an entry in params/datasets.yaml"),
    "download": {
        "retries": (int, "tries per archive after a dropped connection (resumed with HTTP Range)"),
        "max_unpacked_gb": (float, "refuse archives that unpack to more than this"),
        "cache": (str, "folder keeping verified archives, so a rerun downloads nothing"),
    },
    "convert": {
        "min_box_size": (float, "boxes narrower or shorter than this (pixels, after clipping) are dropped"),
        "strict": (bool, "clipped, dropped or mis-sized boxes are errors instead of counts"),
    },
    "model": {
        "name": (ARCHITECTURES, "detector architecture"),
        "backbone": (BACKBONES, "backbone network (with an FPN)"),
        "fpn_channels": (int, "feature-pyramid width; 256 is torchvision's, smaller is much faster on a CPU"),
        "pretrained_backbone": (bool, "start from torchvision's ImageNet backbone weights (downloads once)"),
        "min_size": (int, "images are resized so their short side is this many pixels"),
        "max_size": (int, "...and their long side at most this many"),
    },
    "train": {
        "epochs": (int, "passes over the train split"),
        "batch_size": (int, "images per iteration"),
        "lr": (float, "peak learning rate of SGD"),
        "momentum": (float, "SGD momentum"),
        "weight_decay": (float, "L2 weight decay"),
        "warmup_iters": (int, "iterations of linear learning-rate warm-up"),
        "lr_schedule": (("cosine", "step", "constant"), "decay after warm-up; step divides by 10 at 2/3 and 8/9"),
        "hflip": (float, "probability of a horizontal flip per training image"),
        "amp": (bool, "bfloat16 autocast on CUDA (ignored on the CPU)"),
        "num_workers": (int, "DataLoader worker processes"),
        "log_interval": (int, "print loss and ETA every this many iterations"),
    },
    "evaluate": {
        "batch_size": (int, "images per inference batch"),
        "score_thr": (float, "detections below this score are not saved"),
    },
    "report": {
        "num_samples": (int, "val images drawn with predictions beside ground truth"),
        "score_thr": (float, "detections below this score are not drawn"),
    },
}

DATASET_SCHEMA: dict[str, Any] = {
    "source": (("synthetic", "url", "local"), "where the raw files come from"),
    "format": (str, "raw annotation format: coco, kitti, via, voc, yolo or one registered in workflow/formats/"),
    "classes": (list, "class names in label order; [] takes every class the data has"),
    "splits": (dict, "split name -> where the format finds it (folder, list file or annotation file)", {}),
    "options": (dict, "format-specific options, passed to the loader as keyword arguments", {}),
    "val_fraction": (float, "share of images put in val when the data has no split files", 0.2),
    "split_seed": (int, "seed of that split", 0),
    "description": (str, "one line about the dataset", ""),
}
ARCHIVE_SCHEMA: dict[str, Any] = {
    "url": (str, "http(s) or file URL, or a local path, of a zip/tar archive (or a local folder)"),
    "sha256": (str, "expected sha256 of the archive (\"\": download once and print it)"),
    "subdir": (str, "folder inside the archive that holds the dataset", ""),
}
SOURCE_SCHEMA: dict[str, dict[str, Any]] = {
    "synthetic": {"generate": {
        "num_train": (int, "train images"), "num_val": (int, "val images"),
        "image_size": (int, "square image side in pixels"), "max_objects": (int, "objects per image, at most"),
        "seed": (int, "generator seed"),
    }},
    "url": {"archives": (list, "archives unpacked together into data/raw, each {url, sha256, subdir}")},
    "local": {"path": (str, "folder holding the raw dataset")},
}


class Config(dict):
    """A dict with attribute access (``cfg.train.lr``), like mmcv's Config."""

    def __getattr__(self, key: str) -> Any:
        try:
            value = self[key]
        except KeyError:
            raise AttributeError(key) from None
        return Config(value) if isinstance(value, dict) and not isinstance(value, Config) else value


def read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise DetpipeError(f"{path}: params file is missing") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise DetpipeError(f"{path}{line}: malformed YAML ({getattr(exc, 'problem', exc)})") from None


def apply_override(data: dict, override: str) -> None:
    """Apply ``a.b=value`` in place; the value is parsed as YAML (``0.1``, ``true``, ``[a, b]``)."""
    key, sep, raw = override.partition("=")
    if not sep or not key:
        raise DetpipeError(f"override {override!r}: expected KEY=VALUE")
    *parents, leaf = key.split(".")
    node = data
    for part in parents:
        if not isinstance(node.get(part), dict):
            raise DetpipeError(f"override {override!r}: {part!r} is not a section")
        node = node[part]
    node[leaf] = yaml.safe_load(raw)


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
        if key not in data and isinstance(spec, tuple) and len(spec) == 3:
            data[key] = spec[2]
        if key not in data:
            raise DetpipeError(f"{where}: missing key {name}")
        value = data[key]
        if isinstance(spec, dict):
            _validate(value, spec, where, name + ".")
            continue
        kind = spec[0]
        if isinstance(kind, tuple):
            if value not in kind:
                raise DetpipeError(f"{where}: {name} is {value!r}; choose one of {', '.join(map(str, kind))}")
        elif kind is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise DetpipeError(f"{where}: {name} must be a number, got {value!r}")
            data[key] = float(value)
        elif kind is int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise DetpipeError(f"{where}: {name} must be an integer, got {value!r}")
        elif not isinstance(value, kind):
            article = "an" if kind.__name__[0] in "aeiou" else "a"
            raise DetpipeError(f"{where}: {name} must be {article} {kind.__name__}, got {value!r}")


def load(path: Path = PARAMS_FILE, overrides: list[str] = (), datasets: Path | None = None) -> Config:
    """Load and validate the params file; ``cfg.data`` holds the selected dataset's registry entry."""
    path = Path(path)
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise DetpipeError(f"{path}: expected a mapping of params")
    for item in overrides:
        apply_override(data, item)
    _validate(data, SCHEMA, str(path))
    registry_path = Path(datasets) if datasets else path.parent / DATASETS_FILE.name
    data["data"] = load_dataset_entry(registry_path, data["dataset"])
    return Config(data)


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
    from detpipe import formats

    try:
        formats.loader(entry["format"])
    except DetpipeError as exc:  # unknown format (with a suggestion) or a broken plugin
        raise DetpipeError(f"{where}: {exc}") from None
    return entry


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
