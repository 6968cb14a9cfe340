"""The whole chain on a tiny config with the real snakemake, dvc and MLflow, in a fresh copy of the repo."""

import json
import os
import sqlite3
import subprocess

import pytest
import yaml

from tests.conftest import BIN, copy_repo, set_dotted, write_tiny_params

pytestmark = pytest.mark.slow

GIT_ENV = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}


def sh(cwd, *cmd, check=True, stdout_only=False):
    env = {**os.environ, **GIT_ENV, "PATH": f"{BIN}:{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env)
    if check and result.returncode:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result.stdout if stdout_only else result.stdout + result.stderr


def set_param(repo, key, value):
    path = repo / "params/detpipe.yaml"
    data = yaml.safe_load(path.read_text())
    set_dotted(data, key, value)
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def snakemake_plan(repo) -> set[str]:
    """Rules Snakemake would run now (a dry run is the tool's own decision)."""
    out = sh(repo, "snakemake", "--cores", "1", "--dry-run", "report")
    if "Nothing to be done" in out:
        return set()
    table = out.split("Job stats:")[1].split("total")[0]
    return {line.split()[0] for line in table.splitlines()[3:] if line.strip()}


def dvc_ran(output: str) -> set[str]:
    return {s for s in ("download", "convert", "train", "evaluate", "report") if f"Running stage '{s}'" in output}


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    repo = copy_repo(tmp_path_factory.mktemp("e2e"))
    write_tiny_params(repo, **{"train.epochs": 2})
    sh(repo, "git", "init", "-q")
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "tiny")
    return repo


def test_snakemake_runs_the_chain_and_reruns_only_what_changed(repo):
    sh(repo, "snakemake", "--cores", "1", "report")
    html = (repo / "reports/index.html").read_text()
    for section in ("Headline metrics", "Per-class AP", "Training curves", "Samples", "Run metadata",
                    "in MLflow", "data:image/png;base64,"):
        assert section in html
    assert "src=\"http" not in html  # self-contained
    metrics = json.loads((repo / "runs/eval/metrics.json").read_text())
    assert set(metrics["bbox"]) >= {"mAP", "mAP50", "mAP75"} and metrics["num_images"] == 4
    for name in ("train.json", "val.json", "train_middle.json", "val_middle.json", "stats.json"):
        assert (repo / "data/coco" / name).is_file()

    # MLflow: one run with flattened params, per-epoch curves, final metrics, tags, config artifact
    db = sqlite3.connect(repo / "mlflow.db")
    [(run_id, status)] = db.execute("select run_uuid, status from runs").fetchall()
    assert status == "FINISHED"
    params = dict(db.execute("select key, value from params where run_uuid=?", (run_id,)))
    assert params["train.lr"] == "0.02" and params["model.name"] == "fcos" and params["data.source"] == "synthetic"
    steps = db.execute("select step from metrics where run_uuid=? and key='val_bbox_mAP'", (run_id,)).fetchall()
    assert sorted(s for (s,) in steps) == [1, 2]
    names = {k for (k,) in db.execute("select key from latest_metrics where run_uuid=?", (run_id,))}
    assert {"train_loss", "lr", "eval_bbox_mAP", "eval_bbox_mAP50"} <= names
    tags = dict(db.execute("select key, value from tags where run_uuid=?", (run_id,)))
    stats = json.loads((repo / "data/coco/stats.json").read_text())
    assert tags["data_hash"] == stats["content_hash"] and len(tags["git_commit"]) >= 40
    artifacts = {p.name for p in (repo / "mlruns").rglob("*") if p.is_file()}
    assert {"config.yaml", "train_log.csv", "metrics.json", "index.html"} <= artifacts

    assert snakemake_plan(repo) == set()
    set_param(repo, "train.lr", 0.01)
    assert snakemake_plan(repo) == {"train", "evaluate", "report"}
    set_param(repo, "train.lr", 0.02)
    assert snakemake_plan(repo) == set()
    set_param(repo, "report.score_thr", 0.3)
    assert snakemake_plan(repo) == {"report"}
    set_param(repo, "report.score_thr", 0.4)
    lib = repo / "detpipe/visualize.py"
    original = lib.read_text()
    lib.write_text(original + "\n# edited\n")
    assert snakemake_plan(repo) == {"download", "convert", "train", "evaluate", "report"}
    lib.write_text(original)
    (repo / "snakemake_metrics.json").write_text((repo / "runs/eval/metrics.json").read_text())


def test_dvc_repro_caches_reruns_and_experiments(repo):
    first = sh(repo, "dvc", "repro")
    assert dvc_ran(first) == {"download", "convert", "train", "evaluate", "report"}
    # same params and seed on the CPU: the same metrics as the Snakemake run
    assert json.loads((repo / "runs/eval/metrics.json").read_text()) == \
        json.loads((repo / "snakemake_metrics.json").read_text())
    assert dvc_ran(sh(repo, "dvc", "repro")) == set()
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "baseline")

    set_param(repo, "train.lr", 0.01)
    assert dvc_ran(sh(repo, "dvc", "repro")) == {"train", "evaluate", "report"}
    diff = json.loads(sh(repo, "dvc", "metrics", "diff", "--all", "--json", stdout_only=True))["runs/eval/metrics.json"]
    assert diff["bbox.mAP"]["old"] is not None  # the committed baseline (metrics.json is tracked by git)
    sh(repo, "git", "checkout", "params/detpipe.yaml")

    sh(repo, "dvc", "exp", "run", "-S", "params/detpipe.yaml:train.lr=0.005")
    table = sh(repo, "dvc", "exp", "show", "--csv")
    assert "0.005" in table and "bbox.mAP50" in table

    lib = repo / "detpipe/visualize.py"
    lib.write_text(lib.read_text() + "\n# edited\n")
    status = sh(repo, "dvc", "status")
    for stage in ("download", "convert", "train", "evaluate", "report"):
        assert f"{stage}:" in status
