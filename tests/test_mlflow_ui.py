"""The MLflow UI, as a user sees it in a browser, lists the pipeline's run with its params and metrics."""

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request

import pytest

from tests.conftest import BIN

pytestmark = pytest.mark.slow
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="session")
def chromium() -> str:
    """The browser; session-scoped so it is checked before the module's pipeline fixture runs.

    Under CI (the CI environment variable set) a missing browser fails the test: .ci/run installs it, and a skip
    there would silently drop the check. Elsewhere the test is skipped.
    """
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("CI is set but chromium (Debian's chromium package) is not installed: tests/test_mlflow_ui.py "
                        "cannot check the MLflow UI; .ci/run installs it", pytrace=False)
        pytest.skip("needs Debian's chromium (.ci/run installs it)")
    return CHROMIUM


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_ui(pipeline_repo):
    repo, _ = pipeline_repo
    port = free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen([BIN / "mlflow", "ui", "--backend-store-uri", f"sqlite:///{repo}/mlflow.db",
                             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                            cwd=repo, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"{url}/health", timeout=1)
                break
            except OSError:
                time.sleep(0.5)
        else:
            raise AssertionError("mlflow ui did not start")
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def render(chromium: str, url: str, tmp_path) -> str:
    """The page's DOM after its scripts ran, from headless Chromium."""
    out = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                          "--no-first-run", "--disable-background-networking", "--disable-component-update",
                          "--disable-sync", f"--user-data-dir={tmp_path / 'chrome'}",
                          "--virtual-time-budget=20000", "--dump-dom", url],
                         capture_output=True, text=True, timeout=120)
    return out.stdout


def test_mlflow_ui_shows_the_run(chromium, mlflow_ui, pipeline_repo, tmp_path):
    _, run = pipeline_repo
    req = urllib.request.Request(f"{mlflow_ui}/api/2.0/mlflow/experiments/get-by-name?experiment_name=tiny")
    experiment_id = json.loads(urllib.request.urlopen(req).read())["experiment"]["experiment_id"]
    runs_page = render(chromium, f"{mlflow_ui}/#/experiments/{experiment_id}/runs", tmp_path)
    assert "fcos-resnet18-" in runs_page  # the run's name in the runs table
    run_page = render(chromium, f"{mlflow_ui}/#/experiments/{experiment_id}/runs/{run['run_id']}", tmp_path)
    for text in ("train.lr", "model.name", "eval_bbox_mAP", "val_bbox_mAP50", "data_hash"):
        assert text in run_page, text
