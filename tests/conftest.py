"""Shared fixtures: a tiny params set and a tiny generated dataset, made fresh by each test that asks."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

TINY = {
    "experiment": "tiny",
    "model.fpn_channels": 64,
    "model.min_size": 64,
    "model.max_size": 64,
    "train.epochs": 1,
    "train.batch_size": 4,
    "train.warmup_iters": 2,
    "train.log_interval": 1,
    "report.num_samples": 2,
}
TINY_DATA = {"num_train": 8, "num_val": 4, "image_size": 64, "max_objects": 3}


def set_dotted(data: dict, key: str, value) -> None:
    *parents, leaf = key.split(".")
    for part in parents:
        data = data[part]
    data[leaf] = value


def write_tiny_params(folder: Path, **changes) -> Path:
    """Copy the repo's params into ``folder/params`` with tiny sizes (plus ``changes``, dotted keys)."""
    (folder / "params").mkdir(parents=True, exist_ok=True)
    params = yaml.safe_load((ROOT / "params/detpipe.yaml").read_text())
    for key, value in {**TINY, **changes}.items():
        set_dotted(params, key, value)
    datasets = yaml.safe_load((ROOT / "params/datasets.yaml").read_text())
    datasets["synthetic"]["generate"].update(TINY_DATA)
    (folder / "params/detpipe.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (folder / "params/datasets.yaml").write_text(yaml.safe_dump(datasets, sort_keys=False))
    return folder / "params/detpipe.yaml"


@pytest.fixture
def tiny_params(tmp_path) -> Path:
    return write_tiny_params(tmp_path)


def run_stage(name: str, cwd: Path, *args: str, env=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", **(env or {})}
    return subprocess.run([sys.executable, str(ROOT / "stages" / f"{name}.py"), *args], cwd=cwd,
                          capture_output=True, text=True, env=env)


@pytest.fixture(scope="session")
def tiny_coco(tmp_path_factory) -> Path:
    """A converted tiny synthetic dataset: ``root/raw`` (images) and ``root/coco`` (COCO files)."""
    from detpipe import synthetic
    from detpipe.conversion import convert_dataset
    from detpipe.files import content_hash

    root = tmp_path_factory.mktemp("tiny")
    synthetic.generate(root / "raw", seed=0, **TINY_DATA)
    convert_dataset("via", root / "raw", root / "coco", list(synthetic.CLASSES), min_box_size=2,
                    content_hash=content_hash(root / "raw"))
    return root


def copy_repo(dest: Path) -> Path:
    """The repo's tracked layout (no data, runs or stores), as a fresh git repo with one commit."""
    for name in ("detpipe", "stages", "params", "workflow", ".dvc", "tests"):
        shutil.copytree(ROOT / name, dest / name, ignore=shutil.ignore_patterns("__pycache__", "tmp", "cache"))
    for name in ("Snakefile", "dvc.yaml", ".dvcignore", ".gitignore", "pyproject.toml"):
        shutil.copy(ROOT / name, dest / name)
    return dest
