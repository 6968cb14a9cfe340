from pathlib import Path

import pytest
import yaml

from detpipe import config
from detpipe.errors import DetpipeError


def edit(path: Path, fn) -> None:
    data = yaml.safe_load(path.read_text())
    fn(data)
    path.write_text(yaml.safe_dump(data))


def test_repo_params_load_with_dot_access():
    path = Path(__file__).parents[1] / "params/detpipe.yaml"
    cfg = config.load(path)
    assert cfg.train.lr == yaml.safe_load(path.read_text())["train"]["lr"] and cfg.model.name == "fcos"
    assert cfg.data.source == "synthetic" and cfg.data.classes == ["circle", "square", "triangle", "cross"]


def test_overrides_are_parsed_as_yaml(tiny_params):
    cfg = config.load(tiny_params, ["train.lr=0.5", "train.amp=false", "model.name=retinanet"])
    assert cfg.train.lr == 0.5 and cfg.train.amp is False and cfg.model.name == "retinanet"


def test_integer_for_a_float_key_is_accepted(tiny_params):
    assert config.load(tiny_params, ["train.lr=1"]).train.lr == 1.0


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d["train"].pop("lr"), "missing key train.lr"),
    (lambda d: d["train"].update(lrr=0.1), "unknown key train.lrr; did you mean train.lr?"),
    (lambda d: d["train"].update(epochs="ten"), "train.epochs must be an integer, got 'ten'"),
    (lambda d: d["train"].update(epochs=True), "train.epochs must be an integer"),
    (lambda d: d["model"].update(name="yolo"), "model.name is 'yolo'; choose one of"),
    (lambda d: d.update(device="tpu"), "device is 'tpu'; choose one of auto, cpu, cuda"),
    (lambda d: d.update(dataset="ballon"), "unknown dataset 'ballon'"),
])
def test_bad_params_name_the_key(tiny_params, mutate, message):
    edit(tiny_params, mutate)
    with pytest.raises(DetpipeError, match=message.replace("?", r"\?")):
        config.load(tiny_params)


def test_bad_dataset_entry_names_file_and_key(tiny_params):
    registry = tiny_params.parent / "datasets.yaml"
    edit(registry, lambda d: d["synthetic"]["generate"].pop("seed"))
    with pytest.raises(DetpipeError, match=r"datasets.yaml: synthetic: missing key generate.seed"):
        config.load(tiny_params)


def test_malformed_yaml_names_the_line(tmp_path):
    bad = tmp_path / "p.yaml"
    bad.write_text("seed: 0\ntrain:\n  lr: [0.1\n")
    with pytest.raises(DetpipeError, match=r"p.yaml:\d+: malformed YAML"):
        config.load(bad)


def test_missing_params_file(tmp_path):
    with pytest.raises(DetpipeError, match="params file is missing"):
        config.load(tmp_path / "nope.yaml")


def test_bad_override_syntax(tiny_params):
    with pytest.raises(DetpipeError, match="expected KEY=VALUE"):
        config.load(tiny_params, ["train.lr"])


def test_flatten_for_mlflow():
    assert config.flatten({"a": 1, "b": {"c": 2, "d": {"e": 3}}}) == {"a": 1, "b.c": 2, "b.d.e": 3}


def test_every_key_is_documented():
    doc = (Path(__file__).parents[1] / "docs/params.md").read_text()
    for schema in (config.SCHEMA, config.DATASET_SCHEMA, config.ARCHIVE_SCHEMA, *config.SOURCE_SCHEMA.values()):
        for key in config.flatten(schema):
            assert f"`{key}`" in doc, key


def test_exponent_without_a_dot_is_a_number_for_float_keys(tiny_params):
    cfg = config.load(tiny_params, ["train.lr=1e-3", "train.weight_decay=5E-4"])
    assert cfg.train.lr == 0.001 and cfg.train.weight_decay == 0.0005
    with pytest.raises(DetpipeError, match="train.epochs must be an integer, got '1e2'"):
        config.load(tiny_params, ["train.epochs=1e2"])


def test_a_preset_replaces_the_files_keys_and_set_replaces_both(tiny_params):
    import shutil

    shutil.copytree(Path(__file__).parents[1] / "params/presets", tiny_params.parent / "presets")
    cfg = config.load(tiny_params, ["preset=kitti_tiny_faster_rcnn"])
    assert cfg.dataset == "kitti_tiny" and cfg.model.name == "fasterrcnn_resnet50_fpn" and cfg.train.lr == 0.0025
    assert cfg.model.weights == "COCO_V1" and cfg.train.milestones == [8, 11]
    assert cfg.train.momentum == 0.9 and cfg.report.num_samples == 2  # keys the preset leaves alone
    assert cfg.data.format == "kitti"
    cfg = config.load(tiny_params, ["preset=balloon_mask_rcnn", "train.lr=0.001"])
    assert cfg.model.name == "maskrcnn_resnet50_fpn" and cfg.train.lr == 0.001
    edit(tiny_params, lambda d: d.update(preset="balloon_mask_rcnn"))
    assert config.load(tiny_params).dataset == "balloon"


def test_bad_presets_are_one_line(tiny_params):
    presets = tiny_params.parent / "presets"
    presets.mkdir()
    (presets / "mine.yaml").write_text("train:\n  lrr: 0.1\n")
    with pytest.raises(DetpipeError, match=r"presets/mine.yaml: unknown key train.lrr"):
        config.load(tiny_params, ["preset=mine"])
    with pytest.raises(DetpipeError, match=r"preset 'mien': no file .*did you mean mine\? known: mine"):
        config.load(tiny_params, ["preset=mien"])
    (presets / "loop.yaml").write_text("preset: mine\n")
    with pytest.raises(DetpipeError, match="cannot name another preset"):
        config.load(tiny_params, ["preset=loop"])


def test_a_gpu_request_needs_a_gpu_device_and_one_process_per_gpu(tiny_params):
    with pytest.raises(DetpipeError, match="resources.train.gpus asks the cluster for 1 GPU.* but device is cpu"):
        config.load(tiny_params, ["device=cpu", "resources.train.gpus=1"])
    with pytest.raises(DetpipeError, match="train.processes is 3 but resources.train.gpus is 2"):
        config.load(tiny_params, ["device=auto", "resources.train.gpus=2", "train.processes=3"])
    cfg = config.load(tiny_params, ["device=auto", "resources.train.gpus=2", "train.processes=2"])
    assert cfg.resources["train"] == {"threads": 4, "mem_mb": 16000, "runtime": 240, "gpus": 2}


def test_the_resources_section_may_be_left_out(tiny_params):
    data = yaml.safe_load(tiny_params.read_text())
    del data["resources"]
    tiny_params.write_text(yaml.safe_dump(data))
    assert config.load(tiny_params).resources["evaluate"] == {"threads": 2, "mem_mb": 8000, "runtime": 60, "gpus": 0}


def test_an_empty_set_value_is_the_empty_string_and_errors_name_the_set(tiny_params):
    assert config.load(tiny_params, ["train.load_from="]).train.load_from == ""
    assert config.load(tiny_params, ["train.load_from=''"]).train.load_from == ""
    with pytest.raises(DetpipeError, match=r"^\S+detpipe\.yaml --set 'train\.lr=-1': train\.lr must be more than 0"):
        config.load(tiny_params, ["train.lr=-1"])
    with pytest.raises(DetpipeError, match=r"^\S+detpipe\.yaml --set 'train\.lrr=1': unknown key train\.lrr; did"):
        config.load(tiny_params, ["train.lrr=1"])


def test_params_errors_name_every_source_on_one_line(tiny_params):
    presets = tiny_params.parent / "presets"
    presets.mkdir()
    (presets / "bad.yaml").write_text("train:\n  lr: -1\n")
    with pytest.raises(DetpipeError) as error:
        config.load(tiny_params, ["preset=bad", "experiment=a\nb"])
    assert str(error.value) == (f"{tiny_params} + presets/bad.yaml --set 'preset=bad' --set 'experiment=a\\nb': "
                                "train.lr must be more than 0, got -1.0")
    assert config.load(tiny_params, ["resources.train="]).resources.train.gpus == 0  # empty: the defaults
