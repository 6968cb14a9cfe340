"""VIA: the region attribute that holds the class, named by the ``label_key`` option or found without it."""

import json

import pytest

from detpipe.conversion import convert_dataset
from detpipe.errors import DetpipeError
from detpipe.formats import via
from tests.fixtures import make_image

SQUARE = [[2, 2, 20, 2, 20, 20, 2, 20]]


def via_set(root, attributes, splits=("train", "val")):
    """One image per split with one region per entry of ``attributes`` (its ``region_attributes``), written by the
    VIA writer and then given those attributes in place of the writer's ``label``."""
    image = make_image(root.parent / "source.jpg", 32, 24)
    records = {split: [{"filename": f"{split}.jpg", "ann": {"bboxes": [[2, 2, 20, 20]] * len(attributes),
                                                            "labels": [0] * len(attributes),
                                                            "masks": [SQUARE] * len(attributes)}}]
               for split in splits}
    via.write(root, records, ["unused"], lambda rec: image)
    for split in splits:
        path = root / split / via.ANNOTATION_FILE
        entries = json.loads(path.read_text())
        for entry in entries.values():
            for region, attrs in zip(entry["regions"], attributes):
                region["region_attributes"] = attrs
        path.write_text(json.dumps(entries))
    return root


def labels(out, split="train"):
    coco = json.loads((out / f"{split}.json").read_text())
    names = {c["id"]: c["name"] for c in coco["categories"]}
    return [names[a["category_id"]] for a in coco["annotations"]]


@pytest.mark.parametrize("key", ["class", "name", "type", "label"])
@pytest.mark.parametrize("classes", [["cat", "dog"], None])
def test_the_one_class_attribute_is_picked(tmp_path, key, classes):
    src = via_set(tmp_path / "raw", [{key: "dog"}, {key: "cat"}])
    stats = convert_dataset("via", src, tmp_path / "out", classes)
    assert labels(tmp_path / "out") == labels(tmp_path / "out", "val") == ["dog", "cat"]
    assert stats["classes"] == (classes or ["dog", "cat"])


def test_the_class_list_tells_text_attributes_apart(tmp_path):
    """VIA's default project has a text ``name`` and a dropdown ``type``: the class list says which is the class."""
    src = via_set(tmp_path / "raw", [{"name": "dog", "type": "unknown"}, {"name": "cat", "type": "toy"}])
    convert_dataset("via", src, tmp_path / "out", ["cat", "dog"])
    assert labels(tmp_path / "out") == ["dog", "cat"]
    src = via_set(tmp_path / "raw2", [{"name": "Rex", "type": "dog"}, {"name": "Tom", "type": "cat"}])
    convert_dataset("via", src, tmp_path / "out2", ["cat", "dog"])
    assert labels(tmp_path / "out2") == ["dog", "cat"]


def test_numbers_and_unset_values_are_no_class_attribute(tmp_path):
    src = via_set(tmp_path / "raw", [{"class": "dog", "score": 0.9, "note": ""}, {"class": "cat", "score": 1}])
    convert_dataset("via", src, tmp_path / "out", None)
    assert labels(tmp_path / "out") == ["dog", "cat"]


def two_candidates_open(src):
    return via_set(src, [{"name": "dog", "type": "pet"}]), None, "more than one could hold the class names"


def two_candidates_both_class_names(src):
    return (via_set(src, [{"name": "dog", "type": "cat"}]), ["cat", "dog"],
            "more than one holds only the classes cat, dog")


def two_candidates_neither_class_names(src):
    return (via_set(src, [{"name": "Rex", "type": "pet"}]), ["cat", "dog"],
            "none holds only the classes cat, dog")


@pytest.mark.parametrize("make", [two_candidates_open, two_candidates_both_class_names,
                                  two_candidates_neither_class_names])
def test_two_candidate_attributes_are_an_error_naming_both_and_the_option(tmp_path, make):
    src, classes, why = make(tmp_path / "raw")
    with pytest.raises(DetpipeError) as err:
        convert_dataset("via", src, tmp_path / "out", classes)
    assert str(err.value) == (f"{src}/train/via_region_data.json: regions have attributes 'name', 'type'; {why}; "
                              "set options: {label_key: <name>} in the dataset's entry in params/datasets.yaml "
                              "(or pass label_key= to the loader)")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


def test_the_option_chooses_the_attribute(tmp_path):
    src = via_set(tmp_path / "raw", [{"name": "Rex", "type": "dog"}, {"name": "Tom", "type": "cat"}])
    convert_dataset("via", src, tmp_path / "out", None, options={"label_key": "type"})
    assert labels(tmp_path / "out") == ["dog", "cat"]
    convert_dataset("via", src, tmp_path / "out2", None, options={"label_key": "name"})
    assert labels(tmp_path / "out2") == ["Rex", "Tom"]


def test_label_wins_where_it_is_one_of_several(tmp_path):
    """Files that worked before, with ``label`` beside other text attributes, read as before."""
    src = via_set(tmp_path / "raw", [{"label": "dog", "note": "blurry"}, {"label": "cat", "note": "ok"}])
    convert_dataset("via", src, tmp_path / "out", None)
    assert labels(tmp_path / "out") == ["dog", "cat"]


def test_balloon_style_label_and_no_attribute_one_class(tmp_path):
    image = make_image(tmp_path / "source.jpg", 32, 24)
    records = {s: [{"filename": f"{s}.jpg", "ann": {"bboxes": [[2, 2, 20, 20]], "labels": [0], "masks": [SQUARE]}}]
               for s in ("train", "val")}
    via.write(tmp_path / "raw", records, ["balloon"], lambda rec: image)
    assert convert_dataset("via", tmp_path / "raw", tmp_path / "out", ["balloon"])["splits"]["train"]["objects"] == 1
    src = via_set(tmp_path / "bare", [{}])  # the balloon set itself: no region attributes, one class
    convert_dataset("via", src, tmp_path / "out2", ["balloon"])
    assert labels(tmp_path / "out2") == ["balloon"]


def test_checkbox_attribute(tmp_path):
    src = via_set(tmp_path / "raw", [{"kind": {"dog": True, "cat": False}}, {"kind": {"cat": True}}])
    convert_dataset("via", src, tmp_path / "out", ["cat", "dog"])
    assert labels(tmp_path / "out") == ["dog", "cat"]
    src = via_set(tmp_path / "raw2", [{"kind": {"dog": True, "cat": True}}])
    with pytest.raises(DetpipeError) as err:
        convert_dataset("via", src, tmp_path / "out2", ["cat", "dog"])
    assert str(err.value) == (f"{src}/train/via_region_data.json: train.jpg region 0: 'kind' region attribute has "
                              "more than one box ticked (dog, cat)")


def test_a_value_that_is_no_class_name_is_named(tmp_path):
    src = via_set(tmp_path / "raw", [{"class": "dog"}, {"class": ["cat"]}])
    with pytest.raises(DetpipeError) as err:
        convert_dataset("via", src, tmp_path / "out", ["cat", "dog"], options={"label_key": "class"})
    assert str(err.value) == (f"{src}/train/via_region_data.json: train.jpg region 1: 'class' region attribute is "
                              "['cat'], not a class name")
