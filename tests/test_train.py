"""The train stage's recipe and its resume after a crash, through the stage script as a user runs it."""

import csv
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from detpipe import engine
from detpipe.models import build_model
from tests.conftest import ROOT, run_stage, write_tiny_params


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    cwd = tmp_path_factory.mktemp("train")
    write_tiny_params(cwd)
    for stage in ("download", "convert"):
        result = run_stage(stage, cwd)
        assert result.returncode == 0, result.stderr
    return cwd


def copy(converted, dest) -> Path:
    shutil.copytree(converted, dest)
    return dest


def log_rows(cwd) -> list[dict]:
    """train_log.csv without the timing column (the only one that may differ between equal runs)."""
    with open(cwd / "runs/train/train_log.csv") as f:
        return [{k: v for k, v in row.items() if k != "train_img_per_s"} for row in csv.DictReader(f)]


def runs(cwd) -> list[tuple[str, str]]:
    with sqlite3.connect(cwd / "mlflow.db") as db:
        return db.execute("select run_uuid, status from runs").fetchall()


@pytest.mark.slow
def test_a_killed_training_resumes_and_ends_as_an_uninterrupted_one(converted, tmp_path):
    args = ("--set", "train.epochs=6")
    whole = copy(converted, tmp_path / "whole")
    assert run_stage("train", whole, *args).returncode == 0

    cut = copy(converted, tmp_path / "cut")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "stages/train.py"), *args], cwd=cut, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list(cut.glob(".detpipe/checkpoints/*/last.pt")) and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)  # mid-epoch 2, most likely; any point after epoch 1 proves the same
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and not (cut / "runs/train").exists()

    result = run_stage("train", cut, *args)
    assert result.returncode == 0, result.stderr
    [line] = [x for x in result.stderr.splitlines() if x.startswith("resuming from")]
    assert "/6 done, MLflow run" in line
    assert log_rows(cut) == log_rows(whole)
    ours, theirs = (torch.load(c / "runs/train/model.pt", weights_only=True)["model"] for c in (cut, whole))
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    drop_time = lambda c: (c / "runs/train/iter_log.csv").read_text()
    assert drop_time(cut) == drop_time(whole)
    [(run_id, status)] = runs(cut)
    assert status == "FINISHED"
    with sqlite3.connect(cut / "mlflow.db") as db:
        steps = [s for (s,) in db.execute("select step from metrics where key='val_bbox_mAP' order by step")]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert not list(cut.glob(".detpipe/checkpoints/*"))  # removed after success


@pytest.mark.slow
def test_a_checkpoint_of_other_inputs_is_never_resumed(converted, tmp_path):
    cwd = copy(converted, tmp_path / "p")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "stages/train.py"), "--set", "train.epochs=6"], cwd=cwd,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list(cwd.glob(".detpipe/checkpoints/*/last.pt")) and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    for other in (["--set", "train.epochs=6", "--set", "train.lr=0.01"], ["--set", "train.epochs=6",
                                                                          "--set", "train.resume=never"]):
        result = run_stage("train", cwd, *other)
        assert result.returncode == 0 and "resuming" not in result.stderr, result.stderr


@pytest.mark.slow
def test_best_checkpoint_and_early_stop(converted, tmp_path):
    cwd = copy(converted, tmp_path / "p")
    result = run_stage("train", cwd, "--set", "train.epochs=8", "--set", "train.best_metric=bbox_mAP50",
                       "--set", "train.early_stop=2", "--set", "train.val_interval=1")
    assert result.returncode == 0, result.stderr
    rows = log_rows(cwd)
    values = [float(r["val_bbox_mAP50"]) for r in rows]
    best = values.index(max(values))
    meta = torch.load(cwd / "runs/train/model.pt", weights_only=True)["meta"]
    assert meta["epoch"] == best + 1
    if len(rows) < 8:  # stopped early: the last two validations did not beat the best
        assert "early stop after epoch" in result.stderr and len(values) - 1 - best == 2
    last = torch.load(cwd / "runs/train/last.pt", weights_only=True)
    assert last["epoch"] == len(rows)


def test_validation_every_n_epochs_and_after_the_last(converted, tmp_path):
    cwd = copy(converted, tmp_path / "p")
    result = run_stage("train", cwd, "--set", "train.epochs=3", "--set", "train.val_interval=2")
    assert result.returncode == 0, result.stderr
    assert [r["val_bbox_mAP"] != "" for r in log_rows(cwd)] == [False, True, True]


def test_norm_and_bias_excluded_from_weight_decay():
    model = build_model("fcos", "resnet18", 3, min_size=64, max_size=64, fpn_channels=64)
    decay, no_decay = engine.parameter_groups(model, 1e-4, decay_norm_and_bias=False)
    assert decay["weight_decay"] == 1e-4 and no_decay["weight_decay"] == 0.0
    norm_types = (torch.nn.BatchNorm2d, torch.nn.GroupNorm)  # what this model's backbone and head use
    expected = {id(p) for m in model.modules() if isinstance(m, norm_types) for p in m.parameters()}
    expected |= {id(p) for n, p in model.named_parameters() if n.endswith(".bias")}
    assert {id(p) for p in no_decay["params"]} == expected and len(expected) > 0
    assert {id(p) for p in decay["params"]} == {id(p) for p in model.parameters()} - expected
    [everything] = engine.parameter_groups(model, 1e-4, decay_norm_and_bias=True)
    assert len(everything["params"]) == len(list(model.parameters()))


def test_optimizers_and_multistep_schedule():
    model = torch.nn.Linear(2, 2)
    assert isinstance(engine.build_optimizer(model, "adamw", lr=1e-3), torch.optim.AdamW)
    assert isinstance(engine.build_optimizer(model, "sgd", lr=1e-3), torch.optim.SGD)
    assert engine.lr_factor(9, 100, 10, "multistep", (20, 50)) == pytest.approx(0.001 + 0.999 * 0.9)
    assert [engine.lr_factor(i, 100, 10, "multistep", (20, 50)) for i in (19, 20, 50)] == \
        pytest.approx([1.0, 0.1, 0.01])
