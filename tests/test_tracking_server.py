"""A team tracking server: ``mlflow server`` with a PostgreSQL backend store, serving the artifacts itself, started
here on 127.0.0.1 (tests/services). The train, evaluate and report stages log to it through MLFLOW_TRACKING_URI
alone, and everything they logged reads back from the server: params, curves, artifacts, the model, the pages.

The pipeline runs once, with a URI that carries credentials (``http://detpipe:<secret>@127.0.0.1:<port>``, as a
user might paste it): the same run shows that the secret is written and printed nowhere. That server runs without
authentication and ignores them.

A second ``mlflow server``, on the same database, runs MLflow's basic-auth app (``--app-name basic-auth``,
``mlflow[auth]``), whose admin creates the users ``detpipe`` and ``bob`` through the app's client. There a user
logs a run with MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or ~/.mlflow/credentials), the train stage
logs with the credentials in the URI (MLflow sends them as basic auth), a missing or wrong password fails the stage
at once with one line (HTTP 401, no secret), and a teammate may log into someone else's experiment only once the
admin granted it. ``/health`` answers without credentials, so the servers are awaited alike; without its secret
key, or without the admin's password at the first start, the basic-auth server does not start.
"""

import csv
import json
import secrets
import shutil
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import pytest
import yaml
from mlflow.exceptions import MlflowException
from mlflow.server import get_app_client
from mlflow.tracking import MlflowClient

from detpipe import report, tracking
from detpipe.errors import DetpipeError
from tests.browser import Browser, chromium_path
from tests.conftest import run_stage, write_tiny_params
from tests.services import free_port
from tests.services.mlflow_server import mlflow_server
from tests.services.postgres import postgres
from tests.test_tracking import artifacts, assert_logged_model_predicts_like

pytestmark = pytest.mark.slow

SECRET = f"s3cret-{secrets.token_hex(6)}"
ADMIN, ADMIN_PASSWORD = "admin", secrets.token_urlsafe(16)  # the basic-auth server's admin
USERS = {"detpipe": SECRET, "bob": secrets.token_urlsafe(16)}  # users the admin creates there (12+ characters)


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


def as_user(monkeypatch, url: str, user: str, password: str) -> None:
    """Log to ``url`` as ``user``: the tracking URI and the credentials in the environment, as docs say."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", user)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)


@pytest.fixture(scope="module")
def auth_server(database, tmp_path_factory):
    """``mlflow server --app-name basic-auth`` on 127.0.0.1, on the same database, its admin ``ADMIN``; the admin
    has created the ``USERS``. Yields ``(url, folder)``."""
    folder = tmp_path_factory.mktemp("mlflow-auth-server")
    with mlflow_server(database, folder, auth=(ADMIN, ADMIN_PASSWORD)) as url:
        with pytest.MonkeyPatch.context() as env:
            as_user(env, url, ADMIN, ADMIN_PASSWORD)
            admin = get_app_client("basic-auth", tracking_uri=url)
            for user, password in USERS.items():
                admin.create_user(username=user, password=password)
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
    cwd, _ = pipeline
    url, _ = server
    train, _ = records(cwd)
    assert train["model_uri"] == f"runs:/{train['run_id']}/model"
    assert_logged_model_predicts_like(cwd, url, train["model_uri"], cwd / "runs/train/model.pt")


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


def test_basic_auth_a_user_logs_a_run_with_the_credentials_in_the_environment(auth_server, monkeypatch, tmp_path):
    url, folder = auth_server
    as_user(monkeypatch, url, "detpipe", SECRET)
    run = tracking.Run.start("team-auth", run_name="env-credentials", tags={"stage": "train"}, root=tmp_path)
    run.log_params({"train.lr": 0.02, "train.epochs": 2})
    run.log_metrics({"val/bbox_mAP": 0.25}, step=1)
    run.log_metrics({"val/bbox_mAP": 0.5}, step=2)
    (tmp_path / "config.yaml").write_text("train:\n  lr: 0.02\n")
    run.log_artifact(tmp_path / "config.yaml")
    run.end()

    client = MlflowClient(url)  # the same credentials, from the environment
    got = client.get_run(run.run_id)
    assert got.info.status == "FINISHED" and got.data.tags["stage"] == "train"
    assert got.data.params == {"train.lr": "0.02", "train.epochs": "2"}
    history = client.get_metric_history(run.run_id, "val/bbox_mAP")
    assert sorted((m.step, m.value) for m in history) == [(1, 0.25), (2, 0.5)]
    (tmp_path / "back").mkdir()
    back = mlflow.artifacts.download_artifacts(run_id=run.run_id, artifact_path="config.yaml",
                                               dst_path=str(tmp_path / "back"), tracking_uri=url)
    assert Path(back).read_bytes() == (tmp_path / "config.yaml").read_bytes()
    stored = folder / "artifacts" / got.info.experiment_id / run.run_id / "artifacts/config.yaml"
    assert stored.read_bytes() == (tmp_path / "config.yaml").read_bytes()  # through the auth server
    assert not list(tmp_path.rglob("mlflow.db")) and not list(tmp_path.rglob("mlruns"))


@pytest.mark.parametrize("unset, refusal", [
    ("MLFLOW_FLASK_SERVER_SECRET_KEY", "A static secret key needs to be set for CSRF protection"),
    ("MLFLOW_AUTH_ADMIN_PASSWORD", "needs a password to create the admin user 'admin'"),
])
def test_basic_auth_the_server_will_not_start_without_its_secret_key_or_a_first_admin_password(database, tmp_path,
                                                                                               unset, refusal):
    with pytest.raises(AssertionError, match="mlflow server exited") as failed:
        with mlflow_server(database, tmp_path, auth=(ADMIN, ADMIN_PASSWORD), env={unset: ""}):  # a new user store
            pass
    assert refusal in str(failed.value) and unset in str(failed.value)  # the error names what to set


def test_basic_auth_health_answers_anyone_and_the_api_asks_a_browser_for_a_login(auth_server):
    url, _ = auth_server
    with urllib.request.urlopen(f"{url}/health", timeout=10) as answer:
        assert answer.read() == b"OK"  # what tests/services waits for, without credentials
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{url}/api/2.0/mlflow/experiments/search?max_results=1", timeout=10)
    assert refused.value.code == 401 and refused.value.headers["WWW-Authenticate"] == 'Basic realm="mlflow"'


def test_basic_auth_credentials_from_the_mlflow_credentials_file(auth_server, monkeypatch, tmp_path):
    url, _ = auth_server
    monkeypatch.setattr(tracking, "_answered", set())
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(DetpipeError, match="HTTP 401"):
        tracking.check_server(url)  # no file yet
    (tmp_path / ".mlflow").mkdir()
    credentials = tmp_path / ".mlflow/credentials"
    credentials.write_text(f"[mlflow]\nmlflow_tracking_username = detpipe\nmlflow_tracking_password = {SECRET}\n")
    credentials.chmod(0o600)
    run = tracking.Run.start("team-auth", run_name="credentials-file", tags={"stage": "train"}, root=tmp_path)
    run.log_params({"train.lr": 0.03})
    run.end()
    assert MlflowClient(url).get_run(run.run_id).data.params == {"train.lr": "0.03"}


@pytest.mark.parametrize("user, password", [(None, None), ("detpipe", "wrong-password-1234")],
                         ids=["no-credentials", "wrong-password"])
def test_basic_auth_without_the_right_password_check_server_is_one_line_with_http_401(auth_server, monkeypatch,
                                                                                      user, password):
    url, _ = auth_server
    monkeypatch.setattr(tracking, "_answered", set())  # another test's run may have found the server answering
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    uri = url if user is None else url.replace("http://", f"http://{user}:{password}@", 1)  # in the URI
    with pytest.raises(DetpipeError) as error:
        tracking.check_server(uri)
    assert str(error.value) == (
        f"MLFLOW_TRACKING_URI={url}: no usable MLflow tracking server there (HTTP 401: set "
        "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD); start it (docs/scale-out.md), or unset "
        "MLFLOW_TRACKING_URI to log to the project's mlflow.db")


def test_basic_auth_a_wrong_password_fails_the_train_stage_at_once(auth_server, converted, tmp_path):
    url, _ = auth_server
    cwd = tmp_path / "p"
    shutil.copytree(converted, cwd)
    wrong = f"not-{SECRET}"
    started = time.monotonic()
    result = run_stage("train", cwd, env={"MLFLOW_TRACKING_URI": url, "MLFLOW_TRACKING_USERNAME": "detpipe",
                                          "MLFLOW_TRACKING_PASSWORD": wrong})
    seconds = time.monotonic() - started
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: MLFLOW_TRACKING_URI={url}: no usable MLflow tracking server there (HTTP 401: set "
        "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD); start it (docs/scale-out.md), or unset "
        "MLFLOW_TRACKING_URI to log to the project's mlflow.db")
    assert "Traceback" not in result.stderr and wrong not in result.stdout + result.stderr
    assert seconds < 60, f"took {seconds:.0f} s"
    assert not (cwd / "runs").exists() and not (cwd / "mlflow.db").exists()


def test_basic_auth_credentials_in_the_uri_log_the_train_stage_and_are_recorded_nowhere(auth_server, converted,
                                                                                       monkeypatch, tmp_path):
    url, folder = auth_server
    cwd = tmp_path / "p"
    shutil.copytree(converted, cwd)
    write_tiny_params(cwd, experiment="team-auth-uri")
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    result = run_stage("train", cwd, env={"MLFLOW_TRACKING_URI": with_credentials(url)})
    assert result.returncode == 0, f"{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    assert SECRET not in result.stdout + result.stderr
    assert not [p for p in cwd.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
    assert SECRET not in (folder / "mlflow-server.log").read_text(errors="replace")
    train = json.loads((cwd / "runs/train/run.json").read_text())
    assert train["tracking_uri"] == url == tracking.without_credentials(with_credentials(url))

    as_user(monkeypatch, url, "detpipe", SECRET)
    client = MlflowClient(url)
    run = client.get_run(train["run_id"])
    assert run.info.status == "FINISHED" and run.data.params["train.epochs"] == "1"
    assert client.get_experiment(run.info.experiment_id).name == "team-auth-uri"
    assert {"config.yaml", "train_log.csv"} <= artifacts(client, run.info.run_id)
    stored = folder / "artifacts" / run.info.experiment_id
    assert (stored / run.info.run_id / "artifacts/train_log.csv").read_bytes() == \
        (cwd / "runs/train/train_log.csv").read_bytes()
    assert list(stored.rglob("MLmodel"))  # the logged model went up through the auth server too


def test_basic_auth_the_admin_created_the_users_and_a_password_needs_12_characters(auth_server, monkeypatch):
    url, _ = auth_server
    as_user(monkeypatch, url, ADMIN, ADMIN_PASSWORD)
    auth = get_app_client("basic-auth", tracking_uri=url)
    assert {name: auth.get_user(name).is_admin for name in (ADMIN, *USERS)} == {ADMIN: True, "detpipe": False,
                                                                               "bob": False}
    with pytest.raises(MlflowException, match="Password must be at least 12 characters"):
        auth.create_user(username="carol", password="eleven-char")


def test_basic_auth_a_teammate_reads_another_users_experiment_and_logs_there_once_granted(auth_server, monkeypatch,
                                                                                         tmp_path):
    url, _ = auth_server
    as_user(monkeypatch, url, "detpipe", SECRET)
    first = tracking.Run.start("team-shared", run_name="detpipe's", tags={"stage": "train"}, root=tmp_path)
    first.end()

    as_user(monkeypatch, url, "bob", USERS["bob"])
    assert MlflowClient(url).get_run(first.run_id).info.run_name == "detpipe's"  # default_permission = READ
    refused = r"^MLFLOW_TRACKING_URI=http://127\.0\.0\.1:\d+: the server refuses this user a new run in experiment "
    with pytest.raises(DetpipeError, match=refused + r"'team-shared' \(HTTP 403\); ask its admin for EDIT"):
        tracking.Run.start("team-shared", run_name="bob's", tags={"stage": "train"}, root=tmp_path)

    as_user(monkeypatch, url, ADMIN, ADMIN_PASSWORD)  # as docs/scale-out.md shows it
    experiment = MlflowClient(url).get_experiment_by_name("team-shared").experiment_id
    get_app_client("basic-auth", tracking_uri=url).grant_user_permission("bob", "experiment", experiment, "EDIT")

    as_user(monkeypatch, url, "bob", USERS["bob"])
    second = tracking.Run.start("team-shared", run_name="bob's", tags={"stage": "train"}, root=tmp_path)
    second.log_params({"train.lr": 0.01})
    second.end()
    runs = MlflowClient(url).search_runs([experiment])
    assert {r.info.run_name for r in runs} == {"detpipe's", "bob's"}
    assert {r.info.run_name: r.data.params for r in runs}["bob's"] == {"train.lr": "0.01"}
