"""The one place that talks to MLflow: runs and child runs, params, metrics, artifacts, the model, comparisons.

One training is one run (tag ``stage: train``); each evaluation of it and each report about it is a CHILD run
(tag ``mlflow.parentRunId``) with its own params, so a number is never shown next to params that did not
produce it. Every run records how it was launched (``launcher``: dvc exp run, dvc repro, snakemake or manual,
with the DVC experiment's name and baseline or the Snakemake invocation's id). docs/tracking.md tells the story.

The store is ``MLFLOW_TRACKING_URI`` when set, else ``mlflow.db`` (artifacts in ``mlruns/``) in the project root:
the folder DVC names in ``DVC_ROOT`` (a queued ``dvc exp run`` works in a temporary copy under
``.dvc/tmp/exps/``, whose store would vanish with it), else the working directory. A tracking server must answer
a first quick request (``check_server``); a URI is recorded and printed without its credentials
(``without_credentials``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shlex
import subprocess
import time
import urllib.parse
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from detpipe.config import PARAMS_FILE
from detpipe.errors import DetpipeError

STORE = "mlflow.db"
ARTIFACTS = "mlruns"
SNAKEMAKE_RUN = "DETPIPE_SNAKEMAKE_RUN"  # set once per snakemake invocation by the Snakefile
KEY_METRICS = ("bbox_mAP", "bbox_mAP_50", "bbox_mAP_75", "segm_mAP", "segm_mAP_50", "voc_mAP_50")


def project_root() -> Path:
    """The project's folder: DVC's ``DVC_ROOT`` (the real repo, also from a queued experiment's temporary copy),
    else the folder above a ``.dvc/tmp/exps/`` working copy, else the working directory."""
    if os.environ.get("DVC_ROOT"):
        return Path(os.environ["DVC_ROOT"]).resolve()
    cwd = Path.cwd().resolve()
    for i in range(len(cwd.parts) - 2):
        if cwd.parts[i:i + 3] == (".dvc", "tmp", "exps"):
            return Path(*cwd.parts[:i])
    return cwd


def tracking_uri(root: Path | None = None) -> str:
    """``MLFLOW_TRACKING_URI`` when set (a team server), else a sqlite store in the project root."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(root or project_root()).resolve() / STORE}"


def without_credentials(uri: str) -> str:
    """``uri`` without its userinfo (``user:password@``): the form to record in files, runs and pages, or print.
    ``http://me:secret@host:5000/`` becomes ``http://host:5000/``; a URI without credentials stays as it is."""
    parts = urllib.parse.urlsplit(uri)
    if "@" not in parts.netloc:
        return uri
    return urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


PROBE_TIMEOUT_S = 15
_answered: set[str] = set()  # tracking servers that answered this process's probe


def check_server(uri: str) -> None:
    """A tracking server (an ``http(s)://`` URI) must answer one request, without MLflow's retries (minutes of
    them), before the first real one: one that is down, unknown or refuses the credentials is a one-line error
    naming the URI (without credentials) at once, not after minutes of retries or halfway through a stage."""
    if not uri.startswith(("http://", "https://")) or uri in _answered:
        return
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        with _environ({"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": str(PROBE_TIMEOUT_S)}):
            MlflowClient(uri).search_experiments(max_results=1)
    except (MlflowException, OSError) as exc:
        raise DetpipeError(f"MLFLOW_TRACKING_URI={without_credentials(uri)}: no usable MLflow tracking server there "
                           f"({_why(str(exc))}); start it (docs/scale-out.md), or unset MLFLOW_TRACKING_URI to log "
                           "to the project's mlflow.db") from None
    _answered.add(uri)


def _why(message: str) -> str:
    """The gist of a failed request's (long, nested) message, free of credentials."""
    if found := re.search(r"\[Errno -?\d+\] ([^'\")\]]+)", message):
        return found[1].strip().rstrip(".")  # Connection refused, Name or service not known, ...
    if re.search(r"timed? ?out", message, re.IGNORECASE):
        return f"no answer within {PROBE_TIMEOUT_S} s"
    if found := re.search(r"error code (\d+)", message):
        code = int(found[1])
        hint = ": set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD" if code in (401, 403) else ""
        return f"HTTP {code}{hint}"
    return re.sub(r"//[^/@\s]*@", "//", message.strip().splitlines()[0] if message.strip() else "no answer")[:200]


def _client(root: Path | None = None):
    logging.getLogger("alembic").setLevel(logging.WARNING)
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(root)
    check_server(uri)
    return MlflowClient(uri)


def experiment_id(client, name: str, root: Path | None = None) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None if os.environ.get("MLFLOW_TRACKING_URI") else (Path(root or project_root()) / ARTIFACTS).as_uri()
    return client.create_experiment(name, artifact_location=location)


def git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def launch_tags(cfg=None) -> dict[str, str]:
    """What started this process: ``dvc exp run`` (DVC sets ``DVC_EXP_NAME`` and ``DVC_EXP_BASELINE_REV``),
    ``dvc repro`` (``DVC_STAGE``), ``snakemake`` (the Snakefile's ``DETPIPE_SNAKEMAKE_RUN``) or by hand; with
    ``cfg`` from :func:`detpipe.config.load`, also a params file other than the pipeline's (``params_file``)
    and the ``--set`` overrides (``overrides``, shell-quoted), which the report's reproduce command applies."""
    env = os.environ
    if env.get("DVC_EXP_NAME"):
        tags = {"launcher": "dvc exp run", "dvc_exp_name": env["DVC_EXP_NAME"],
                "dvc_baseline_rev": env.get("DVC_EXP_BASELINE_REV", "")}
    elif env.get("DVC_STAGE"):
        tags = {"launcher": "dvc repro"}
    elif env.get(SNAKEMAKE_RUN):
        tags = {"launcher": "snakemake", "snakemake_run": env[SNAKEMAKE_RUN]}
    else:
        tags = {"launcher": "manual"}
    cli = getattr(cfg, "_cli", None) or {}
    if cli.get("overrides"):
        tags["overrides"] = shlex.join(cli["overrides"])
    if cli:  # the pipeline's file, seen from the stage's folder (a queued experiment's copy too) or the project's
        root, params_file = project_root(), Path(cli["params_file"]).resolve()
        if params_file not in (PARAMS_FILE.resolve(), root / PARAMS_FILE):
            tags["params_file"] = str(params_file.relative_to(root) if params_file.is_relative_to(root)
                                      else params_file)
    return tags


def short_hash(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:7]


class Run:
    """One MLflow run, addressed by id."""

    def __init__(self, run_id: str, root: Path | None = None):
        self.root = root
        self.client = _client(root)
        self.run_id = run_id

    @classmethod
    def existing(cls, run_id: str, record: Path, root: Path | None = None, stage: str = "train") -> Run:
        """The run ``record`` (a ``run.json`` of ``stage``'s output) names; a one-line error when this store does
        not hold it. ``run.stored`` is what the store holds of it (MLflow's ``Run``: info, params, tags)."""
        from mlflow.exceptions import MlflowException

        run = cls(run_id, root)
        try:
            run.stored = run.client.get_run(run_id)
        except MlflowException:
            raise DetpipeError(f"{record}: MLflow run {run_id} is not in the store "
                               f"{without_credentials(tracking_uri(root))}; "
                               f"rerun the {stage} stage (or set MLFLOW_TRACKING_URI to the store it used)") from None
        return run

    @classmethod
    def start(cls, experiment: str, run_name: str, tags: dict[str, str], root: Path | None = None) -> Run:
        from mlflow.exceptions import MlflowException

        client = _client(root)
        try:
            run = client.create_run(experiment_id(client, experiment, root), run_name=run_name, tags=tags)
        except MlflowException as exc:
            if "error code 403" not in str(exc):
                raise
            uri = without_credentials(tracking_uri(root))
            raise DetpipeError(f"MLFLOW_TRACKING_URI={uri}: the server refuses this user a new run in experiment "
                               f"{experiment!r} (HTTP 403); ask its admin for EDIT permission on it "
                               "(docs/scale-out.md), or set another experiment in the params") from None
        return cls(run.info.run_id, root)

    def child(self, run_name: str, tags: dict[str, str]) -> Run:
        """A new run nested under this one (same experiment): an evaluation or a report of a training."""
        parent = self.client.get_run(self.run_id)
        run = self.client.create_run(parent.info.experiment_id, run_name=run_name,
                                     tags={**tags, "mlflow.parentRunId": self.run_id})
        return Run(run.info.run_id, self.root)

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
        for i in range(0, len(items), 500):
            self.client.log_batch(self.run_id, metrics=items[i:i + 500])

    def log_artifact(self, path: Path, subdir: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), subdir)

    def log_artifacts(self, folder: Path) -> None:
        self.client.log_artifacts(self.run_id, str(folder))

    def log_model(self, model, example) -> str:
        """Log a torchvision detector (``mlflow.pytorch``, pickled) with its input example and signature; returns
        the URI that loads it back without detpipe: ``mlflow.pytorch.load_model("runs:/<run id>/model")``.

        ``example`` is one image batch, a float32 array ``(1, 3, H, W)`` in [0, 1]; the signature's outputs are
        the first image's ``boxes``, ``scores`` and ``labels`` (and ``masks``), as the model returns them.
        """
        import mlflow.pytorch
        import torch
        from mlflow.models import infer_signature

        with torch.no_grad():
            output = model.eval()(torch.from_numpy(example))[0]
        signature = infer_signature(example, {k: v.numpy() for k, v in output.items()})
        # MLflow's model logging finds the store and experiment through its globals or these variables: set for
        # the call only (mlflow.set_tracking_uri would leave them set for the rest of the process).
        where = {"MLFLOW_TRACKING_URI": tracking_uri(self.root),
                 "MLFLOW_EXPERIMENT_ID": self.client.get_run(self.run_id).info.experiment_id}
        # Muted: MLflow's warning that pickle is unsafe (torch.export cannot trace a detector's data-dependent
        # NMS), and its pyfunc check of the example (its generic wrapper expects one tensor out, not a list).
        quiet = logging.getLogger("mlflow")
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            with _environ(where):
                mlflow.pytorch.log_model(model, name="model", run_id=self.run_id, signature=signature,
                                         input_example=example, serialization_format="pickle",
                                         pip_requirements=[_pinned("torch"), _pinned("torchvision")])
        finally:
            quiet.setLevel(level)
        return f"runs:/{self.run_id}/model"

    def set_tag(self, key: str, value: str) -> None:
        self.client.set_tag(self.run_id, key, value)

    def reopen(self) -> None:
        """Mark a run that was killed (or left RUNNING by a SIGKILL) as running again: resumed training."""
        self.client.update_run(self.run_id, status="RUNNING")

    def end(self, status: str = "FINISHED") -> None:
        # Ending a run on a tracking server, MLflow prints links to it built from the URI as given: not when that
        # holds credentials.
        uri = tracking_uri(self.root)
        quiet = {"MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"} if without_credentials(uri) != uri else {}
        with _environ(quiet):
            self.client.set_terminated(self.run_id, status)


@contextlib.contextmanager
def _environ(values: dict[str, str]):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _pinned(package: str) -> str:
    try:
        return f"{package}=={version(package)}"
    except PackageNotFoundError:
        return package


class NoRun:
    """Stands in for :class:`Run` on the processes of a distributed training other than rank 0: logs nothing."""

    run_id = None

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


def comparison(experiment: str, root: Path | None = None, limit: int = 10000) -> list[dict]:
    """One row per training run of ``experiment``, best first (by the key metrics, in order).

    A row holds the run's name and id, how it was launched, the hash of the data it trained on, the key metrics
    of its latest evaluate child run (the training run itself holds per-epoch ``val/`` curves only), and the
    params (training run's, and the ``evaluate.*`` and ``split`` of that evaluation) that differ between rows.
    """
    uri = without_credentials(tracking_uri(root))
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise DetpipeError(f"{uri}: no MLflow store here; run the train stage first (or set MLFLOW_TRACKING_URI)")
    client = _client(root)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        known = [e.name for e in client.search_experiments() if e.name != "Default"]
        raise DetpipeError(f"experiment {experiment!r} is not in the MLflow store {uri}; "
                           + (f"known: {', '.join(known)}" if known else "the store holds no experiments yet"))
    runs = client.search_runs([exp.experiment_id], max_results=limit, order_by=["attributes.start_time DESC"])
    trainings = [r for r in runs if r.data.tags.get("stage", "train") == "train"
                 and "mlflow.parentRunId" not in r.data.tags]
    if not trainings:
        raise DetpipeError(f"experiment {experiment!r} has no training runs in {uri}")
    latest_eval = {}  # newest first, so the first seen per parent is its latest
    for r in runs:
        parent = r.data.tags.get("mlflow.parentRunId")
        if r.data.tags.get("stage") == "evaluate" and parent not in latest_eval:
            latest_eval[parent] = r
    rows, params = [], []
    for r in trainings:
        ev = latest_eval.get(r.info.run_id)
        tags = r.data.tags
        row = {"run": r.info.run_name, "run_id": r.info.run_id, "status": r.info.status,
               "launch": tags.get("dvc_exp_name") or tags.get("snakemake_run") or tags.get("launcher", ""),
               "data_hash": tags.get("data_hash", "")[:12]}
        row.update({k: ev.data.metrics.get(k) if ev else None for k in KEY_METRICS})
        rows.append(row)
        eval_params = {k: v for k, v in (ev.data.params if ev else {}).items() if k.startswith("evaluate.")
                       or k == "split"}
        params.append({**r.data.params, **eval_params})
    shown = [m for m in KEY_METRICS if any(row[m] is not None for row in rows)]
    differing = sorted(k for k in {k for p in params for k in p} if len({p.get(k) for p in params}) > 1)
    rows = [{**{k: v for k, v in row.items() if k not in KEY_METRICS or k in shown},
             **{k: p.get(k) for k in differing}} for row, p in zip(rows, params)]
    # best first: by the first key metric, then the next; runs never evaluated last
    return sorted(rows, key=lambda row: [-(row[m] if row[m] is not None else -1.0) for m in shown])
