"""Distributed data parallel on the CPU (gloo): the same gradients as one process, and one run, one model."""

import sqlite3
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from detpipe.models import build_model
from tests.conftest import ROOT, run_stage, write_tiny_params

WORLD = 2


def shards():
    """One global batch of 4 images, split in two: what each of two processes sees of it."""
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 64, 64, generator=g) for _ in range(4)]
    targets = [{"boxes": torch.tensor([[4.0 + 3 * i, 6.0, 40.0, 44.0 + i]]), "labels": torch.tensor([1 + i % 2])}
               for i in range(4)]
    return [(images[r * 2:(r + 1) * 2], targets[r * 2:(r + 1) * 2]) for r in range(WORLD)]


def tiny():
    torch.manual_seed(0)
    return build_model("fcos", "resnet18", 3, min_size=64, max_size=64, fpn_channels=64).train()


def worker(rank: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    model = torch.nn.parallel.DistributedDataParallel(tiny())
    images, targets = shards()[rank]
    sum(model(images, targets).values()).backward()
    torch.save({n: p.grad for n, p in model.module.named_parameters() if p.grad is not None}, f"{out}.{rank}")
    dist.destroy_process_group()


def test_ddp_gradients_are_the_mean_of_each_shards_gradients(tmp_path):
    """DDP averages the processes' gradients: one process computing each shard's gradient and averaging them gets
    the same numbers. (Detection losses are normalised per shard, e.g. by its positives, so this is not the
    gradient of one loss over the 4 images at once; it is what DistributedDataParallel promises.)"""
    # The two processes are spawned from a child interpreter with a time limit: a hung rendezvous fails the test
    # instead of stalling the suite.
    spawn = (f"import torch.multiprocessing as mp; from tests.test_distributed import worker; "
             f"mp.spawn(worker, args=({str(tmp_path / 'store')!r}, {str(tmp_path / 'grads')!r}), nprocs={WORLD})")
    subprocess.run([sys.executable, "-c", spawn], cwd=ROOT, check=True, timeout=300)
    torch.set_num_threads(1)
    ddp = [torch.load(tmp_path / f"grads.{r}", weights_only=True) for r in range(WORLD)]
    model = tiny()
    reference = {}
    for images, targets in shards():
        model.zero_grad()
        sum(model(images, targets).values()).backward()
        for n, p in model.named_parameters():
            if p.grad is not None:
                reference[n] = reference.get(n, 0) + p.grad / WORLD
    assert set(ddp[0]) == set(reference) and len(reference) > 50
    for name, grad in reference.items():
        assert torch.equal(ddp[0][name], ddp[1][name]), name  # every process holds the same averaged gradient
        assert torch.allclose(ddp[0][name], grad, rtol=1e-4, atol=1e-6), name


@pytest.mark.slow
def test_train_stage_in_two_processes_makes_one_run_and_one_model(tmp_path):
    write_tiny_params(tmp_path)
    for stage in ("download", "convert"):
        assert run_stage(stage, tmp_path).returncode == 0
    result = run_stage("train", tmp_path, "--set", "train.processes=2", "--set", "train.epochs=2",
                       "--set", "threads=1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "runs/train/model.pt").is_file()
    assert len((tmp_path / "runs/train/train_log.csv").read_text().splitlines()) == 1 + 2
    with sqlite3.connect(tmp_path / "mlflow.db") as db:
        [(run_id, status)] = db.execute("select run_uuid, status from runs").fetchall()
        tags = dict(db.execute("select key, value from tags where run_uuid=?", (run_id,)))
    assert status == "FINISHED" and tags["processes"] == "2"
    assert result.stderr.count("epoch 2/2 done") == 1  # rank 0 reports; the other process is quiet
    bad = run_stage("train", tmp_path, "--set", "train.processes=2", "--set", "train.batch_size=3")
    assert bad.returncode != 0 and "train.batch_size 3 does not split over 2 processes" in bad.stderr
