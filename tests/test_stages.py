"""Stage scripts as a user runs them: bad input ends in one line, exit status 2, and no output."""

import yaml

from tests.conftest import run_stage


def assert_one_line_error(result, *fragments):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_mistyped_key(tiny_params):
    data = yaml.safe_load(tiny_params.read_text())
    data["train"]["lrate"] = data["train"].pop("lr")
    tiny_params.write_text(yaml.safe_dump(data))
    result = run_stage("download", tiny_params.parents[1])
    assert_one_line_error(result, "params/detpipe.yaml", "unknown key train.lrate; did you mean train.lr?")
    assert not (tiny_params.parents[1] / "data").exists()


def test_unknown_model_and_dataset(tiny_params):
    cwd = tiny_params.parents[1]
    assert_one_line_error(run_stage("train", cwd, "--set", "model.name=yolo"), "model.name is 'yolo'")
    assert_one_line_error(run_stage("download", cwd, "--set", "dataset=kitti"), "unknown dataset 'kitti'")
    assert not (cwd / "data").exists() and not (cwd / "runs").exists()


def test_missing_input_folders(tiny_params):
    cwd = tiny_params.parents[1]
    assert_one_line_error(run_stage("convert", cwd), "data/raw", "does not exist")
    assert_one_line_error(run_stage("train", cwd), "data/coco/train.json", "missing")
    assert_one_line_error(run_stage("evaluate", cwd), "runs/train/model.pt", "missing")
    assert_one_line_error(run_stage("report", cwd), "data/coco", "missing")
    assert sorted(p.name for p in cwd.iterdir()) == ["params"]


def test_local_source_missing_folder(tiny_params):
    registry = tiny_params.parent / "datasets.yaml"
    data = yaml.safe_load(registry.read_text())
    data["mine"] = {"source": "local", "format": "via", "classes": ["a"], "path": "/no/such/folder"}
    registry.write_text(yaml.safe_dump(data))
    result = run_stage("download", tiny_params.parents[1], "--set", "dataset=mine")
    assert_one_line_error(result, "mine.path", "/no/such/folder")
    assert not (tiny_params.parents[1] / "data").exists()
