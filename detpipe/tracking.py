"""The one place that talks to MLflow: runs, params, per-epoch metrics, artifacts, earlier runs."""

from __future__ import annotations

import logging
import os
import subprocess
import time
from pathlib import Path
from typing import Any

from detpipe.errors import DetpipeError

STORE = "mlflow.db"
ARTIFACTS = "mlruns"


def tracking_uri(root: Path = Path(".")) -> str:
    """``MLFLOW_TRACKING_URI`` when set (a team server), else a sqlite store inside the project."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(root).resolve() / STORE}"


def _client(root: Path = Path(".")):
    logging.getLogger("alembic").setLevel(logging.WARNING)
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri(root))


def experiment_id(client, name: str, root: Path = Path(".")) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None if "MLFLOW_TRACKING_URI" in os.environ else (Path(root).resolve() / ARTIFACTS).as_uri()
    return client.create_experiment(name, artifact_location=location)


def git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


class Run:
    """One MLflow run, addressed by id so later stages (evaluate, report) log into the run training made."""

    def __init__(self, run_id: str, root: Path = Path(".")):
        self.client = _client(root)
        self.run_id = run_id

    @classmethod
    def existing(cls, run_id: str, record: Path, root: Path = Path(".")) -> Run:
        """The run ``record`` (a ``run.json``) names; a one-line error when this store does not hold it."""
        from mlflow.exceptions import MlflowException

        run = cls(run_id, root)
        try:
            run.client.get_run(run_id)
        except MlflowException:
            raise DetpipeError(f"{record}: MLflow run {run_id} is not in the store {tracking_uri(root)}; "
                               "rerun the train stage (or set MLFLOW_TRACKING_URI to the store it used)") from None
        return run

    @classmethod
    def start(cls, experiment: str, run_name: str, tags: dict[str, str], root: Path = Path(".")) -> Run:
        client = _client(root)
        run = client.create_run(experiment_id(client, experiment, root), run_name=run_name, tags=tags)
        return cls(run.info.run_id, root)

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
        self.client.log_batch(self.run_id, metrics=items)

    def log_artifact(self, path: Path, subdir: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), subdir)

    def set_tag(self, key: str, value: str) -> None:
        self.client.set_tag(self.run_id, key, value)

    def reopen(self) -> None:
        """Mark a run that was killed (or left RUNNING by a SIGKILL) as running again: resumed training."""
        self.client.update_run(self.run_id, status="RUNNING")

    def end(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status)


class NoRun:
    """Stands in for :class:`Run` on the processes of a distributed training other than rank 0: logs nothing."""

    run_id = None

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


def earlier_runs(experiment: str, root: Path = Path("."), limit: int = 20):
    """Recent runs of ``experiment`` as a DataFrame (params and metrics columns), newest first."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(root))
    return mlflow.search_runs(experiment_names=[experiment], max_results=limit, order_by=["start_time DESC"])
