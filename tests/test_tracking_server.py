"""A team tracking server: ``mlflow server`` with a PostgreSQL backend store, serving the artifacts itself, started
here on 127.0.0.1 (tests/services). The train, evaluate and report stages log to it through MLFLOW_TRACKING_URI
alone, and everything they logged reads back from the server: params, curves, artifacts, the model, the pages.

The pipeline runs once, with a URI that carries credentials (``http://detpipe:<secret>@127.0.0.1:<port>``, as a
user might paste it): the same run shows that the secret is written and printed nowhere. The server here runs
without MLflow's basic-auth app (it needs Flask-WTF, ``mlflow[auth]``, not installed), so it ignores them; a stand-in
server checks that they are sent and that a refusal is a one-line error.
"""

import base64
import csv
import http.server
import json
import os
import secrets
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlflow
import pytest
import yaml
from mlflow.tracking import MlflowClient

from detpipe import report, tracking
from detpipe.errors import DetpipeError
from tests.browser import Browser, chromium_path
from tests.conftest import run_stage, write_tiny_params
from tests.services import free_port
from tests.services.mlflow_server import mlflow_server
from tests.services.postgres import postgres
from tests.test_tracking import LOAD_WITHOUT_DETPIPE, artifacts

pytestmark = pytest.mark.slow

SECRET = f"s3cret-{secrets.token_hex(6)}"


def with_credentials(url: str) -> str:
    return url.replace("http://", f"http://detpipe:{SECRET}@", 1)


@pytest.fixture(scope="module")
def database():
    """A throwaway PostgreSQL cluster on 127.0.0.1: its SQLAlchemy URL."""
    with postgres() as url:
        yield url


@pytest.fixture(scope="module")
def server(database, tmp_path_factory):
    """``mlflow server`` on 127.0.0.1 with that database as its backend store: yields ``(url, folder)``, the
    server's artifacts under ``folder/artifacts``."""
    folder = tmp_path_factory.mktemp("mlflow-server")
    with mlflow_server(database, folder) as url:
        yield url, folder


@pytest.fixture(scope="module")
def pipeline(server, converted, tmp_path_factory):
    """train (2 epochs) -> evaluate -> report in a fresh tiny project, logging to the server: ``(cwd, output)``,
    ``output`` what each stage printed."""
    url, _ = server
    cwd = tmp_path_factory.mktemp("team") / "p"
    shutil.copytree(converted, cwd)
    write_tiny_params(cwd, **{"train.epochs": 2})
    output = {}
    for stage in ("train", "evaluate", "report"):
        result = run_stage(stage, cwd, env={"MLFLOW_TRACKING_URI": with_credentials(url)})
        assert result.returncode == 0, f"{stage}:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
        output[stage] = result.stdout + result.stderr
    return cwd, output


def records(cwd: Path) -> tuple[dict, dict]:
    return (json.loads((cwd / "runs/train/run.json").read_text()),
            json.loads((cwd / "runs/eval/run.json").read_text()))


def test_the_stages_log_to_the_server_and_it_holds_params_curves_artifacts_and_evaluation(pipeline, server, tmp_path):
    cwd, _ = pipeline
    url, folder = server
    train, evaluation = records(cwd)
    assert train["tracking_uri"] == url and evaluation["tracking_uri"] == url
    assert not list(cwd.rglob("mlflow.db")) and not list(cwd.rglob("mlruns"))  # no local store
    client = MlflowClient(tracking_uri=url)
    run = client.get_run(train["run_id"])
    lr = yaml.safe_load((cwd / "params/detpipe.yaml").read_text())["train"]["lr"]
    assert run.data.params["train.lr"] == str(float(lr)) and run.data.params["train.epochs"] == "2"
    assert run.info.status == "FINISHED" and run.data.tags["stage"] == "train"
    with open(cwd / "runs/train/train_log.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    for key in ("train/loss", "train/lr", "val/bbox_mAP"):
        history = dict(sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)))
        assert history == pytest.approx({int(r["epoch"]): float(r[key]) for r in rows}), key
    assert {"config.yaml", "train_log.csv"} <= artifacts(client, run.info.run_id)  # the model: a LoggedModel
    for name in ("config.yaml", "train_log.csv"):
        got = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path=name, dst_path=str(tmp_path),
                                                  tracking_uri=url)
        assert Path(got).read_bytes() == (cwd / "runs/train" / name).read_bytes(), name

    child = client.get_run(evaluation["run_id"])
    assert child.data.tags["mlflow.parentRunId"] == run.info.run_id and child.data.tags["stage"] == "evaluate"
    metrics = json.loads((cwd / "runs/eval/metrics.json").read_text())
    numbers = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
    assert numbers and child.data.metrics == pytest.approx(numbers)
    assert "metrics.json" in artifacts(client, child.info.run_id)

    # The files went through the server into its artifact folder, none into the project.
    stored = folder / "artifacts" / run.info.experiment_id
    for name in ("config.yaml", "train_log.csv"):
        assert (stored / run.info.run_id / "artifacts" / name).read_bytes() == (cwd / "runs/train" / name).read_bytes()
    assert (stored / child.info.run_id / "artifacts/metrics.json").is_file()
    assert list(stored.rglob("MLmodel")) and not list(cwd.rglob("MLmodel"))


def test_the_logged_model_loads_from_the_server_and_predicts_like_model_pt(pipeline, server):
    import numpy as np
    import torch
    from PIL import Image

    from detpipe.models import load_checkpoint

    cwd, _ = pipeline
    url, _ = server
    train, _ = records(cwd)
    assert train["model_uri"] == f"runs:/{train['run_id']}/model"
    val = json.loads((cwd / "data/coco/val.json").read_text())
    image_file = cwd / "data/raw" / val["images"][0]["file_name"]
    env = {**os.environ, "PYTHONPATH": ""}
    env.pop("MLFLOW_TRACKING_URI", None)
    result = subprocess.run([sys.executable, "-c", LOAD_WITHOUT_DETPIPE, url, train["model_uri"], str(image_file)],
                            cwd=cwd, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    logged = json.loads(result.stdout.strip().splitlines()[-1])
    model, _ = load_checkpoint(cwd / "runs/train/model.pt")
    image = torch.from_numpy(np.asarray(Image.open(image_file).convert("RGB")).copy()).permute(2, 0, 1)
    with torch.no_grad():
        ours = model.eval()([image.float() / 255])[0]
    assert len(ours["boxes"]) > 0 and logged["labels"] == ours["labels"].tolist()
    assert torch.allclose(torch.tensor(logged["boxes"]), ours["boxes"], atol=1e-4)


def test_the_reports_links_open_the_servers_experiment_and_run_pages(pipeline, server):
    chromium = chromium_path()
    cwd, _ = pipeline
    url, _ = server
    train, _ = records(cwd)
    run = MlflowClient(tracking_uri=url).get_run(train["run_id"])
    start, runs_link, run_link = report.mlflow_links(train, {"experiment_id": run.info.experiment_id})
    assert start == ""  # nothing to start: the server is the UI
    assert runs_link.startswith(f"{url}/#/experiments/{run.info.experiment_id}?")
    assert run_link.startswith(f"{url}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}?")
    page = (cwd / "reports/index.html").read_text()
    assert f'href="{runs_link}"' in page and f'href="{run_link}"' in page
    name = run.info.run_name
    with Browser(chromium) as browser:
        browser.open(runs_link)
        browser.wait_for(f"document.body.innerText.includes({name!r})", 90, "the training run in the runs table")
        # What a user does next: open the run from the table.
        browser.evaluate(f"[...document.querySelectorAll('a')].find(a => a.innerText.trim() === {name!r}).click()")
        browser.wait_for(f"location.hash.includes('/runs/{run.info.run_id}') && "
                         "document.body.innerText.includes('train.lr') && "
                         "document.body.innerText.includes('val/bbox_mAP')", 90, "the run's page")
        text = browser.text()
    for shown in (name, "train.lr", run.data.params["train.lr"], "train/loss", "val/bbox_mAP", "data_hash"):
        assert shown in text, shown


def test_credentials_in_the_tracking_uri_are_written_and_printed_nowhere(pipeline, server):
    cwd, output = pipeline
    url, _ = server
    for stage, printed in output.items():
        assert SECRET not in printed, stage
    leaks = [p for p in cwd.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
    assert not leaks  # runs/train/run.json, runs/eval/run.json, reports/index.html, every other file
    train, evaluation = records(cwd)
    assert train["tracking_uri"] == evaluation["tracking_uri"] == url
    assert f"<code>{url}</code>" in (cwd / "reports/index.html").read_text()
    client = MlflowClient(tracking_uri=url)
    runs = client.search_runs([client.get_run(train["run_id"]).info.experiment_id])
    assert len(runs) == 3  # training, evaluation, report
    for run in runs:
        assert SECRET not in json.dumps([run.data.params, run.data.tags])


def test_the_database_listens_on_loopback_only_and_wants_the_password(database, server):
    import sqlalchemy

    url = sqlalchemy.engine.make_url(database)
    assert url.host == "127.0.0.1"
    with sqlalchemy.create_engine(url).connect() as db:
        assert db.execute(sqlalchemy.text("SHOW listen_addresses")).scalar() == "127.0.0.1"
        tables = db.execute(sqlalchemy.text("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")).scalars()
        assert {"experiments", "runs", "params", "metrics"} <= set(tables)  # the server's backend store
    with pytest.raises(sqlalchemy.exc.OperationalError, match="password authentication failed"):
        sqlalchemy.create_engine(url.set(password="wrong")).connect().close()


def test_without_postgresql_ci_fails_and_elsewhere_skips(monkeypatch):
    from tests.services import postgres as service

    monkeypatch.setattr(service.shutil, "which", lambda name: None)
    monkeypatch.setattr(service.glob, "glob", lambda pattern: [])
    monkeypatch.setenv("CI", "1")
    with pytest.raises(pytest.fail.Exception, match="install Debian's postgresql package"):
        service.bindir()
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="needs Debian's postgresql package"):
        service.bindir()


@pytest.mark.parametrize("uri, recorded", [
    ("http://detpipe:s3cret@127.0.0.1:5000", "http://127.0.0.1:5000"),
    ("https://me@mlflow.example.org/team/", "https://mlflow.example.org/team/"),
    ("http://a%40b:p%3Aw@host:8080/x?y=1#z", "http://host:8080/x?y=1#z"),
    ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
    ("postgresql://mlflow:pw@db.internal:5432/mlflow", "postgresql://db.internal:5432/mlflow"),
    ("sqlite:////tmp/p/mlflow.db", "sqlite:////tmp/p/mlflow.db"),
])
def test_a_recorded_uri_has_no_credentials(uri, recorded):
    assert tracking.without_credentials(uri) == recorded


def test_a_server_that_is_not_running_fails_the_train_stage_at_once(converted, tmp_path):
    cwd = tmp_path / "p"
    shutil.copytree(converted, cwd)
    port = free_port()  # nothing listens there
    started = time.monotonic()
    result = run_stage("train", cwd, env={"MLFLOW_TRACKING_URI": f"http://detpipe:{SECRET}@127.0.0.1:{port}"})
    seconds = time.monotonic() - started
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: MLFLOW_TRACKING_URI=http://127.0.0.1:{port}: no usable MLflow tracking server there (Connection "
        "refused); start it (docs/scale-out.md), or unset MLFLOW_TRACKING_URI to log to the project's mlflow.db")
    assert "Traceback" not in result.stderr and SECRET not in result.stdout + result.stderr
    assert seconds < 60, f"took {seconds:.0f} s"  # MLflow's own retries take minutes
    assert not (cwd / "runs").exists() and not (cwd / "mlflow.db").exists()


class Refusing(http.server.BaseHTTPRequestHandler):
    """A server that answers every request 401 and keeps the Authorization headers it was sent."""

    seen: list[str] = []

    def do_GET(self):
        self.seen.append(self.headers.get("Authorization", ""))
        self.send_response(401)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_POST = do_GET

    def log_message(self, *args):
        pass


def test_credentials_in_the_uri_are_sent_and_a_refusal_is_one_line(monkeypatch):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Refusing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_port
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    try:
        with pytest.raises(DetpipeError) as error:
            tracking.check_server(f"http://detpipe:{SECRET}@127.0.0.1:{port}")
    finally:
        server.shutdown()
        server.server_close()
    assert str(error.value) == (
        f"MLFLOW_TRACKING_URI=http://127.0.0.1:{port}: no usable MLflow tracking server there (HTTP 401: set "
        "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD); start it (docs/scale-out.md), or unset "
        "MLFLOW_TRACKING_URI to log to the project's mlflow.db")
    assert Refusing.seen == ["Basic " + base64.b64encode(f"detpipe:{SECRET}".encode()).decode()]
