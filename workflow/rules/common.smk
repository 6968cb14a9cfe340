# Shared by every rule: stage definitions come from detpipe/pipeline.py, the same source as dvc.yaml.
import glob
import os
import time
import uuid

from detpipe.config import load as load_params
from detpipe.errors import DetpipeError
from detpipe.pipeline import PARAMS, PLUGINS, STAGES, param_values

# The params are validated up front: a bad key stops the workflow here, in one line, before any job starts.
try:
    PARAMS_CFG = load_params(PARAMS)
except DetpipeError as err:
    raise WorkflowError(str(err)) from None

# One id per snakemake invocation, in every rule's environment: the MLflow runs it starts carry it as the tag
# snakemake_run (docs/tracking.md). setdefault: a Snakefile parsed again in a job keeps the invocation's id.
os.environ.setdefault("DETPIPE_SNAKEMAKE_RUN", time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6])


def stage_input(name):
    """The stage's code (script and the library modules it loads) and its data, by name.

    The format-plugin folder counts by its Python files (DVC hashes the folder, minus .dvcignore).
    """
    stage = STAGES[name]
    data = [f for dep in stage.deps for f in (sorted(glob.glob(f"{PLUGINS}/*.py")) if dep == PLUGINS else [dep])]
    return {"code": stage.code, "data": data}


def stage_output(name):
    s = STAGES[name]
    return [directory(o) if o in s.dir_outs else o for o in [*s.outs, *s.metrics]]


def stage_params(name):
    """Passed through `params:` so a changed value reruns the rule (a value read elsewhere would not)."""
    return lambda wildcards: param_values(name)


def stage_shell(name):
    """The stage's command, exactly as in dvc.yaml; its output also goes to the rule's log."""
    return f"{STAGES[name].cmd} 2>&1 | tee {{log}}"


def stage_threads(name):
    return PARAMS_CFG.resources[name]["threads"]


def stage_resources(name):
    """What the stage's job asks a cluster for (params/detpipe.yaml `resources`): memory, minutes, GPUs.

    The SLURM executor turns them into sbatch's --mem, --time and --gpus (workflow/profiles/slurm).
    """
    job = PARAMS_CFG.resources[name]
    return {"mem_mb": job["mem_mb"], "runtime": job["runtime"], "gpu": job["gpus"]}
