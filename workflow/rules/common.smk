# Shared by every rule: stage definitions come from detpipe/pipeline.py, the same source as dvc.yaml.
import glob

from detpipe.pipeline import PLUGINS, STAGES, param_values

LIBRARY = sorted(glob.glob("detpipe/**/*.py", recursive=True))


def stage_input(name):
    """The stage's script, every library file (a library edit reruns the stage) and its data inputs.

    The format-plugin folder counts by its Python files (DVC hashes the folder, minus .dvcignore).
    """
    deps = [d for dep in STAGES[name].deps for d in (sorted(glob.glob(f"{PLUGINS}/*.py")) if dep == PLUGINS else [dep])]
    return [STAGES[name].script, *LIBRARY, *deps]


def stage_output(name):
    s = STAGES[name]
    return [directory(o) if o in s.dir_outs else o for o in [*s.outs, *s.metrics]]


def stage_params(name):
    """Passed through `params:` so a changed value reruns the rule (a value read elsewhere would not)."""
    return lambda wildcards: param_values(name)
