"""Which stages each tool reruns after an edit, checked against a table written here (not read from the code).

Both tools record a run of the real Snakefile and dvc.yaml whose commands are answered by tests/fake_stage.py
(a ``python`` first on PATH), so no stage does real work; then each edit is judged by ``snakemake --dry-run``
(the whole plan: the edited stages and everything after them) and ``dvc status`` (the stages whose own code,
params or data changed; DVC decides about later stages when their inputs have really changed).
"""

import os
import subprocess

import pytest
import yaml

from tests.conftest import BIN, copy_repo

ORDER = ["download", "convert", "train", "evaluate", "report"]
ALL = set(ORDER)
MODEL_STAGES = {"train", "evaluate"}

# edit -> the stages whose own inputs it changes. Params sections are edited in params/detpipe.yaml.
PARAM_EDITS = {
    "experiment": ({"train", "report"}, "other"),
    "seed": ({"train"}, 1),
    "device": (MODEL_STAGES, "cpu"),
    "threads": (MODEL_STAGES, 1),
    "dataset": ({"download", "convert"}, "kitti_tiny"),
    "preset": (ALL, "kitti_tiny_faster_rcnn"),
    "download.retries": ({"download"}, 1),
    "convert.min_box_size": ({"convert"}, 3),
    "model.fpn_channels": ({"train"}, 96),
    "train.lr": ({"train"}, 0.5),
    "evaluate.score_thr": ({"evaluate"}, 0.5),
    "evaluate.backend": (MODEL_STAGES, "pycocotools"),  # train's validation scores with it too
    "report.score_thr": ({"report"}, 0.5),
}
CODE_EDITS = {
    "detpipe/visualize.py": {"report"},
    "detpipe/report.py": {"report"},
    "stages/report.py": {"report"},
    "detpipe/formats/voc.py": {"convert"},
    "detpipe/conversion.py": {"convert"},
    "workflow/formats/kitti_tiny_tutorial.py": {"convert"},
    "detpipe/archives.py": {"download"},
    "detpipe/synthetic.py": {"download"},
    "detpipe/engine.py": MODEL_STAGES,
    "detpipe/transforms.py": MODEL_STAGES,
    "detpipe/models.py": MODEL_STAGES,
    "detpipe/train.py": {"train"},
    "detpipe/evaluate.py": {"evaluate"},
    "detpipe/analysis.py": {"evaluate"},
    "detpipe/tracking.py": {"train", "evaluate", "report"},
    "detpipe/images.py": {"train", "evaluate", "report"},
    "detpipe/config.py": ALL,
    "detpipe/apis.py": set(),
    "detpipe/compare.py": set(),  # a command for people, in no stage
}


def after(stages: set[str]) -> set[str]:
    """Snakemake's plan: the chain is linear, so everything from the first edited stage on."""
    return set(ORDER[min(ORDER.index(s) for s in stages):]) if stages else set()


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("reruns")
    repo = copy_repo(root / "repo")
    fake = root / "bin"
    fake.mkdir()
    (fake / "python").write_text(f"#!/bin/sh\nexec {BIN / 'python'} {repo / 'tests/fake_stage.py'} \"$@\"\n")
    (fake / "python").chmod(0o755)
    env = {**os.environ, "PATH": f"{fake}:{BIN}:{os.environ['PATH']}", "PYTHONPATH": str(repo)}
    run = lambda *cmd: subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, check=True).stdout
    run("git", "init", "-q")
    run("snakemake", "--cores", "1", "report")
    run("dvc", "repro", "-q")
    return repo, run


def plans(repo, run) -> tuple[set[str], set[str]]:
    out = run("snakemake", "--cores", "1", "--dry-run", "report")
    snakemake = set()
    if "Nothing to be done" not in out:
        table = out.split("Job stats:")[1].split("total")[0]
        snakemake = {line.split()[0] for line in table.splitlines()[3:] if line.strip()}
    status = run("dvc", "status")
    dvc = {line.split(":")[0] for line in status.splitlines() if line and not line.startswith((" ", "\t"))}
    return snakemake, dvc - {"Data and pipelines are up to date."}


def test_nothing_reruns_after_a_recorded_run(repo):
    assert plans(*repo) == (set(), set())


@pytest.mark.parametrize("key", list(PARAM_EDITS))
def test_a_param_edit_reruns_the_stages_that_read_it(repo, key):
    repo, run = repo
    expected, value = PARAM_EDITS[key]
    path = repo / "params/detpipe.yaml"
    original = path.read_text()
    data = yaml.safe_load(original)
    *parents, leaf = key.split(".")
    node = data
    for part in parents:
        node = node[part]
    node[leaf] = value
    try:
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        assert plans(repo, run) == (after(expected), expected)
    finally:
        path.write_text(original)


def edited(path):
    """Append a comment to ``path``; afterwards restore its bytes and its time (Snakemake compares times)."""
    class Edit:
        def __enter__(self):
            self.text, self.stat = path.read_text(), path.stat()
            path.write_text(self.text + "\n# edited\n")

        def __exit__(self, *exc):
            path.write_text(self.text)
            os.utime(path, ns=(self.stat.st_atime_ns, self.stat.st_mtime_ns))
    return Edit()


@pytest.mark.parametrize("file", list(CODE_EDITS))
def test_a_code_edit_reruns_the_stages_that_load_it(repo, file):
    repo, run = repo
    expected = CODE_EDITS[file]
    with edited(repo / file):
        assert plans(repo, run) == (after(expected), expected)


def test_the_dataset_registry_reruns_download_and_convert(repo):
    repo, run = repo
    path = repo / "params/datasets.yaml"
    original = path.read_text()
    data = yaml.safe_load(original)
    data["synthetic"]["generate"]["num_val"] += 1
    try:
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        assert plans(repo, run) == (ALL, {"download", "convert"})
    finally:
        path.write_text(original)


def test_a_preset_file_reruns_every_stage(repo):
    """A preset may set any key, so each stage reads every preset file whole (selected or not)."""
    repo, run = repo
    path = repo / "params/presets/balloon_mask_rcnn.yaml"
    original = path.read_text()
    try:
        path.write_text(original.replace("epochs: 12", "epochs: 13"))
        assert plans(repo, run) == (ALL, ALL)
    finally:
        path.write_text(original)
