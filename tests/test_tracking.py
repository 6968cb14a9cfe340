"""MLflow lineage that never lies: a training run, a new child run per evaluation and per report, the model logged
so that it loads from MLflow alone, how each run was launched, and ``python -m detpipe.compare`` over a real store."""

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from detpipe import compare, config, tracking
from detpipe.errors import DetpipeError
from detpipe.files import tree_hash
from tests.conftest import BIN, ROOT, copy_repo, default_lr, repo_param, run_stage, sh, write_tiny_params


def client(cwd: Path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{cwd / 'mlflow.db'}")


def record(cwd: Path, run_id: str) -> dict:
    """Everything a run shows: params, tags, status and every metric value with its step."""
    c = client(cwd)
    run = c.get_run(run_id)
    history = {k: [(m.step, m.value) for m in c.get_metric_history(run_id, k)] for k in run.data.metrics}
    return {"params": run.data.params, "tags": run.data.tags, "status": run.info.status, "metrics": history}


def artifacts(c: MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    found = set()
    for item in c.list_artifacts(run_id, path):
        found |= artifacts(c, run_id, item.path) if item.is_dir else {item.path}
    return found


@pytest.fixture(scope="module")
def project(converted, tmp_path_factory):
    """train -> evaluate -> evaluate with evaluate.score_thr=0.3 -> report -> train with lr 0.01 -> evaluate; what
    each step wrote is recorded as it happened (later steps overwrite runs/)."""
    cwd = tmp_path_factory.mktemp("lineage") / "p"
    shutil.copytree(converted, cwd)
    seen = {}

    def stage(name, *args):
        result = run_stage(name, cwd, *args)
        assert result.returncode == 0, result.stderr

    def evaluated(key):
        seen[key] = json.loads((cwd / "runs/eval/run.json").read_text())["run_id"]
        seen[f"{key}_metrics"] = json.loads((cwd / "runs/eval/metrics.json").read_text())
        seen[f"{key}_files"] = {p.relative_to(cwd / "runs/eval").as_posix()
                                for p in (cwd / "runs/eval").rglob("*") if p.is_file()}

    stage("train")
    seen["train_json"] = json.loads((cwd / "runs/train/run.json").read_text())
    seen["train"] = seen["train_json"]["run_id"]
    seen["train_columns"] = (cwd / "runs/train/train_log.csv").read_text().splitlines()[0].split(",")
    seen["train_before"] = record(cwd, seen["train"])
    stage("evaluate")
    evaluated("eval1")
    stage("evaluate", "--set", "evaluate.score_thr=0.3")
    evaluated("eval2")
    stage("report", "--set", "evaluate.score_thr=0.3")
    seen["report_html"] = (cwd / "reports/index.html").read_text()
    shutil.copytree(cwd / "runs/train", cwd / "first_train")  # its model.pt, for the MLflow model test
    stage("train", "--set", "train.lr=0.01")
    seen["train_b"] = json.loads((cwd / "runs/train/run.json").read_text())["run_id"]
    stage("evaluate")
    evaluated("eval_b")
    return cwd, seen


def test_training_run_holds_curated_params_tags_and_named_curves(project):
    cwd, seen = project
    run = record(cwd, seen["train"])
    params, tags = run["params"], run["tags"]
    assert params["train.lr"] == default_lr() and params["model.name"] == "fcos" and params["dataset"] == "synthetic"
    assert {"seed", "preset", "train.epochs", "train.batch_size", "model.backbone"} <= set(params)
    assert not {"train.num_workers", "train.log_interval", "train.resume", "device", "threads"} & set(params)
    assert not any(k.startswith(("data.", "evaluate.", "report.")) for k in params)
    stats = json.loads((cwd / "data/coco/stats.json").read_text())
    assert tags["data_hash"] == tree_hash(cwd / "data/coco") == seen["train_json"]["data_hash"]
    assert tags["raw_data_hash"] == stats["content_hash"] == seen["train_json"]["raw_data_hash"]
    assert (tags["stage"], tags["model"], tags["dataset"], tags["launcher"]) == ("train", "fcos", "synthetic", "manual")
    name = f"fcos-{repo_param('model', 'backbone')}-synthetic-lr{float(default_lr()):g}"
    assert re.fullmatch(re.escape(name) + r"-[0-9a-f]{7}", tags["mlflow.runName"])
    # one name per metric everywhere: MLflow's curves are train_log.csv's columns, logged at step = epoch
    assert set(run["metrics"]) == set(seen["train_columns"]) - {"epoch"}
    assert {"train/loss", "train/lr", "train/loss_classification", "val/bbox_mAP", "val/bbox_mAP_50",
            "val/bbox_AR_100"} <= set(run["metrics"])
    assert all(steps == [(1, v)] for steps in run["metrics"].values() for v in [steps[0][1]])
    assert not any(k.startswith("bbox_") for k in run["metrics"])  # evaluation numbers live in child runs
    assert {"config.yaml", "train_log.csv"} <= artifacts(client(cwd), seen["train"])


def test_each_evaluation_is_a_new_child_run_and_the_training_run_is_never_written(project):
    cwd, seen = project
    assert record(cwd, seen["train"]) == seen["train_before"]
    assert seen["eval1"] != seen["eval2"]
    for key, thr in (("eval1", "0.05"), ("eval2", "0.3")):
        run = record(cwd, seen[key])
        assert run["tags"]["mlflow.parentRunId"] == seen["train"] and run["tags"]["stage"] == "evaluate"
        assert run["params"]["evaluate.score_thr"] == thr and run["params"]["split"] == "val"
        assert run["params"]["checkpoint"] == "runs/train/model.pt"
        assert run["params"]["data_hash"] == tree_hash(cwd / "data/coco")
        numbers = {k: v for k, v in seen[f"{key}_metrics"].items() if isinstance(v, (int, float))}
        assert {k: steps[-1][1] for k, steps in run["metrics"].items()} == pytest.approx(numbers)
        assert run["status"] == "FINISHED"
    assert seen["eval2_metrics"]["num_detections"] <= seen["eval1_metrics"]["num_detections"]
    assert artifacts(client(cwd), seen["eval2"]) == seen["eval2_files"]  # every file of runs/eval
    assert {"metrics.json", "predictions.json", "per_class.csv", "run.json"} <= seen["eval2_files"]


def test_metrics_json_is_flat_with_stable_names(project):
    _, seen = project
    metrics = seen["eval1_metrics"]
    names = {f"bbox_{k}" for k in ("mAP", "mAP_50", "mAP_75", "mAP_s", "mAP_m", "mAP_l",
                                   "AR_1", "AR_10", "AR_100", "AR_s", "AR_m", "AR_l")}
    assert names | {"num_images", "num_detections"} <= set(metrics)
    assert all(not isinstance(v, dict) for v in metrics.values())


def test_the_report_is_a_child_run_naming_the_evaluation_it_shows(project):
    cwd, seen = project
    c = client(cwd)
    [report] = c.search_runs([c.get_run(seen["train"]).info.experiment_id], "tags.stage = 'report'")
    assert report.data.tags["mlflow.parentRunId"] == seen["train"]
    assert report.data.tags["eval_run_id"] == seen["eval2"]
    assert report.data.params["report.score_thr"] == "0.4" and not report.data.metrics
    assert artifacts(c, report.info.run_id) == {"index.html"}
    assert "bbox_mAP_50" in seen["report_html"]


LOAD_WITHOUT_DETPIPE = """
import json, sys
sys.modules["detpipe"] = None  # any import of detpipe now fails: the model must load without it
import mlflow, mlflow.pytorch, numpy as np, torch
from PIL import Image
mlflow.set_tracking_uri(sys.argv[1])
model = mlflow.pytorch.load_model(sys.argv[2], map_location="cpu").eval()
image = torch.from_numpy(np.asarray(Image.open(sys.argv[3]).convert("RGB")).copy()).permute(2, 0, 1)
with torch.no_grad():
    out = model([image.float() / 255])[0]
print(json.dumps({k: v.tolist() for k, v in out.items()}))
"""


def assert_logged_model_predicts_like(cwd: Path, tracking_uri: str, model_uri: str, checkpoint: Path) -> None:
    """``model_uri`` loaded from ``tracking_uri`` in a fresh process where detpipe cannot be imported predicts on
    the first val image what ``checkpoint`` (a model.pt) predicts here."""
    import numpy as np
    import torch
    from PIL import Image

    from detpipe.models import load_checkpoint

    val = json.loads((cwd / "data/coco/val.json").read_text())
    image_file = cwd / "data/raw" / val["images"][0]["file_name"]
    env = {**os.environ, "PYTHONPATH": ""}
    env.pop("MLFLOW_TRACKING_URI", None)
    result = subprocess.run([sys.executable, "-c", LOAD_WITHOUT_DETPIPE, tracking_uri, model_uri, str(image_file)],
                            cwd=cwd, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    logged = json.loads(result.stdout.strip().splitlines()[-1])
    model, _ = load_checkpoint(checkpoint)
    image = torch.from_numpy(np.asarray(Image.open(image_file).convert("RGB")).copy()).permute(2, 0, 1)
    with torch.no_grad():
        ours = model.eval()([image.float() / 255])[0]
    assert len(ours["boxes"]) > 0
    assert logged["labels"] == ours["labels"].tolist()
    assert torch.allclose(torch.tensor(logged["boxes"]), ours["boxes"], atol=1e-4)
    assert torch.allclose(torch.tensor(logged["scores"]), ours["scores"], atol=1e-5)


def test_the_model_loads_from_mlflow_alone_and_predicts_like_model_pt(project, monkeypatch):
    from mlflow.models import get_model_info

    cwd, seen = project
    uri = seen["train_json"]["model_uri"]
    assert uri == f"runs:/{seen['train']}/model"
    assert_logged_model_predicts_like(cwd, f"sqlite:///{cwd / 'mlflow.db'}", uri, cwd / "first_train/model.pt")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{cwd / 'mlflow.db'}")
    info = get_model_info(uri)
    assert info.signature.inputs.to_dict()[0]["tensor-spec"]["shape"][1] == 3 and info.saved_input_example_info
    assert {o["name"] for o in info.signature.outputs.to_dict()} >= {"boxes", "scores", "labels"}


def test_compare_lists_the_training_runs_with_their_latest_evaluation(project):
    cwd, seen = project
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    for out in ("cmp.csv", "cmp.md"):
        result = subprocess.run([sys.executable, "-m", "detpipe.compare", "--out", out], cwd=cwd,
                                capture_output=True, text=True, env=env, timeout=300)  # experiment from params
        assert result.returncode == 0, result.stderr
        assert "experiment 'tiny': 2 training runs" in result.stdout
    with open(cwd / "cmp.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["run_id"] for r in rows} == {seen["train"], seen["train_b"]}
    # only what differs: the learning rate, and the score threshold of each run's latest evaluation
    assert {"train.lr", "evaluate.score_thr"} <= set(rows[0]) and "model.name" not in rows[0]
    by_id = {r["run_id"]: r for r in rows}
    first = by_id[seen["train"]]
    assert (first["train.lr"], first["evaluate.score_thr"]) == (default_lr(), "0.3")  # eval2, not eval1
    assert float(first["bbox_mAP"]) == pytest.approx(seen["eval2_metrics"]["bbox_mAP"], abs=1e-4)
    assert float(by_id[seen["train_b"]]["bbox_mAP"]) == pytest.approx(seen["eval_b_metrics"]["bbox_mAP"], abs=1e-4)
    assert first["data_hash"] == tree_hash(cwd / "data/coco")[:12] and first["launch"] == "manual"
    values = [float(r["bbox_mAP"]) for r in rows]
    assert values == sorted(values, reverse=True)
    md = (cwd / "cmp.md").read_text().splitlines()
    assert md[0].startswith("| run | run_id |") and len(md) == 2 + 2


def fake_training(experiment, name, params, evaluations, tags=None):
    """A training run logged through detpipe.tracking, with one evaluate child per ``evaluations`` entry (oldest
    first): the store is real, only the numbers are chosen."""
    run = tracking.Run.start(experiment, name, {"stage": "train", "data_hash": "ab" * 32, **(tags or {})})
    run.log_params(params)
    for metrics in evaluations:
        child = run.child("evaluate-val", {"stage": "evaluate"})
        child.log_params({"evaluate.score_thr": 0.05, "split": "val"})
        child.log_metrics(metrics)
        child.end()
    run.end()
    return run.run_id


def test_compare_orders_best_first_and_takes_each_runs_latest_evaluation(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    low = fake_training("exp", "low", {"train.lr": 0.1, "seed": 0}, [{"bbox_mAP": 0.2, "bbox_mAP_50": 0.4}])
    high = fake_training("exp", "high", {"train.lr": 0.2, "seed": 0}, [{"bbox_mAP": 0.5, "bbox_mAP_50": 0.7}],
                         tags={"launcher": "dvc exp run", "dvc_exp_name": "sunny-day"})
    latest = fake_training("exp", "latest", {"train.lr": 0.3, "seed": 0},
                           [{"bbox_mAP": 0.9, "bbox_mAP_50": 0.9}, {"bbox_mAP": 0.1, "bbox_mAP_50": 0.3}])
    never = fake_training("exp", "never", {"train.lr": 0.4, "seed": 0}, [])
    rows = compare.run("exp", tmp_path / "out.csv")
    assert [r["run_id"] for r in rows] == [high, low, latest, never]
    assert [r["bbox_mAP"] for r in rows] == [0.5, 0.2, 0.1, None]
    assert "seed" not in rows[0] and "train.lr" in rows[0] and "segm_mAP" not in rows[0]
    assert rows[0]["launch"] == "sunny-day" and rows[0]["data_hash"] == "ab" * 6
    assert (tmp_path / "out.csv").read_text().splitlines()[1].startswith("high,")

    with pytest.raises(DetpipeError, match="experiment 'nope' is not in the MLflow store .*known: exp"):
        compare.run("nope")
    with pytest.raises(DetpipeError, match="out.txt: --out must end in .csv or .md"):
        compare.run("exp", tmp_path / "out.txt")
    tracking.Run.start("empty", "x", {"stage": "evaluate", "mlflow.parentRunId": "0" * 32}).end()
    with pytest.raises(DetpipeError, match="experiment 'empty' has no training runs"):
        compare.run("empty")


def test_compare_errors_are_one_line(tmp_path):
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    result = subprocess.run([sys.executable, "-m", "detpipe.compare", "--experiment", "shapes"], cwd=tmp_path,
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        f"error: sqlite:///{tmp_path.resolve() / 'mlflow.db'}: no MLflow store here; run the train stage first "
        "(or set MLFLOW_TRACKING_URI)"]
    assert not (tmp_path / "mlflow.db").exists()  # looking did not create a store


def test_launch_tags_and_the_project_root(tmp_path, monkeypatch):
    for name in ("DVC_EXP_NAME", "DVC_EXP_BASELINE_REV", "DVC_STAGE", "DVC_ROOT", tracking.SNAKEMAKE_RUN):
        monkeypatch.delenv(name, raising=False)
    assert tracking.launch_tags() == {"launcher": "manual"}
    monkeypatch.setenv(tracking.SNAKEMAKE_RUN, "20250101-120000-abcdef")
    assert tracking.launch_tags() == {"launcher": "snakemake", "snakemake_run": "20250101-120000-abcdef"}
    monkeypatch.setenv("DVC_STAGE", "train")  # dvc sets it for every stage command
    assert tracking.launch_tags() == {"launcher": "dvc repro"}
    monkeypatch.setenv("DVC_EXP_NAME", "sunny-day")
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", "f" * 40)
    assert tracking.launch_tags() == {"launcher": "dvc exp run", "dvc_exp_name": "sunny-day",
                                      "dvc_baseline_rev": "f" * 40}
    for name in ("DVC_EXP_NAME", "DVC_EXP_BASELINE_REV", "DVC_STAGE"):
        monkeypatch.delenv(name)
    write_tiny_params(tmp_path / "project")
    monkeypatch.chdir(tmp_path / "project")
    cfg = config.load(Path("params/detpipe.yaml"), ["train.lr=0.5", "experiment=my shapes"])
    assert tracking.launch_tags(cfg) == {"launcher": "snakemake", "snakemake_run": "20250101-120000-abcdef",
                                         "overrides": "train.lr=0.5 'experiment=my shapes'"}
    assert tracking.launch_tags(config.load(Path("params/detpipe.yaml"))) == tracking.launch_tags()
    same = config.load(Path("params/../params/detpipe.yaml").resolve())  # the pipeline's file, however named
    assert tracking.launch_tags(same) == tracking.launch_tags()
    shutil.copy("params/detpipe.yaml", "params/big.yaml")
    assert tracking.launch_tags(config.load(Path("params/big.yaml")))["params_file"] == "params/big.yaml"

    temp_copy = tmp_path / "repo/.dvc/tmp/exps/tmpab12/"
    temp_copy.mkdir(parents=True)
    monkeypatch.chdir(temp_copy)
    assert tracking.project_root() == tmp_path.resolve() / "repo"  # a queued experiment's working copy
    assert tracking.tracking_uri() == f"sqlite:///{tmp_path.resolve() / 'repo/mlflow.db'}"
    monkeypatch.setenv("DVC_ROOT", str(tmp_path / "elsewhere"))
    assert tracking.project_root() == tmp_path.resolve() / "elsewhere"


def test_the_snakefile_gives_each_invocation_one_run_id(tmp_path):
    write_tiny_params(tmp_path)  # common.smk validates the params up front
    (tmp_path / "Snakefile").write_text(
        f'include: "{ROOT}/workflow/rules/common.smk"\n\n'
        'rule all:\n    input: "a.txt", "b.txt"\n\n'
        'rule one:\n    output: "{name}.txt"\n    shell: "echo $DETPIPE_SNAKEMAKE_RUN > {output}"\n')
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    env.pop(tracking.SNAKEMAKE_RUN, None)
    ids = []
    for _ in range(2):
        subprocess.run([BIN / "snakemake", "--cores", "2", "--forceall"], cwd=tmp_path, env=env, check=True,
                       capture_output=True, timeout=300)
        ids.append({(tmp_path / f).read_text().strip() for f in ("a.txt", "b.txt")})
    assert all(len(found) == 1 and "" not in found for found in ids)  # one id shared by the invocation's jobs
    assert ids[0] != ids[1]  # and a new one per invocation


@pytest.mark.slow
def test_a_queued_dvc_experiment_logs_to_the_projects_store(tmp_path):
    """``dvc exp run --queue`` runs in a temporary copy under .dvc/tmp/exps/: its MLflow runs must land in the
    project's mlflow.db (the copy is deleted afterwards), tagged with the experiment's name and baseline."""
    repo = copy_repo(tmp_path / "repo")
    write_tiny_params(repo)
    sh(repo, "git", "init", "-q")
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "tiny")
    sh(repo, "dvc", "exp", "run", "--queue", "-S", "params/detpipe.yaml:train.lr=0.01")
    sh(repo, "dvc", "exp", "run", "--run-all")
    table = sh(repo, "dvc", "exp", "show", "--csv", stdout_only=True)
    c = client(repo)
    [train] = c.search_runs([c.get_experiment_by_name("tiny").experiment_id], "tags.stage = 'train'")
    tags = train.data.tags
    assert train.data.params["train.lr"] == "0.01" and tags["launcher"] == "dvc exp run"
    assert re.search(rf"^{tags['dvc_exp_name']},", table, re.M)
    assert tags["dvc_baseline_rev"] == sh(repo, "git", "rev-parse", "HEAD", stdout_only=True).strip()
    children = c.search_runs([train.info.experiment_id], f"tags.mlflow.parentRunId = '{train.info.run_id}'")
    assert sorted(r.data.tags["stage"] for r in children) == ["evaluate", "report"]
    assert {r.data.tags["dvc_exp_name"] for r in children} == {tags["dvc_exp_name"]}
    assert list((repo / "mlruns").rglob("MLmodel")) and not list((repo / ".dvc/tmp").rglob("mlflow.db"))
