"""A pipeline killed mid-training resumes under both tools and ends with the uninterrupted run's results.

The whole Snakemake (or DVC) process group is killed with SIGKILL, as a power cut would; then Snakemake is
restarted as its messages ask after such a crash (``--unlock``, then ``--rerun-incomplete``) and DVC with a plain
``dvc repro``. The reference is the session's uninterrupted Snakemake run of the same tiny params.
"""

import csv
import io
import json
import os
import signal
import subprocess
import time

import pytest

from tests.conftest import BIN, GIT_ENV, copy_repo, sh, write_tiny_params

pytestmark = pytest.mark.slow

TIMING = ("train_img_per_s", "train/img_per_s", "train/seconds", "val/seconds")  # differ between equal runs


def train_log(text: str) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMING} for row in csv.DictReader(io.StringIO(text))]


def kill_during_training(repo, *cmd) -> None:
    """Start ``cmd`` in its own process group; SIGKILL the group once the first epoch's checkpoint exists."""
    env = {**os.environ, **GIT_ENV, "PATH": f"{BIN}:{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.Popen(cmd, cwd=repo, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 300
    while not list(repo.glob(".detpipe/checkpoints/*/last.pt")) and time.time() < deadline:
        assert proc.poll() is None, f"{cmd} ended before training made a checkpoint"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (repo / "runs/train/model.pt").exists()


def test_killed_training_resumes_under_snakemake_and_dvc(pipeline_repo, tmp_path):
    _, run = pipeline_repo  # what its uninterrupted run wrote, read before other tests touched it
    repo = copy_repo(tmp_path / "repo")
    write_tiny_params(repo, **{"train.epochs": 2})  # the session run's params
    sh(repo, "git", "init", "-q")
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "tiny")

    kill_during_training(repo, str(BIN / "snakemake"), "--cores", "1", "report")
    sh(repo, "snakemake", "--unlock")  # a killed Snakemake leaves its lock: its message asks for this
    out = sh(repo, "snakemake", "--cores", "1", "--rerun-incomplete", "report")
    assert "resuming from .detpipe/checkpoints/" in (repo / "logs/train.log").read_text(), out
    assert train_log((repo / "runs/train/train_log.csv").read_text()) == train_log(run["train_log"])
    assert json.loads((repo / "runs/eval/metrics.json").read_text()) == run["metrics"]

    kill_during_training(repo, str(BIN / "dvc"), "repro")
    out = sh(repo, "dvc", "repro")
    assert "resuming from .detpipe/checkpoints/" in out
    assert train_log((repo / "runs/train/train_log.csv").read_text()) == train_log(run["train_log"])
    assert json.loads((repo / "runs/eval/metrics.json").read_text()) == run["metrics"]
    assert not list(repo.glob(".detpipe/checkpoints/*"))
