"""Stage scripts as a user runs them: bad input ends in one line, exit status 2, and no output."""

import hashlib
import json
import shutil
import zipfile
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, run_stage, serve_folder
from tests.fixtures import make_image


def assert_one_line_error(result, *fragments):
    """Exit status 2 and one ``error:`` line, last on stderr (a progress bar may come before it), no traceback."""
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and "Traceback" not in result.stderr, result.stderr
    assert sum(line.startswith("error: ") for line in lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[-1]


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
    assert_one_line_error(run_stage("evaluate", cwd), "data/coco/val.json", "missing")
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


def kitti_fixture(root: Path) -> Path:
    """A small KITTI-tiny-like folder: 3 train and 2 val images with Car/Pedestrian/DontCare labels."""
    from detpipe.formats import kitti

    records = [{"filename": f"{i:06d}.jpeg", "ann": {"bboxes": [[4, 5, 30, 25], [40, 10, 60, 38]], "labels": [0, 1],
                                                      "bboxes_ignore": [[0, 0, 8, 8]], "labels_ignore": [-1]}}
               for i in range(5)]
    image = make_image(root.parent / "src.jpeg", 64, 48)
    kitti.write(root, {"train": records[:3], "val": records[3:]}, ["Car", "Pedestrian"], lambda rec: image)
    return root


def test_standalone_convert_and_plugin_format(tmp_path):
    src = kitti_fixture(tmp_path / "kitti_tiny")
    result = run_stage("convert", tmp_path, "--format", "kitti", "--src", str(src), "--out", "built",
                       "--classes", "Car,Pedestrian")
    assert result.returncode == 0, result.stderr
    assert "train: 3 images, 6 objects, 3 ignore regions" in result.stdout
    builtin = json.loads((tmp_path / "built/train_middle.json").read_text())
    # The tutorial's loader, registered from the project's workflow/formats/, gives the same records.
    shutil.copytree(ROOT / "workflow/formats", tmp_path / "workflow/formats")
    result = run_stage("convert", tmp_path, "--format", "kitti_tiny_tutorial", "--src", str(src), "--out", "plugin",
                       "--classes", "Car,Pedestrian")
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "plugin/train_middle.json").read_text()) == builtin
    assert builtin[0]["ann"]["labels_ignore"] == [-1]


def test_standalone_convert_errors(tmp_path):
    src = kitti_fixture(tmp_path / "kitti_tiny")
    assert_one_line_error(run_stage("convert", tmp_path, "--format", "kiti", "--src", str(src), "--out", "o"),
                          "unknown format 'kiti'; did you mean kitti?")
    label = src / "training/label_2/000001.txt"
    label.write_text(label.read_text() + "Bus 0.00 0 0.00 1 1 9 9 0 0 0 0 0 0 0\n")
    assert_one_line_error(run_stage("convert", tmp_path, "--format", "kitti", "--src", str(src), "--out", "o",
                                    "--classes", "Car,Pedestrian"), "000001.txt:4: unknown class 'Bus'")
    (tmp_path / "workflow/formats").mkdir(parents=True)
    (tmp_path / "workflow/formats/broken.py").write_text("import no_such_module\n")
    assert_one_line_error(run_stage("convert", tmp_path, "--format", "kitti", "--src", str(src), "--out", "o"),
                          "workflow/formats/broken.py: cannot import format plugin")
    assert not (tmp_path / "o").exists()


@pytest.fixture
def http_root(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    with serve_folder(root) as (base, _):
        yield root, base


def zip_folder(folder: Path, archive: Path) -> str:
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(folder.rglob("*")):
            zf.write(path, path.relative_to(folder.parent).as_posix())
    return hashlib.sha256(archive.read_bytes()).hexdigest()


def test_registry_entry_downloads_and_converts_a_served_archive(tiny_params, http_root):
    """A user's url entry, as docs/datasets.md shows: served zip -> data/raw -> data/coco; a rerun fetches nothing."""
    www, base = http_root
    cwd = tiny_params.parents[1]
    sha = zip_folder(kitti_fixture(cwd / "fixture/kitti_tiny"), www / "kitti_tiny.zip")
    registry = tiny_params.parent / "datasets.yaml"
    data = yaml.safe_load(registry.read_text())
    data["kitti_tiny"]["archives"] = [{"url": f"{base}/kitti_tiny.zip", "sha256": sha, "subdir": "kitti_tiny"}]
    registry.write_text(yaml.safe_dump(data))
    args = ("--set", "dataset=kitti_tiny", "--set", f"download.cache={cwd / 'cache'}")
    result = run_stage("download", cwd, *args)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (cwd / "data/raw").iterdir()) == [".download.json", "train.txt", "training",
                                                                     "val.txt"]
    (www / "kitti_tiny.zip").unlink()  # a rerun must not need the server
    result = run_stage("download", cwd, *args)
    assert result.returncode == 0 and "already downloaded and verified" in result.stdout, result.stderr
    shutil.rmtree(cwd / "data/raw")  # as DVC and Snakemake do before rerunning the stage: the cache answers
    result = run_stage("download", cwd, *args)
    assert result.returncode == 0, result.stderr
    result = run_stage("convert", cwd, *args)
    assert result.returncode == 0, result.stderr
    stats = json.loads((cwd / "data/coco/stats.json").read_text())
    assert stats["classes"] == ["Car", "Pedestrian", "Cyclist"]
    assert stats["splits"]["val"]["objects_per_class"] == {"Car": 2, "Pedestrian": 2, "Cyclist": 0}


def test_standalone_download(tmp_path, http_root):
    www, base = http_root
    sha = zip_folder(kitti_fixture(tmp_path / "fixture/kitti_tiny"), www / "k.zip")
    args = ("--url", f"{base}/k.zip", "--sha256", sha, "--subdir", "kitti_tiny", "--out", "raw",
            "--cache", str(tmp_path / "cache"))
    result = run_stage("download", tmp_path, *args)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "raw/training/label_2/000000.txt").is_file()
    bad = run_stage("download", tmp_path, *args[:3], "0" * 64, *args[4:7], "other", *args[8:])
    assert_one_line_error(bad, f"sha256 mismatch: expected {'0' * 64}, got {sha}")
    assert not (tmp_path / "other").exists()
    assert_one_line_error(run_stage("download", tmp_path, "--url", f"{base}/k.zip", "--out", "x"),
                          "--sha256 is required")


def test_plugin_format_selected_in_params(tiny_params):
    """A local dataset in the tutorial's custom format, chosen by name in params/datasets.yaml."""
    cwd = tiny_params.parents[1]
    shutil.copytree(ROOT / "workflow/formats", cwd / "workflow/formats")
    kitti_fixture(cwd / "mine")
    registry = tiny_params.parent / "datasets.yaml"
    data = yaml.safe_load(registry.read_text())
    data["mine"] = {"source": "local", "path": str(cwd / "mine"), "format": "kitti_tiny_tutorial",
                    "classes": ["Car", "Pedestrian"]}
    registry.write_text(yaml.safe_dump(data))
    for stage in ("download", "convert"):
        result = run_stage(stage, cwd, "--set", "dataset=mine")
        assert result.returncode == 0, result.stderr
    stats = json.loads((cwd / "data/coco/stats.json").read_text())
    assert stats["format"] == "kitti_tiny_tutorial" and stats["splits"]["train"]["objects"] == 6
    data["mine"]["format"] = "kitti_tiny_tutorail"
    registry.write_text(yaml.safe_dump(data))
    assert_one_line_error(run_stage("convert", cwd, "--set", "dataset=mine"),
                          "mine: unknown format 'kitti_tiny_tutorail'; did you mean kitti_tiny_tutorial?")


@pytest.mark.slow
def test_kitti_dataset_through_every_stage(tiny_params):
    """A real format with ignore regions and a class absent from val goes through train, evaluate and report."""
    cwd = tiny_params.parents[1]
    kitti_fixture(cwd / "mine")
    registry = tiny_params.parent / "datasets.yaml"
    data = yaml.safe_load(registry.read_text())
    data["mine"] = {"source": "local", "path": str(cwd / "mine"), "format": "kitti",
                    "classes": ["Car", "Pedestrian", "Cyclist"]}
    registry.write_text(yaml.safe_dump(data))
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{cwd / 'mlflow.db'}"}
    for stage in ("download", "convert", "train", "evaluate", "report"):
        result = run_stage(stage, cwd, "--set", "dataset=mine", env=env)
        assert result.returncode == 0, f"{stage}: {result.stderr}"
    val = json.loads((cwd / "data/coco/val.json").read_text())
    assert sum(a["iscrowd"] for a in val["annotations"]) == 2 * 3  # one DontCare per image, once per class
    rows = (cwd / "runs/eval/per_class.csv").read_text().splitlines()
    assert rows[-1] == "Cyclist,," and len(rows) == 4  # no Cyclist in val: no AP rather than 0
    assert "Cyclist" in (cwd / "reports/index.html").read_text()
