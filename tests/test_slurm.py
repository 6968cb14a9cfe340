"""The SLURM profile on a real SLURM: Debian's slurm-wlm and munge as a one-node cluster on this machine
(tests/services/slurm-cluster), driven by Snakemake's official SLURM executor plugin.

Each stage must be its own SLURM job asking for what params/detpipe.yaml `resources` gives it (train with its
GPUs and its multi-process torchrun launch), and the outputs must equal a local run's. The node declares two
stand-in GPUs (no device behind them), so the train job is scheduled with `--gpus=2` and trains on the CPU, as
`device: auto` does without CUDA.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from detpipe import tracking
from tests.conftest import ROOT, copy_repo, sh, tree_hashes, write_tiny_params

pytestmark = pytest.mark.slow

CLUSTER = ROOT / "tests/services/slurm-cluster"
STAGES = ("download", "convert", "train", "evaluate", "report")
GPUS = 2
# The cluster has no accounting database: job states come from squeue, and jobs are submitted without an
# account (docs/scale-out.md); the short waits keep the test quick.
SLURM_ARGS = ("--slurm-no-account", "--slurm-status-command", "squeue",
              "--slurm-init-seconds-before-status-checks", "1", "--seconds-between-status-checks", "2")


def cpus() -> int:
    return len(os.sched_getaffinity(0))


def as_root() -> list[str]:
    """The prefix that runs the cluster script as root: none for root, else password-less sudo."""
    return [] if os.geteuid() == 0 else ["sudo", "-n"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """The cluster's daemons run as root (slurmd starts each job as its user): the test runs as root, or as a user
    with password-less sudo, who then submits the jobs as themself."""
    missing = [c for c in ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol") if not shutil.which(c)]
    root = as_root()
    reason = (f"needs Debian's slurm-wlm and munge ({', '.join(missing)} not found; .ci/run installs them)" if missing
              else "needs root or password-less sudo: slurmd starts each job as its user"
              if root and subprocess.run([*root, "true"], capture_output=True).returncode else None)
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"CI is set but the SLURM test cannot run: {reason}", pytrace=False)
        pytest.skip(reason)
    folder = tmp_path_factory.mktemp("slurm")
    started = subprocess.run([*root, CLUSTER, "start", folder, str(GPUS)], capture_output=True, text=True)
    assert started.returncode == 0, started.stderr
    try:
        yield folder
    finally:
        stopped = subprocess.run([*root, CLUSTER, "stop", folder], capture_output=True, text=True)
        assert stopped.returncode == 0, stopped.stderr


def project(folder: Path) -> Path:
    """Tiny params training in two processes, the train job asking for two GPUs; every job fits the node."""
    repo = copy_repo(folder)
    jobs = {f"resources.{stage}.{key}": value for stage in STAGES
            for key, value in (("threads", cpus()), ("mem_mb", 1000), ("runtime", 30))}
    write_tiny_params(repo, **{"device": "auto", "train.epochs": 2, "train.processes": GPUS,
                               "resources.train.gpus": GPUS, **jobs})
    sh(repo, "git", "init", "-q")
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "tiny")
    return repo


def job(job_id: str) -> dict[str, str]:
    """``scontrol show job``'s fields (the cluster keeps finished jobs for 10 minutes: MinJobAge)."""
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, check=True).stdout
    return dict(field.split("=", 1) for field in out.split() if "=" in field)


def test_each_stage_is_a_slurm_job_with_its_resources_and_the_outputs_equal_a_local_run(cluster, tmp_path):
    local, slurm = project(tmp_path / "local"), project(tmp_path / "slurm")
    sh(local, "snakemake", "--profile", "workflow/profiles/local", "report")
    out = sh(slurm, "snakemake", "--profile", "workflow/profiles/slurm", *SLURM_ARGS, "report")

    # One SLURM job per stage, each finished, each with its stage's request.
    submitted = dict(re.findall(r"rule_(\w+)/(\d+)\.log", out))
    assert set(submitted) == set(STAGES), out[-3000:]
    params = yaml.safe_load((slurm / "params/detpipe.yaml").read_text())["resources"]
    for stage, job_id in submitted.items():
        fields = job(job_id)
        assert fields["JobState"] == "COMPLETED", (stage, fields)
        assert fields["NumCPUs"] == str(params[stage]["threads"]), (stage, fields["NumCPUs"])
        assert fields["MinMemoryNode"] == f"{params[stage]['mem_mb']}M", (stage, fields["MinMemoryNode"])
        assert fields["TimeLimit"] == "00:30:00", (stage, fields["TimeLimit"])
        gpus = re.search(r"gpu:(\d+)", fields.get("TresPerJob", "") + fields.get("TresPerNode", ""))
        assert (int(gpus.group(1)) if gpus else 0) == params[stage]["gpus"], (stage, fields)
    # The train job ran the stage under torchrun: two processes making one MLflow run.
    run_id = json.loads((slurm / "runs/train/run.json").read_text())["run_id"]
    assert tracking._client(slurm).get_run(run_id).data.tags["processes"] == str(GPUS)

    # The same outputs as the local run (one machine, same params, same thread count).
    same = ["data/raw", "data/coco", "runs/eval/predictions.json", "runs/eval/per_class.csv",
            "runs/eval/analysis.json", "runs/eval/plots"]
    assert tree_hashes(slurm, same) == tree_hashes(local, same)
    metrics = [json.loads((repo / "runs/eval/metrics.json").read_text()) for repo in (local, slurm)]
    assert metrics[0] == metrics[1]
    logs = [(repo / "runs/train/train_log.csv").read_text().splitlines() for repo in (local, slurm)]
    loss = [[row.split(",")[:2] for row in log] for log in logs]
    assert loss[0] == loss[1]
    assert (slurm / "reports/index.html").stat().st_size > 0

    # Resources are not params: changing one reruns nothing ...
    text = (slurm / "params/detpipe.yaml").read_text()
    data = yaml.safe_load(text)
    data["resources"]["train"]["threads"] = 64
    (slurm / "params/detpipe.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    assert "Nothing to be done" in sh(slurm, "snakemake", "--profile", "workflow/profiles/slurm", *SLURM_ARGS, "-n",
                                      "report")
    # ... and a job the cluster cannot hold is refused at submission, with SLURM's reason, not left pending.
    refused = sh(slurm, "snakemake", "--profile", "workflow/profiles/slurm", *SLURM_ARGS, "--forcerun", "train",
                 "report", check=False)
    assert "More processors requested than permitted" in refused, refused[-3000:]


def test_the_cluster_script_refuses_what_would_break_a_cluster(cluster, tmp_path):
    """One line and a non-zero exit: bad arguments, a second cluster while one runs (its config untouched)."""
    def script(*args):
        return subprocess.run([*as_root(), CLUSTER, *map(str, args)], capture_output=True, text=True)

    conf = Path("/etc/slurm/slurm.conf").read_text()
    running = f"a cluster started by this script is running (folder {cluster}"
    for args, message in [(("start", tmp_path / "a", "two"), "GPUS must be a whole number, got 'two'"),
                          (("stop", tmp_path / "missing"), f"no such folder: {tmp_path / 'missing'}"),
                          ((), "usage:"),
                          (("start", tmp_path / "b"), running)]:
        result = script(*args)
        assert result.returncode == 1 and result.stderr.count("\n") == 1, (args, result.stderr)
        assert result.stderr.startswith("slurm-cluster: ") and message in result.stderr, (args, result.stderr)
    assert Path("/etc/slurm/slurm.conf").read_text() == conf
    assert subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True).stdout.strip() == "idle"
