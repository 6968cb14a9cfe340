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

from detpipe import config, engine, train
from detpipe.files import tree_hash
from detpipe.models import build_model
from tests.conftest import ROOT, run_stage

TIMING = ("train_img_per_s", "train/img_per_s", "train/seconds", "val/seconds")  # differ between equal runs


def copy(converted, dest) -> Path:
    shutil.copytree(converted, dest)
    return dest


def log_rows(cwd) -> list[dict]:
    """train_log.csv without the timing columns (the only ones that may differ between equal runs)."""
    with open(cwd / "runs/train/train_log.csv") as f:
        return [{k: v for k, v in row.items() if k not in TIMING} for row in csv.DictReader(f)]


def runs(cwd) -> list[tuple[str, str]]:
    with sqlite3.connect(cwd / "mlflow.db") as db:
        return db.execute("select run_uuid, status from runs").fetchall()


@pytest.mark.slow
def test_a_killed_training_resumes_and_ends_as_an_uninterrupted_one(converted, tmp_path):
    args = ("--set", "train.epochs=6", "--set", "train.val_interval=1")
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
        steps = [s for (s,) in db.execute("select step from metrics where key='val/bbox_mAP' order by step")]
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


def test_the_resume_key_follows_the_converted_data_and_the_params(converted, tmp_path):
    cfg = config.load(ROOT / "params/detpipe.yaml")
    data = converted / "data/coco"
    key = train.resume_key(cfg, tree_hash(data))
    assert key == train.resume_key(config.load(ROOT / "params/detpipe.yaml", ["train.log_interval=3"]),
                                   tree_hash(data))  # logging is not an input of the weights
    assert key != train.resume_key(config.load(ROOT / "params/detpipe.yaml", ["train.lr=0.5"]), tree_hash(data))
    changed = tmp_path / "coco"
    shutil.copytree(data, changed)
    (changed / "val.json").write_text((data / "val.json").read_text() + " ")  # the same data, other bytes
    assert key != train.resume_key(cfg, tree_hash(changed))


def test_the_resume_key_of_a_script_piped_to_python(monkeypatch):
    """``python - < script.py``: __main__'s file is "<stdin>", which has no code to hash (was FileNotFoundError)."""
    import types

    cfg = config.load(ROOT / "params/detpipe.yaml")
    monkeypatch.setitem(sys.modules, "__main__", types.SimpleNamespace(__file__="<stdin>"))
    key = train.resume_key(cfg, "data")
    assert train.resume_key(cfg, "data") == key != train.resume_key(cfg, "other data")


@pytest.mark.slow
def test_best_checkpoint_and_early_stop(converted, tmp_path):
    cwd = copy(converted, tmp_path / "p")
    result = run_stage("train", cwd, "--set", "train.epochs=8", "--set", "train.best_metric=bbox_mAP_50",
                       "--set", "train.early_stop=2", "--set", "train.val_interval=1")
    assert result.returncode == 0, result.stderr
    rows = log_rows(cwd)
    values = [float(r["val/bbox_mAP_50"]) for r in rows]
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
    assert [r["val/bbox_mAP"] != "" for r in log_rows(cwd)] == [False, True, True]


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


def white_square_image(size=64, box=(10, 12, 30, 28)):
    image = torch.zeros(3, size, size, dtype=torch.uint8)
    x1, y1, x2, y2 = box
    image[:, y1:y2, x1:x2] = 255
    masks = (image[:1] > 0).to(torch.uint8)
    return image, {"boxes": torch.tensor([list(map(float, box))]), "labels": torch.tensor([1]), "masks": masks}


def drawn_box(image) -> list[int]:
    ys, xs = torch.nonzero(image[0] > 127, as_tuple=True)
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


@pytest.mark.parametrize("factor", [0.5, 0.75, 1.5, 2.0])
def test_random_scale_moves_boxes_and_masks_with_the_pixels(factor):
    from detpipe.transforms import RandomScale

    image, target = white_square_image(box=(24, 26, 40, 38))  # central: some of it stays in any crop
    for seed in range(5):
        out, t = RandomScale(factor, factor, seed=seed)(image, target)
        assert out.shape == image.shape and out.dtype == torch.uint8
        box = t["boxes"][0].tolist()
        assert drawn_box(out) == pytest.approx(box, abs=1.0)  # the box is where the square's pixels went
        assert drawn_box(t["masks"][:1].expand(3, -1, -1) * 255) == pytest.approx(box, abs=1.0)
        if factor < 1:  # padded, never cropped: the whole square, scaled
            assert (box[2] - box[0], box[3] - box[1]) == pytest.approx((16 * factor, 12 * factor), abs=1.0)


def test_random_scale_is_seeded_drops_boxes_cropped_away_and_is_off_at_one():
    from detpipe.transforms import RandomScale

    image, target = white_square_image(box=(0, 0, 20, 20))
    noise = torch.randint(0, 256, image.shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    runs = [RandomScale(1.2, 3.0, seed=s)(noise, target)[0] for s in (5, 5, 6)]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
    kept = [RandomScale(3.0, 3.0, seed=s)(image, target)[1] for s in range(20)]
    assert {len(t["boxes"]) for t in kept} == {0, 1}  # a corner box survives some crops, not others
    assert all(len(t["labels"]) == len(t["boxes"]) == len(t["masks"]) for t in kept)
    off = RandomScale(1.0, 1.0, seed=0)
    before = off.generator.get_state()
    assert off(image, target)[0] is image and torch.equal(off.generator.get_state(), before)


def test_grouped_batches_keep_orientations_apart_and_cover_every_image():
    groups = [0, 1, 1, 0, 1, 0, 0, 1, 1, 1, 0]
    sampler = engine.GroupedBatchSampler(range(len(groups)), groups, batch_size=3)
    batches = list(sampler)
    assert sorted(i for b in batches for i in b) == list(range(len(groups))) and len(batches) == len(sampler)
    full = [b for b in batches if len({groups[i] for i in b}) == 1 and len(b) == 3]
    assert len(full) == 3  # six of group 1 make two batches, five of group 0 make one; the rest are joined


def test_scale_range_is_validated(tiny_params):
    from detpipe import config
    from detpipe.errors import DetpipeError

    assert config.load(tiny_params, ["train.scale_range=[0.5, 2]"]).train.scale_range == [0.5, 2.0]
    for bad in ("[2, 1]", "[0, 1]", "[1]", "[a, 1]"):
        with pytest.raises(DetpipeError, match="train.scale_range must be"):
            config.load(tiny_params, [f"train.scale_range={bad}"])


def test_random_scale_keeps_an_empty_target_empty():
    from detpipe.transforms import RandomScale

    image = torch.zeros(3, 20, 30, dtype=torch.uint8)
    target = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
              "masks": torch.zeros(0, 20, 30, dtype=torch.uint8)}
    out, t = RandomScale(0.5, 1.5, seed=0)(image, target)
    assert out.shape == image.shape and t["masks"].shape == (0, 20, 30) and len(t["boxes"]) == 0


def test_each_random_transform_gets_its_own_stream_when_reseeded():
    from detpipe.transforms import train_transforms

    transforms = train_transforms(0.5, 1, (0.5, 1.5))
    transforms.reseed(7)
    flip, scale = (t.generator.initial_seed() for t in transforms.transforms)
    assert flip != scale


def test_early_stop_needs_a_metric_to_watch(tiny_params):
    from detpipe import config
    from detpipe.errors import DetpipeError

    with pytest.raises(DetpipeError, match="train.early_stop needs a train.best_metric"):
        config.load(tiny_params, ["train.early_stop=2"])


@pytest.mark.slow
@pytest.mark.parametrize("mask_targets", ["cropped", "full"])
def test_the_train_stage_trains_a_mask_model_on_either_mask_targets(converted, tmp_path, mask_targets):
    """Through the stage script: Mask R-CNN on masks cut to the objects (the default) or image-sized ones, scored in
    segm at validation, with the choice among the run's MLflow params."""
    cwd = copy(converted, tmp_path / "p")
    result = run_stage("train", cwd, "--set", "model.name=maskrcnn", "--set", "train.epochs=1",
                       "--set", f"train.mask_targets={mask_targets}")
    assert result.returncode == 0, result.stderr
    assert log_rows(cwd)[0]["val/segm_mAP_50"] != ""
    with sqlite3.connect(cwd / "mlflow.db") as db:
        logged = dict(db.execute("select key, value from params where key like 'train.mask%'").fetchall())
    assert logged == {"train.mask_targets": mask_targets}
