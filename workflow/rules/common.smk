# Shared by every rule: stage definitions come from detpipe/pipeline.py, the same source as dvc.yaml.
import glob
import os
import time
import uuid

from detpipe.pipeline import PLUGINS, STAGES, param_values

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
    return STAGES[name].cmd + " 2>&1 | tee {log}"
