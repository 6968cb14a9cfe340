"""Snakemake and DVC describe the same stages: both are read from detpipe/pipeline.py."""

import subprocess

from detpipe.pipeline import STAGES, dvc_yaml, param_values
from tests.conftest import BIN, ROOT


def test_dvc_yaml_is_generated_from_the_stage_table():
    assert (ROOT / "dvc.yaml").read_text() == dvc_yaml(), "run: python -m detpipe.pipeline > dvc.yaml"


def test_snakemake_has_one_rule_per_stage_with_the_same_command():
    out = subprocess.run([BIN / "snakemake", "--list-rules"], cwd=ROOT, capture_output=True, text=True, check=True)
    rules = set(out.stdout.split())
    assert set(STAGES) <= rules
    for name, stage in STAGES.items():
        text = (ROOT / f"workflow/rules/{name}.smk").read_text()
        assert f'rule {name}:' in text and f'STAGES["{name}"].cmd' in text
        assert (ROOT / stage.script).is_file()


def test_snakemake_dry_run_chains_all_five_stages(tmp_path):
    out = subprocess.run([BIN / "snakemake", "--cores", "1", "--dry-run", "--forceall", "report"], cwd=ROOT,
                         capture_output=True, text=True, check=True)
    for name in STAGES:
        assert f"rule {name}:" in out.stdout or f"{name}" in out.stdout.split("Job stats:")[-1]


def test_every_stage_declares_the_library_and_its_script():
    text = dvc_yaml()
    for name, stage in STAGES.items():
        block = text.split(f"  {name}:\n", 1)[1]
        assert f"- {stage.script}" in block.split("params:")[0] and "- detpipe" in block.split("params:")[0]


def test_param_values_select_keys():
    values = param_values("train", ROOT)
    assert set(values["params/detpipe.yaml"]) == {"experiment", "seed", "device", "threads", "model", "train"}
