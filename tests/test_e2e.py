"""The whole chain on a tiny config with the real snakemake, dvc and MLflow, in a fresh copy of the repo.

Every test starts from the session's one Snakemake run (``pipeline_repo``) and puts back what it changes, so
the tests pass in any order. Which stages each tool reruns after an edit is tests/test_reruns.py's job.
"""

import contextlib
import json
import sqlite3

import pytest
import yaml

from tests.conftest import default_lr, set_dotted, sh

pytestmark = pytest.mark.slow


@contextlib.contextmanager
def param(repo, key, value):
    """``key`` set to ``value`` in params/detpipe.yaml for the block; the file is put back afterwards."""
    path = repo / "params/detpipe.yaml"
    original = path.read_text()
    data = yaml.safe_load(original)
    set_dotted(data, key, value)
    try:
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        yield
    finally:
        path.write_text(original)


def snakemake_plan(repo) -> set[str]:
    out = sh(repo, "snakemake", "--cores", "1", "--dry-run", "report")
    if "Nothing to be done" in out:
        return set()
    table = out.split("Job stats:")[1].split("total")[0]
    return {line.split()[0] for line in table.splitlines()[3:] if line.strip()}


def dvc_ran(output: str) -> set[str]:
    return {s for s in ("download", "convert", "train", "evaluate", "report") if f"Running stage '{s}'" in output}


def test_snakemake_writes_every_output_and_log(pipeline_repo):
    repo, run = pipeline_repo
    html = (repo / "reports/index.html").read_text()
    for section in ("Headline", "Dataset", "Training", "Evaluation", "Per-class AP", "Provenance",
                    "Runs of the experiment", "data:image/png;base64,", "data:image/jpeg;base64,"):
        assert section in html
    assert "src=\"http" not in html  # self-contained
    assert set(run["metrics"]) >= {"bbox_mAP", "bbox_mAP_50", "bbox_mAP_75"} and run["metrics"]["num_images"] == 4
    for name in ("train.json", "val.json", "train_middle.json", "val_middle.json", "stats.json"):
        assert (repo / "data/coco" / name).is_file()
    assert "epoch 2/2 done" in (repo / "logs/train.log").read_text()
    for stage in ("download", "convert", "evaluate", "report"):
        assert (repo / f"logs/{stage}.log").is_file()
    assert not list(repo.glob("*/.*.tmp")) and not list(repo.glob("data/raw/.unpack-*"))
    assert snakemake_plan(repo) == set()


def test_mlflow_holds_the_run_with_params_curves_metrics_and_artifacts(pipeline_repo):
    repo, run = pipeline_repo
    db = sqlite3.connect(repo / "mlflow.db")
    run_id = run["run_id"]
    [(status,)] = db.execute("select status from runs where run_uuid=?", (run_id,)).fetchall()
    assert status == "FINISHED"
    params = dict(db.execute("select key, value from params where run_uuid=?", (run_id,)))
    assert params["train.lr"] == default_lr() and params["model.name"] == "fcos" and params["dataset"] == "synthetic"
    steps = db.execute("select step from metrics where run_uuid=? and key='val/bbox_mAP'", (run_id,)).fetchall()
    assert sorted(s for (s,) in steps) == [1, 2]
    names = {k for (k,) in db.execute("select key from latest_metrics where run_uuid=?", (run_id,))}
    assert {"train/loss", "train/lr", "val/bbox_mAP", "val/bbox_mAP_50"} <= names and "bbox_mAP" not in names
    tags = dict(db.execute("select key, value from tags where run_uuid=?", (run_id,)))
    stats = json.loads((repo / "data/coco/stats.json").read_text())
    assert tags["raw_data_hash"] == stats["content_hash"] and len(tags["git_commit"]) >= 40
    assert tags["launcher"] == "snakemake" and tags["snakemake_run"]
    # the evaluation and the report are child runs of the training, launched by the same snakemake invocation
    children = db.execute("select r.run_uuid, t2.value from runs r join tags t on t.run_uuid=r.run_uuid "
                          "join tags t2 on t2.run_uuid=r.run_uuid where t.key='mlflow.parentRunId' and t.value=? "
                          "and t2.key='stage'", (run_id,)).fetchall()
    assert sorted(stage for _, stage in children) == ["evaluate", "report"]
    for child, stage in children:
        child_tags = dict(db.execute("select key, value from tags where run_uuid=?", (child,)))
        assert child_tags["snakemake_run"] == tags["snakemake_run"]
        if stage == "evaluate":
            [(value,)] = db.execute("select value from latest_metrics where run_uuid=? and key='bbox_mAP'", (child,))
            assert value == pytest.approx(run["metrics"]["bbox_mAP"])
    artifacts = {p.name for p in (repo / "mlruns").rglob("*") if p.is_file()}
    assert {"config.yaml", "train_log.csv", "metrics.json", "index.html", "MLmodel"} <= artifacts


def test_a_param_edit_reruns_from_its_stage_and_back(pipeline_repo):
    repo, _ = pipeline_repo
    with param(repo, "train.lr", 0.01):
        assert snakemake_plan(repo) == {"train", "evaluate", "report"}
    with param(repo, "report.score_thr", 0.3):
        assert snakemake_plan(repo) == {"report"}
    assert snakemake_plan(repo) == set()


def test_dvc_repro_gives_the_snakemake_metrics_caches_and_runs_experiments(pipeline_repo):
    repo, run = pipeline_repo
    first = sh(repo, "dvc", "repro")
    ran = dvc_ran(first)
    if ran:  # the first dvc repro in this repo: every stage, with the same params and seed as Snakemake's run
        assert ran == {"download", "convert", "train", "evaluate", "report"}
    # on the CPU the same params and seed give the same metrics (on one machine)
    assert json.loads((repo / "runs/eval/metrics.json").read_text()) == run["metrics"]
    assert dvc_ran(sh(repo, "dvc", "repro")) == set()
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "baseline")
    with param(repo, "train.lr", 0.01):
        assert dvc_ran(sh(repo, "dvc", "repro")) == {"train", "evaluate", "report"}
        diff = json.loads(sh(repo, "dvc", "metrics", "diff", "--all", "--json", stdout_only=True))
        assert diff["runs/eval/metrics.json"]["bbox_mAP"]["old"] is not None  # the committed baseline
    sh(repo, "dvc", "repro")  # back to the committed params: rerun or restored from DVC's run cache
    assert json.loads((repo / "runs/eval/metrics.json").read_text()) == run["metrics"]

    sh(repo, "dvc", "exp", "run", "-S", "params/detpipe.yaml:train.lr=0.005")
    table = sh(repo, "dvc", "exp", "show", "--csv")
    assert "0.005" in table and "bbox_mAP_50" in table
    # the experiment's training run in MLflow names the DVC experiment and its baseline commit
    db = sqlite3.connect(repo / "mlflow.db")
    [(run_id,)] = db.execute("select run_uuid from params where key='train.lr' and value='0.005'").fetchall()
    tags = dict(db.execute("select key, value from tags where run_uuid=?", (run_id,)))
    assert tags["launcher"] == "dvc exp run" and tags["dvc_exp_name"] in table
    assert tags["dvc_baseline_rev"] == sh(repo, "git", "rev-parse", "HEAD", stdout_only=True).strip()
