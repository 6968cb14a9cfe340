"""The MLflow UI, as a user sees it in a browser: the link the README and the report give lands on the
experiment's runs table, and comparing the runs there shows both with their params and metrics.

The store is built with detpipe.tracking directly (two training runs, each with an evaluation child run), not by
a pipeline run. MLflow 3's UI opens an experiment in its GenAI mode (an "Overview" of traces) unless the URL says
``workflowType=machine_learning`` (or the user flipped the sidebar's switch, which the browser remembers): the
experiment tag ``mlflow.experimentKind`` does not change that (mlflow/server/js: the workflow type, when its switch
is enabled, decides the experiment kind).
"""

import os
import subprocess

import pytest

from detpipe import report, tracking
from tests.browser import Browser, chromium_path
from tests.conftest import BIN
from tests.services import free_port, stop
from tests.services.mlflow_server import SERVER_ENV, wait_until_up

pytestmark = pytest.mark.slow

RUNS = {"fcos-resnet18-synthetic-lr0.01-aaaaaaa": 0.01, "fcos-resnet18-synthetic-lr0.02-bbbbbbb": 0.02}


@pytest.fixture(scope="module")
def chromium() -> str:
    return chromium_path()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Two training runs of experiment ``tiny`` (params, per-epoch ``val/`` metrics), each with an evaluation."""
    root = tmp_path_factory.mktemp("store")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        ids = {}
        for k, (name, lr) in enumerate(RUNS.items()):
            run = tracking.Run.start("tiny", name, {"stage": "train", "launcher": "manual", "data_hash": "d4t4"}, root)
            run.log_params({"model.name": "fcos", "train.lr": lr, "train.epochs": 2})
            for epoch in (1, 2):
                run.log_metrics({"val/bbox_mAP": 0.1 * epoch + k / 10, "val/bbox_mAP_50": 0.2 * epoch + k / 10},
                                step=epoch)
            child = run.child("evaluate-val", {"stage": "evaluate"})
            child.log_metrics({"bbox_mAP": 0.3 + k / 10, "bbox_mAP_50": 0.5 + k / 10})
            child.end()
            run.end()
            ids[name] = run.run_id
        client = tracking._client(root)
        experiment_id = client.get_experiment_by_name("tiny").experiment_id
    return root, ids, experiment_id


@pytest.fixture(scope="module")
def mlflow_ui(store):
    """``mlflow ui`` on a free port of 127.0.0.1, started as the report says (its --backend-store-uri)."""
    root, ids, experiment_id = store
    start, _, _ = report.mlflow_links({"tracking_uri": tracking.tracking_uri(root), "run_id": ""},
                                      {"experiment_id": experiment_id})
    args = start.split()
    assert args[:2] == ["mlflow", "ui"]
    env = {**os.environ, **SERVER_ENV}
    port = free_port()
    proc = subprocess.Popen([BIN / "mlflow", "ui", *args[2:], "--host", "127.0.0.1", "--port", str(port),
                             "--workers", "1"], cwd=root, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(url, proc)
        yield url
    finally:
        stop(proc)


def user_link(mlflow_ui: str, store) -> str:
    """The report's (and README's) link to the experiment's runs, on this test's port."""
    root, ids, experiment_id = store
    _, runs_link, _ = report.mlflow_links({"tracking_uri": tracking.tracking_uri(root), "run_id": ""},
                                          {"experiment_id": experiment_id})
    assert runs_link.startswith(report.MLFLOW_UI)
    return mlflow_ui + runs_link.removeprefix(report.MLFLOW_UI)


def test_the_experiment_link_lands_on_the_runs_and_compare_shows_both(chromium, mlflow_ui, store):
    root, ids, experiment_id = store
    with Browser(chromium) as browser:
        browser.open(user_link(mlflow_ui, store))
        browser.wait_for(" && ".join(f"document.body.innerText.includes({name!r})" for name in RUNS), 90,
                         "both training runs in the runs table")
        assert f"/experiments/{experiment_id}/runs" in browser.evaluate("location.hash")
        # What a user does next: tick both runs, press Compare.
        ticked = browser.evaluate("""(() => {
            const boxes = [...document.querySelectorAll('[role=row] input[type=checkbox]')]
                .filter(b => /toggle row selection/i.test(b.getAttribute('aria-label') || ''));
            boxes.forEach(b => b.click());
            return boxes.length; })()""")
        assert ticked == 2
        browser.wait_for("[...document.querySelectorAll('button')].some(b => b.innerText.trim() === 'Compare')", 30)
        browser.evaluate("[...document.querySelectorAll('button')].find(b => b.innerText.trim() === 'Compare').click()")
        browser.wait_for("location.hash.startsWith('#/compare-runs') && document.body.innerText.includes('Metrics')"
                         " && document.body.innerText.includes('val/bbox_mAP_50')", 60, "the compare-runs page")
        page = browser.text()
    for name, run_id in ids.items():
        assert name in page and run_id in page
    for text in ("train.lr", "0.01", "0.02", "val/bbox_mAP", "val/bbox_mAP_50", "0.3", "0.5"):
        assert text in page, text  # both runs' params and last metric values


def test_a_run_page_shows_its_params_and_metrics(chromium, mlflow_ui, store):
    root, ids, experiment_id = store
    name = next(iter(RUNS))
    _, _, run_link = report.mlflow_links({"tracking_uri": tracking.tracking_uri(root), "run_id": ids[name]},
                                         {"experiment_id": experiment_id})
    with Browser(chromium) as browser:
        browser.open(mlflow_ui + run_link.removeprefix(report.MLFLOW_UI))
        browser.wait_for("document.body.innerText.includes('val/bbox_mAP_50')", 90, "the run's metrics")
        page = browser.text()
    for text in (name, "train.lr", "model.name", "val/bbox_mAP", "data_hash"):
        assert text in page, text
