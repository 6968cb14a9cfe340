"""The bad-input contract at the stage level: one line, exit status 2, nothing half-written, no MLflow clutter."""

import hashlib
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, run_stage, write_tiny_params
from tests.test_stages import assert_one_line_error


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (hidden ones too) with its hash: equal snapshots mean nothing was touched."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()} if folder.exists() else {}


def mlflow_runs(cwd: Path) -> list[tuple[str, str]]:
    if not (cwd / "mlflow.db").exists():
        return []
    with sqlite3.connect(cwd / "mlflow.db") as db:
        return db.execute("select run_uuid, status from runs").fetchall()


@pytest.mark.parametrize("override, fragments", [
    ("train.lr=[0.1", ("--set train.lr", "not valid YAML")),
    ("train.batch_size=0", ("train.batch_size must be at least 1, got 0",)),
    ("train.epochs=0", ("train.epochs must be at least 1, got 0",)),
    ("train.lr=-0.5", ("train.lr must be more than 0, got -0.5",)),
    ("train.lr=fast", ("train.lr must be a number, got 'fast'",)),
    ("train.lr=.nan", ("train.lr must be a finite number",)),
    ("train.hflip=1.5", ("train.hflip must be at most 1, got 1.5",)),
    ("train.epochs=2.5", ("train.epochs must be an integer, got 2.5",)),
    ("threads=-1", ("threads must be at least 0, got -1",)),
    ("model.max_size=32", ("model.max_size (32) is less than model.min_size (64)",)),
    ("model.pyramid_levels=5", ("model.pyramid_levels 5 needs model.backbone_stages >= 4: backbone_stages 2 builds P3 "
                                "only, 1 level",)),
])
def test_bad_params_end_before_an_mlflow_run_is_opened(converted, override, fragments):
    result = run_stage("train", converted, "--set", override)
    assert_one_line_error(result, "params/detpipe.yaml" if "YAML" not in fragments[-1] else "", *fragments)
    assert mlflow_runs(converted) == [] and not (converted / "runs").exists()


def test_bad_params_are_refused_by_every_stage(converted):
    for stage in ("download", "convert", "evaluate", "report"):
        assert_one_line_error(run_stage(stage, converted, "--set", "evaluate.batch_size=0"),
                              "evaluate.batch_size must be at least 1")


def test_non_finite_loss_names_the_iteration_and_leaves_no_output(converted, tmp_path):
    cwd = tmp_path / "nan"
    shutil.copytree(converted, cwd)
    result = run_stage("train", cwd, "--set", "train.lr=1e30", "--set", "train.epochs=5")
    assert_one_line_error(result, "train: loss is", "at iteration", "try a lower train.lr")
    assert not (cwd / "runs/train").exists() and not list((cwd / "runs").glob(".*"))
    assert [status for _, status in mlflow_runs(cwd)] == ["FAILED"]  # the run that did start says it failed


def test_a_killed_download_leaves_nothing_a_rerun_trips_over(tmp_path):
    """SIGKILL mid-stage: the temporary folder stays (nothing can remove it), and the next run clears it."""
    cwd = tmp_path
    params = write_tiny_params(cwd)
    registry = params.parent / "datasets.yaml"
    registry.write_text(registry.read_text().replace("num_train: 8", "num_train: 4000"))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "stages/download.py")], cwd=cwd, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while not list((cwd / "data").glob(".raw.*.tmp/train/*.jpg")) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list((cwd / "data").glob(".raw.*.tmp")), "the stage was killed before it made its temporary folder"
    registry.write_text(registry.read_text().replace("num_train: 4000", "num_train: 8"))
    result = run_stage("download", cwd)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (cwd / "data").iterdir()) == ["raw"]
    assert len(list((cwd / "data/raw/train").glob("*.jpg"))) == 8


@pytest.fixture(scope="module")
def trained(converted, tmp_path_factory) -> Path:
    cwd = tmp_path_factory.mktemp("trained") / "p"
    shutil.copytree(converted, cwd)
    for stage in ("train", "evaluate", "report"):
        result = run_stage(stage, cwd)
        assert result.returncode == 0, result.stderr
    return cwd


def corrupt_model(cwd):
    data = (cwd / "runs/train/model.pt").read_bytes()
    (cwd / "runs/train/model.pt").write_bytes(data[: len(data) // 2])


CASES = {
    "run.json malformed": (lambda cwd: (cwd / "runs/train/run.json").write_text("{\"run_id\": "),
                           "runs/train/run.json:1: malformed JSON in training run record"),
    "run.json without run_id": (lambda cwd: (cwd / "runs/train/run.json").write_text("{}"),
                                "runs/train/run.json: training run record has no key 'run_id'"),
    "model.pt corrupt": (corrupt_model, "runs/train/model.pt: not a readable detpipe checkpoint"),
    "model.pt missing": (lambda cwd: (cwd / "runs/train/model.pt").unlink(),
                         "runs/train/model.pt: checkpoint is missing"),
    "store without the run": (lambda cwd: (cwd / "mlflow.db").unlink(), "is not in the store"),
    "metrics.json malformed": (lambda cwd: (cwd / "runs/eval/metrics.json").write_text("[1, 2"),
                               "runs/eval/metrics.json:1: malformed JSON in evaluation metrics"),
    "predictions.json missing": (lambda cwd: (cwd / "runs/eval/predictions.json").unlink(),
                                 "runs/eval/predictions.json: predictions is missing"),
    "train_log.csv missing": (lambda cwd: (cwd / "runs/train/train_log.csv").unlink(),
                              "runs/train/train_log.csv: training log is missing"),
    "eval run unknown": (lambda cwd: (cwd / "runs/eval/run.json").write_text('{"run_id": "%s"}' % ("0" * 32)),
                         "runs/eval/run.json: MLflow run 00000000000000000000000000000000 is not in the store"),
    "config.yaml malformed": (lambda cwd: (cwd / "runs/train/config.yaml").write_text("model: [fcos\n"),
                              "runs/train/config.yaml:2: malformed YAML in training config"),
}
EVALUATE_CASES = ["run.json malformed", "run.json without run_id", "model.pt corrupt", "model.pt missing",
                  "store without the run"]
REPORT_CASES = ["run.json malformed", "run.json without run_id", "store without the run", "metrics.json malformed",
                "predictions.json missing", "train_log.csv missing", "config.yaml malformed", "eval run unknown"]


@pytest.mark.slow
@pytest.mark.parametrize("stage, case", [("evaluate", c) for c in EVALUATE_CASES] +
                         [("report", c) for c in REPORT_CASES])
def test_bad_upstream_files_leave_earlier_outputs_untouched(trained, tmp_path, stage, case):
    cwd = tmp_path / "p"
    shutil.copytree(trained, cwd)
    damage, message = CASES[case]
    damage(cwd)
    before = {"runs/eval": snapshot(cwd / "runs/eval"), "reports": snapshot(cwd / "reports")}
    runs_before = mlflow_runs(cwd)
    assert_one_line_error(run_stage(stage, cwd), message)
    assert {"runs/eval": snapshot(cwd / "runs/eval"), "reports": snapshot(cwd / "reports")} == before
    assert mlflow_runs(cwd) == runs_before


def test_a_terminated_train_removes_its_temporary_output_and_marks_the_run_killed(converted, tmp_path):
    """SIGTERM, as a cancelled Snakemake or DVC job gets, unwinds like Ctrl-C."""
    cwd = tmp_path / "term"
    shutil.copytree(converted, cwd)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "stages/train.py"), "--set", "train.epochs=50"], cwd=cwd,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list((cwd / "runs").glob(".train.*.tmp/iter_log.csv")) and time.time() < deadline:
        time.sleep(0.1)
    assert proc.poll() is None, f"train ended before the signal: {proc.communicate()[1][-3000:]}"
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, f"exit {proc.returncode} after SIGTERM: {stderr[-3000:]}"
    assert stderr.strip().splitlines()[-1] == "error: interrupted; no output was written"
    assert not (cwd / "runs").exists() or list((cwd / "runs").iterdir()) == []
    assert [status for _, status in mlflow_runs(cwd)] == ["KILLED"]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the lost KeyboardInterrupt
@pytest.mark.parametrize("output", ["file", "folder"])
def test_a_sigterm_lost_in_a_finaliser_puts_no_output_in_place(tmp_path, capsys, output):
    """Python reports and ignores an exception raised inside a finaliser (``__del__``, a weakref callback): a
    SIGTERM handled there would be lost, and the stage would run to its end with exit 0. Its mark stops the
    stage before the output replaces its destination; afterwards SIGTERM and the mark are as they were."""
    from detpipe import cli, errors, files

    before = signal.getsignal(signal.SIGTERM)

    class Finalised:
        def __del__(self):
            errors.terminate()  # as if the signal arrived while this ran

    def stage():
        Finalised()  # "Exception ignored in ...": the KeyboardInterrupt is lost here
        if output == "file":
            files.write_text(tmp_path / "out" / "result.txt", "done")
        else:
            with files.atomic_dir(tmp_path / "out") as tmp:
                (tmp / "result.txt").write_text("done")

    (tmp_path / "out").mkdir()
    with pytest.raises(SystemExit) as exited:
        cli.main(stage)
    assert exited.value.code == 130 and "error: interrupted; no output was written" in capsys.readouterr().err
    assert list((tmp_path / "out").iterdir()) == [] and [p.name for p in tmp_path.iterdir()] == ["out"]
    assert signal.getsignal(signal.SIGTERM) is before and not errors._terminated


def test_the_training_prediction_and_inference_loops_stop_at_their_next_step_after_a_lost_sigterm(monkeypatch):
    import torch

    from detpipe import engine, errors
    from detpipe.models import build_model

    class Images(torch.utils.data.Dataset):
        images, cat_ids = [{"id": i, "file_name": f"{i}.png", "width": 64, "height": 64} for i in range(2)], [1, 2]
        coco_file = "val.json"

        def __len__(self):
            return 2

        def __getitem__(self, i):
            return torch.rand(3, 64, 64), {"boxes": torch.tensor([[4.0, 4.0, 30.0, 30.0]]),
                                           "labels": torch.tensor([1]), "image_id": i}

    model = build_model("fcos", "resnet10", 2, min_size=64, max_size=64, fpn_channels=64)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: 1.0)
    loader = torch.utils.data.DataLoader(Images(), batch_size=1, collate_fn=engine.collate)
    before = [p.detach().clone() for p in model.parameters()]
    monkeypatch.setattr(errors, "_terminated", True)
    with pytest.raises(KeyboardInterrupt):
        engine.train_one_epoch(model, optimizer, scheduler, loader, torch.device("cpu"), 1)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # stopped before its first step
    with pytest.raises(KeyboardInterrupt):
        engine.predict(model, Images(), torch.device("cpu"), batch_size=1)
    from detpipe import infer

    with pytest.raises(KeyboardInterrupt):  # the inference stage's images and video frames
        next(infer._batches(range(5), 2))


@pytest.mark.slow
def test_a_failure_while_logging_the_evaluation_leaves_the_earlier_outputs_whole(trained, tmp_path, monkeypatch):
    """The evaluate stage's folder is replaced whole or not at all: MLflow failing at the last step (the
    artifacts) leaves every earlier file, run.json included, and no temporary folder."""
    from detpipe import config, evaluate, tracking

    cwd = tmp_path / "p"
    shutil.copytree(trained, cwd)
    monkeypatch.chdir(cwd)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    before, runs_before = snapshot(cwd / "runs/eval"), mlflow_runs(cwd)

    def fail(self, folder):
        raise OSError("the artifact store is full")

    monkeypatch.setattr(tracking.Run, "log_artifacts", fail)
    cfg = config.load(Path("params/detpipe.yaml"), ["evaluate.score_thr=0.3"])
    with pytest.raises(OSError, match="artifact store is full"):
        evaluate.run(cfg, Path("data/coco"), Path("data/raw"), Path("runs/train"), Path("runs/eval"))
    assert snapshot(cwd / "runs/eval") == before
    assert sorted(p.name for p in (cwd / "runs").iterdir()) == ["eval", "train"]  # no temporary folder left
    new_runs = set(mlflow_runs(cwd)) - set(runs_before)
    assert [status for _, status in new_runs] == ["FAILED"]


@pytest.mark.slow
def test_evaluate_scores_any_checkpoint_on_any_split_without_mlflow(trained, tmp_path):
    """The tutorial's tools/test.py: a model.pt from anywhere, scored on a chosen split, logged nowhere."""
    import json

    import torch

    cwd = tmp_path / "p"
    shutil.copytree(trained, cwd)
    ckpt = torch.load(cwd / "runs/train/model.pt", weights_only=True)
    torch.save(ckpt, tmp_path / "elsewhere.pt")
    with sqlite3.connect(cwd / "mlflow.db") as db:
        before = db.execute("select count(*) from metrics").fetchone()
    result = run_stage("evaluate", cwd, "--checkpoint", str(tmp_path / "elsewhere.pt"), "--split", "train",
                       "--out", "scored")
    assert result.returncode == 0, result.stderr
    metrics = json.loads((cwd / "scored/metrics.json").read_text())
    assert metrics["num_images"] == 8 and "bbox_mAP" in metrics  # the tiny train split
    assert result.stderr.splitlines()[-1] == (f"evaluate -> scored: bbox mAP {metrics['bbox_mAP']:.4f}, mAP@0.5 "
                                              f"{metrics['bbox_mAP_50']:.4f} (8 train images, "
                                              f"{metrics['num_detections']} detections)")
    with sqlite3.connect(cwd / "mlflow.db") as db:
        assert db.execute("select count(*) from metrics").fetchone() == before
    ckpt["meta"]["classes"] = ["a", "b", "c", "d"]
    torch.save(ckpt, tmp_path / "other_classes.pt")
    assert_one_line_error(run_stage("evaluate", cwd, "--checkpoint", str(tmp_path / "other_classes.pt"),
                                    "--out", "x"), "differ from the model's", "other_classes.pt")
    assert not (cwd / "x").exists()
    # scored into the logged evaluation's folder: its run.json goes with the rest, or the report would name an
    # MLflow evaluation that did not make these numbers
    result = run_stage("evaluate", cwd, "--checkpoint", str(tmp_path / "elsewhere.pt"), "--split", "train")
    assert result.returncode == 0, result.stderr
    assert json.loads((cwd / "runs/eval/metrics.json").read_text()) == metrics
    assert not (cwd / "runs/eval/run.json").exists()
    # the folder is replaced whole, so one that holds an input or someone else's files is refused
    (cwd / "notes").mkdir()
    (cwd / "notes/todo.txt").write_text("mine")
    before = snapshot(cwd)
    for out, fragment in ((".", "would replace the working directory"), ("runs", "would replace the model"),
                          ("runs/train", "would replace the model"), ("data", "would replace the data"),
                          ("notes", "notes: exists and is not an earlier evaluate output (no metrics.json)")):
        assert_one_line_error(run_stage("evaluate", cwd, "--out", out), fragment)
    assert snapshot(cwd) == before


def test_evaluate_refuses_broken_weights_and_images_of_another_size(trained, tmp_path):
    """Weights that give NaN boxes (good scores: NaN scores never pass the model's own threshold) and a COCO file
    whose image size is wrong: one line, exit 2, no output folder."""
    import json

    import torch

    cwd = tmp_path / "p"
    shutil.copytree(trained, cwd)
    ckpt = torch.load(cwd / "runs/train/model.pt", weights_only=True)
    ckpt["model"] = {k: v.fill_(float("nan")) if "bbox_reg" in k else v for k, v in ckpt["model"].items()}
    torch.save(ckpt, tmp_path / "nan.pt")
    assert_one_line_error(run_stage("evaluate", cwd, "--checkpoint", str(tmp_path / "nan.pt"), "--out", "x"),
                          "the model's boxes or scores are NaN or infinite")
    val = cwd / "data/coco/val.json"
    coco = json.loads(val.read_text())
    coco["images"][0]["width"] += 8
    val.write_text(json.dumps(coco))
    assert_one_line_error(run_stage("evaluate", cwd, "--out", "y"), f"{Path('data/coco/val.json')}: ",
                          coco["images"][0]["file_name"], "run the convert stage again")
    assert not (cwd / "x").exists() and not (cwd / "y").exists() and not list(cwd.glob(".*tmp*"))
