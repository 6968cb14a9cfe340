"""Shared fixtures: a tiny params set and a tiny generated dataset, made fresh by each test that asks."""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
from functools import partial
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

TINY = {
    "experiment": "tiny",
    "device": "cpu",  # a GPU runner must not change the exact comparisons
    "model.fpn_channels": 64,
    "model.min_size": 64,
    "model.max_size": 64,
    "train.epochs": 1,
    "train.batch_size": 4,
    "train.warmup_iters": 2,
    "train.log_interval": 1,
    "train.val_interval": 1,
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


def repo_param(section: str, key: str):
    """A value of the repository's params/detpipe.yaml (tiny params keep what TINY does not set)."""
    return yaml.safe_load((ROOT / "params/detpipe.yaml").read_text())[section][key]


def default_lr() -> str:
    """The repository's ``train.lr`` as MLflow records it."""
    return str(float(repo_param("train", "lr")))


@pytest.fixture(scope="module")
def one_torch_thread():
    """In-process training on the two shared cores: one torch thread runs many times faster than two."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny_params(tmp_path) -> Path:
    return write_tiny_params(tmp_path)


def without_detpipe(folder: Path, model, inputs: dict, code: str):
    """What ``code`` prints (JSON) in a fresh Python where detpipe cannot be imported, given ``m``: ``model`` pickled
    as MLflow pickles it (cloudpickle), and ``io``: ``inputs`` saved with torch.save."""
    import cloudpickle
    import torch

    (folder / "model.pkl").write_bytes(cloudpickle.dumps(model))
    torch.save(inputs, folder / "io.pt")
    code = ("import json, pickle, sys, torch; sys.modules['detpipe'] = None; "
            "m = pickle.loads(open('model.pkl', 'rb').read()); io = torch.load('io.pt'); " + code)
    done = subprocess.run([sys.executable, "-c", code], cwd=folder, capture_output=True, text=True, timeout=120,
                          env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


def run_stage(name: str, cwd: Path, *args: str, env=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", **(env or {})}
    return subprocess.run([sys.executable, str(ROOT / "stages" / f"{name}.py"), *args], cwd=cwd,
                          capture_output=True, text=True, env=env, timeout=900)  # a hang fails, not stalls


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


def tree_hashes(repo: Path, paths: list[str]) -> dict[str, str]:
    """sha256 of every file in ``paths`` (files or folders, links followed), by path in ``repo``."""
    hashes = {}
    for rel in paths:
        top = repo / rel
        for path in [top] if top.is_file() else sorted(p for p in top.rglob("*") if p.is_file()):
            hashes[path.relative_to(repo).as_posix()] = hashlib.sha256(path.read_bytes()).hexdigest()
    return hashes


GIT_ENV = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}


def sh(cwd, *cmd, check=True, stdout_only=False, env=None):
    env = {**os.environ, **GIT_ENV, "PATH": f"{BIN}:{os.environ['PATH']}", **(env or {})}
    env.pop("MLFLOW_TRACKING_URI", None)
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env)
    if check and result.returncode:
        raise AssertionError(f"{' '.join(map(str, cmd))} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result.stdout if stdout_only else result.stdout + result.stderr


@pytest.fixture(scope="session")
def pipeline_repo(tmp_path_factory):
    """A fresh copy of the repo (tiny params, 2 epochs, git-committed) where ``snakemake --cores 1 report`` ran once.

    Returns ``(repo, run)``: ``run`` holds what that run wrote (metrics, MLflow run id), read before any test can
    change the folder.
    """
    repo = copy_repo(tmp_path_factory.mktemp("pipeline"))
    write_tiny_params(repo, **{"train.epochs": 2})
    sh(repo, "git", "init", "-q")
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "tiny")
    sh(repo, "snakemake", "--cores", "1", "report")
    run = {"metrics": json.loads((repo / "runs/eval/metrics.json").read_text()),
           "run_id": json.loads((repo / "runs/train/run.json").read_text())["run_id"],
           "train_log": (repo / "runs/train/train_log.csv").read_text()}
    return repo, run


@pytest.fixture(scope="session")
def converted(tmp_path_factory) -> Path:
    """A tiny project where download and convert have run: train could start from here. Tests that write in a
    project copy this one first (``shutil.copytree``); runs with bad params may use it as it is."""
    cwd = tmp_path_factory.mktemp("converted")
    write_tiny_params(cwd)
    for stage in ("download", "convert"):
        result = run_stage(stage, cwd)
        assert result.returncode == 0, result.stderr
    return cwd


@contextlib.contextmanager
def serve_folder(root: Path):
    """An HTTP server on 127.0.0.1 for the files in ``root``: yields ``(base_url, server)``; stopped afterwards."""
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", server
    finally:
        server.shutdown()
        server.server_close()
