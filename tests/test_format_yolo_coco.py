"""YOLO and COCO formats: hand-written raw files converted and checked field by field; bad input named."""

import json

import pytest
from pycocotools.coco import COCO

from detpipe.conversion import convert_dataset
from detpipe.errors import DetpipeError
from detpipe.formats import coco, yolo
from tests.fixtures import make_image


def put(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def convert(fmt, tmp_path, classes=None, **kw):
    return convert_dataset(fmt, tmp_path / "raw", tmp_path / "out", classes, **kw)


def output(tmp_path, split, out="out"):
    """(COCO dict, middle-format records) of one split; the COCO file must load in pycocotools."""
    path = tmp_path / out / f"{split}.json"
    COCO(str(path))
    return json.loads(path.read_text()), json.loads((tmp_path / out / f"{split}_middle.json").read_text())


def approx(*lists):
    return [pytest.approx(v, abs=0.01) for v in lists]


def changed(stats, split):
    return {k: v for k, v in stats["splits"][split]["boxes_changed"].items() if v}


YOLO_DATA = "path: .\ntrain: images/train\nval: images/val\nnames: [cat, dog, bird]\n"


def yolo_raw(tmp_path, data=YOLO_DATA):
    raw = tmp_path / "raw"
    put(raw / "data.yaml", data)
    make_image(raw / "images/train/a.jpg", 200, 100)
    make_image(raw / "images/train/b.png", 50, 40)  # no label file: a background image
    make_image(raw / "images/val/c.jpg", 100, 100)
    put(raw / "labels/train/a.txt", "0 0.5 0.5 0.2 0.4\n\n1 0.1 0.1 0.3 0.3 0.2 0.3\n")
    put(raw / "labels/val/c.txt", "2 0.5 0.5 1 1\n")
    return raw


def test_yolo_boxes_and_polygons(tmp_path):
    yolo_raw(tmp_path)
    stats = convert("yolo", tmp_path)
    assert stats["classes"] == ["cat", "dog", "bird"]
    train, middle = output(tmp_path, "train")
    assert train["images"] == [{"id": 1, "file_name": "images/train/a.jpg", "width": 200, "height": 100},
                               {"id": 2, "file_name": "images/train/b.png", "width": 50, "height": 40}]
    assert [c["id"] for c in train["categories"]] == [1, 2, 3]
    box, poly = train["annotations"]
    assert (box["image_id"], box["category_id"], box["iscrowd"]) == (1, 1, 0)
    assert box["bbox"] == approx(80, 30, 40, 40) and box["area"] == pytest.approx(1600)
    assert box["segmentation"] == approx([80, 30, 120, 30, 120, 70, 80, 70])  # a box outline beside a polygon
    assert (poly["image_id"], poly["category_id"], poly["iscrowd"]) == (1, 2, 0)
    assert poly["bbox"] == approx(20, 10, 40, 20)
    assert poly["segmentation"] == approx([20, 10, 60, 30, 40, 30])
    assert poly["area"] == pytest.approx(200)  # the triangle's, not its box's
    assert middle[0]["ann"] == {"bboxes": approx([80, 30, 120, 70], [20, 10, 60, 30]), "labels": [0, 1],
                                "bboxes_ignore": [], "labels_ignore": []}
    assert middle[1] == {"filename": "images/train/b.png", "width": 50, "height": 40,
                         "ann": {"bboxes": [], "labels": [], "bboxes_ignore": [], "labels_ignore": []}}
    assert changed(stats, "train") == {"images_without_labels": 1}
    assert stats["splits"]["train"]["objects_per_class"] == {"cat": 1, "dog": 1, "bird": 0}
    val, _ = output(tmp_path, "val")
    assert [(a["category_id"], a["bbox"]) for a in val["annotations"]] == [(3, approx(0, 0, 100, 100))]


def test_yolo_names_dict_txt_lists_and_a_subset_by_name(tmp_path):
    raw = tmp_path / "raw"
    put(raw / "data.yaml", "train: train.txt\nval: val.txt\nnames:\n  0: cat\n  1: dog\n  2: bird\n")
    for name in "abcd":
        make_image(raw / f"images/{name}.jpg", 100, 50)
    put(raw / "labels/a.txt", "0 0.5 0.5 0.2 0.2\n1 0.5 0.5 0.4 0.4\n")
    put(raw / "labels/b.txt", "2 0.25 0.5 0.5 1\n")
    put(raw / "labels/c.txt", "1 0.5 0.5 1 1\n")
    put(raw / "labels/d.txt", "0 0.5 0.5 1 1\n")  # d is in neither list: skipped, yet not a label without image
    put(raw / "train.txt", "images/a.jpg\n./images/b.jpg\n")
    put(raw / "val.txt", "images/c.jpg\n")
    stats = convert("yolo", tmp_path, ["bird", "cat"])
    train, middle = output(tmp_path, "train")
    assert [c["name"] for c in train["categories"]] == ["bird", "cat"]
    assert [i["file_name"] for i in train["images"]] == ["images/a.jpg", "images/b.jpg"]
    assert [(a["image_id"], a["category_id"], a["bbox"]) for a in train["annotations"]] == [
        (1, 2, approx(40, 20, 20, 10)), (2, 1, approx(0, 0, 50, 50))]
    assert [r["ann"]["labels"] for r in middle] == [[1], [0]]
    val, _ = output(tmp_path, "val")
    assert len(val["images"]) == 1 and val["annotations"] == []  # the image stays, its dog is dropped
    assert changed(stats, "train") == changed(stats, "val") == {"dropped_unselected_class": 1}
    assert convert("yolo", tmp_path)["classes"] == ["cat", "dog", "bird"]  # no classes given: the YAML's, in order


@pytest.mark.parametrize("mode, orientation", [("L", None), ("P", None), ("RGBA", None), ("I;16", None), ("RGB", 6)])
def test_yolo_denormalizes_by_the_displayed_size(tmp_path, mode, orientation):
    raw = tmp_path / "raw"
    put(raw / "dataset.yaml", "train: images/train\nnames: [cat]\n")  # no val: the core splits with a seed
    for name in ("x", "y"):
        suffix = ".jpg" if orientation else ".png"
        make_image(raw / f"images/train/{name}{suffix}", 200, 100, mode, orientation=orientation)
        put(raw / f"labels/train/{name}.txt", "0 0.5 0.5 0.5 0.5\n")
    stats = convert("yolo", tmp_path)
    for split in ("train", "val"):
        data, _ = output(tmp_path, split)
        assert [(i["width"], i["height"]) for i in data["images"]] == [(200, 100)]
        assert [a["bbox"] for a in data["annotations"]] == [approx(50, 25, 100, 50)]
        assert changed(stats, split) == {}


def yolo_error(tmp_path, message, classes=None):
    with pytest.raises(DetpipeError, match=message):
        convert("yolo", tmp_path, classes)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("path, text, message", [
    ("labels/train/a.txt", "0 0.5 0.5 0.2 0.4\n0 0.5 0.5 0.2\n", r"labels/train/a.txt:2: 4 fields; expected"),
    ("labels/train/a.txt", "0 0.5 0.5 0.2 0.4 0.1\n", r"labels/train/a.txt:1: 6 fields; expected"),
    ("labels/train/a.txt", "0 0.5 half 0.2 0.4\n", r"labels/train/a.txt:1: not numbers: '0 0.5 half 0.2 0.4'"),
    ("labels/train/a.txt", "0 0.5 0.5 0.2 0.4\n3 0.5 0.5 0.2 0.4\n",
     r"labels/train/a.txt:2: class 3 is not an index 0..2 of the data YAML's names"),
    ("labels/val/zz.txt", "0 0.5 0.5 0.2 0.4\n", r"raw: 1 label file\(s\) without an image: labels/val/zz.txt$"),
    ("images/train/a.jpg", "not a JPEG", r"images/train/a.jpg: not a readable image"),
    ("data.yaml", "train: images/train\nnames: [cat, dog\n", r"data.yaml:3: malformed YAML"),
    ("data.yaml", "train: images/train\nval: images/nowhere\nnames: [cat]\n",
     r"data.yaml: val: 'images/nowhere' is neither an image folder nor a .txt list"),
    ("dataset.yaml", YOLO_DATA,
     r"raw: need one data YAML \(data.yaml or dataset.yaml\); found data.yaml, dataset.yaml; name it with options"),
])
def test_bad_yolo_input_is_named(tmp_path, path, text, message):
    put(yolo_raw(tmp_path) / path, text)
    yolo_error(tmp_path, message)


def test_yolo_labels_without_images_are_listed(tmp_path):
    raw = yolo_raw(tmp_path)
    for i in range(7):
        put(raw / f"labels/train/o{i}.txt", "0 0.5 0.5 0.2 0.4\n")
    yolo_error(tmp_path, r"7 label file\(s\) without an image: labels/train/o0.txt, labels/train/o1.txt, "
                         r"labels/train/o2.txt, labels/train/o3.txt, labels/train/o4.txt \(and 2 more\)")


def test_yolo_unknown_class_names_the_yaml(tmp_path):
    yolo_raw(tmp_path)
    yolo_error(tmp_path, r"data.yaml: unknown class 'zebra'; the data YAML's names are cat, dog, bird",
               ["cat", "zebra"])


def test_yolo_empty_dataset(tmp_path):
    put(tmp_path / "raw/data.yaml", "train: images/train\nnames: [cat]\n")
    (tmp_path / "raw/images/train").mkdir(parents=True)
    yolo_error(tmp_path, r"raw: no annotated images found for format 'yolo'")


COCO_CATEGORIES = '[{"id": 0, "name": "person"}, {"id": 3, "name": "car"}, {"id": 7, "name": "truck"}]'
COCO_TRAIN = """{
 "images": [{"id": 10, "file_name": "a.jpg", "width": 100, "height": 80},
            {"id": 11, "file_name": "b.jpg", "width": 100, "height": 80}],
 "annotations": [
  {"id": 1, "image_id": 10, "category_id": 0, "bbox": [10, 10, 20, 30], "iscrowd": 0,
   "segmentation": [[10, 10, 30, 10, 30, 40]]},
  {"id": 2, "image_id": 10, "category_id": 3, "bbox": [50, 5.5, 40, 20.25], "iscrowd": 0, "segmentation": []},
  {"id": 3, "image_id": 11, "category_id": 7, "bbox": [0, 0, 10, 10], "iscrowd": 1,
   "segmentation": {"size": [80, 100], "counts": [0, 10, 70]}},
  {"id": 4, "image_id": 11, "category_id": 3, "bbox": [60, 40, 30, 30], "iscrowd": 0,
   "segmentation": {"size": [80, 100], "counts": "PPYo0"}}
 ],
 "categories": """ + COCO_CATEGORIES + "\n}"
COCO_VAL = """{"images": [{"id": 1, "file_name": "c.jpg", "width": 64, "height": 48}],
 "annotations": [{"id": 1, "image_id": 1, "category_id": 7, "bbox": [4, 4, 8, 8], "iscrowd": 0}],
 "categories": """ + COCO_CATEGORIES + "}"


def coco_raw(tmp_path, train=COCO_TRAIN):
    raw = tmp_path / "raw"
    put(raw / "annotations/instances_train2017.json", train)
    put(raw / "annotations/instances_val2017.json", COCO_VAL)
    make_image(raw / "train2017/a.jpg", 100, 80)
    make_image(raw / "train2017/b.jpg", 100, 80)
    make_image(raw / "val2017/c.jpg", 64, 48)
    return raw


def test_coco_pass_through_with_category_id_0(tmp_path):
    coco_raw(tmp_path)
    stats = convert("coco", tmp_path)
    assert stats["classes"] == ["person", "car", "truck"]  # in id order; ids 0, 3, 7 become 1, 2, 3
    train, middle = output(tmp_path, "train")
    assert [c["id"] for c in train["categories"]] == [1, 2, 3]
    assert train["images"][0] == {"id": 1, "file_name": "train2017/a.jpg", "width": 100, "height": 80}
    poly, box, rle, crowd = train["annotations"]
    assert (poly["image_id"], poly["category_id"], poly["iscrowd"], poly["bbox"]) == (1, 1, 0, [10, 10, 20, 30])
    assert poly["segmentation"] == [[10, 10, 30, 10, 30, 40]] and poly["area"] == pytest.approx(300)
    assert (box["category_id"], box["bbox"], box["area"]) == (2, approx(50, 5.5, 40, 20.25), pytest.approx(810))
    assert box["segmentation"] == approx([50, 5.5, 90, 5.5, 90, 25.75, 50, 25.75])
    assert (rle["image_id"], rle["category_id"], rle["iscrowd"], rle["bbox"]) == (2, 2, 0, [60, 40, 30, 30])
    assert (crowd["image_id"], crowd["category_id"], crowd["iscrowd"], crowd["bbox"]) == (2, 3, 1, [0, 0, 10, 10])
    assert middle[1] == {"filename": "train2017/b.jpg", "width": 100, "height": 80,
                         "ann": {"bboxes": [[60, 40, 90, 70]], "labels": [1],
                                 "bboxes_ignore": [[0, 0, 10, 10]], "labels_ignore": [2]}}
    assert changed(stats, "train") == {"ignored_crowd": 1, "rle_mask_dropped": 1}
    assert stats["splits"]["train"]["ignored"] == 1
    val, _ = output(tmp_path, "val")
    assert val["images"] == [{"id": 1, "file_name": "val2017/c.jpg", "width": 64, "height": 48}]
    assert [(a["category_id"], a["bbox"]) for a in val["annotations"]] == [(3, [4, 4, 8, 8])]


def test_coco_remap_merges_two_categories(tmp_path):
    coco_raw(tmp_path)
    options = {"remap": {"car": "vehicle", "truck": "vehicle"}}
    convert("coco", tmp_path, ["vehicle", "person"], options=options)
    train, _ = output(tmp_path, "train")
    assert [c["name"] for c in train["categories"]] == ["vehicle", "person"]
    assert [a["category_id"] for a in train["annotations"]] == [2, 1, 1, 1]
    assert convert("coco", tmp_path, options=options)["classes"] == ["person", "vehicle"]


def test_coco_subset_drops_other_categories_and_keeps_images(tmp_path):
    coco_raw(tmp_path)
    stats = convert("coco", tmp_path, ["car"])
    train, middle = output(tmp_path, "train")
    assert len(train["images"]) == 2
    assert [(a["image_id"], a["category_id"]) for a in train["annotations"]] == [(1, 1), (2, 1)]
    assert middle[1]["ann"]["bboxes_ignore"] == []  # the crowd was a truck
    assert changed(stats, "train") == {"dropped_unselected_class": 2, "rle_mask_dropped": 1}
    val, _ = output(tmp_path, "val")
    assert len(val["images"]) == 1 and val["annotations"] == []


def test_coco_single_file_is_split_with_a_seed(tmp_path):
    raw = tmp_path / "raw"
    images = ", ".join(f'{{"id": {i}, "file_name": "{i}.jpg"}}' for i in range(5))
    put(raw / "annotations/instances_val2017.json",
        f'{{"images": [{images}], "annotations": [], "categories": {COCO_CATEGORIES}}}')
    for i in range(5):
        make_image(raw / f"val2017/{i}.jpg", 32, 24, seed=i)
    names = []
    for out in ("out", "again"):
        convert_dataset("coco", raw, tmp_path / out, None, val_fraction=0.2, seed=3)
        names.append({s: [i["file_name"] for i in output(tmp_path, s, out)[0]["images"]] for s in ("train", "val")})
    assert names[0] == names[1]
    assert len(names[0]["val"]) == 1
    assert sorted(names[0]["train"] + names[0]["val"]) == [f"val2017/{i}.jpg" for i in range(5)]


def test_coco_image_kinds_take_the_displayed_size(tmp_path):
    raw = tmp_path / "raw"
    kinds = [("k0.png", "L", None), ("k1.png", "P", None), ("k2.png", "RGBA", None), ("k3.png", "I;16", None),
             ("k4.jpg", "RGB", 6), ("k5.jpg", "RGB", 8)]
    for name, mode, orientation in kinds:
        make_image(raw / "pics" / name, 60, 40, mode, orientation=orientation)
    images = [{"id": i, "file_name": name, "width": 60, "height": 40} for i, (name, _, _) in enumerate(kinds)]
    images[-1].update(width=40, height=60)  # the stored size, not the displayed one
    anns = [{"id": i, "image_id": i, "category_id": 3, "bbox": [10, 10, 30, 20], "iscrowd": 0} for i in range(6)]
    categories = json.loads(COCO_CATEGORIES)
    put(raw / "ann.json", json.dumps({"images": images, "annotations": anns, "categories": categories}))
    stats = convert("coco", tmp_path, ["car"], splits={"all": "ann.json"}, options={"images": "pics"})
    out = [output(tmp_path, split)[0] for split in ("train", "val")]
    assert sorted(i["file_name"] for d in out for i in d["images"]) == [f"pics/{name}" for name, _, _ in kinds]
    assert {(i["width"], i["height"]) for d in out for i in d["images"]} == {(60, 40)}
    assert [a["bbox"] for d in out for a in d["annotations"]] == [[10, 10, 30, 20]] * 6
    assert sum(changed(stats, s).get("size_differs_from_header", 0) for s in ("train", "val")) == 1


def coco_error(tmp_path, message, classes=None, **kw):
    with pytest.raises(DetpipeError, match=message):
        convert("coco", tmp_path, classes, **kw)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("old, new, message", [
    ('"image_id": 11, "category_id": 3', '"image_id": 99, "category_id": 3', r"annotation 4: unknown image_id 99"),
    ('"image_id": 11, "category_id": 3', '"image_id": 11, "category_id": 5', r"annotation 4: unknown category_id 5"),
    ('[10, 10, 20, 30]', '[10, 10, -20, 30]', r"annotation 1: bbox \[10, 10, -20, 30\] is not \[x, y, width, height\]"),
    ('[10, 10, 20, 30]', '[10, 10, 20]', r"annotation 1: bbox \[10, 10, 20\] is not"),
    ('"id": 11, "file_name"', '"id": 10, "file_name"', r"instances_train2017.json: duplicate image id 10"),
    ('"file_name": "b.jpg"', '"file_name": "a.jpg"', r"raw: 1 duplicate image name\(s\): train2017/a.jpg"),
    ('"categories"', '"classes"', r"instances_train2017.json: no categories list"),
    ('{"id": 3, "name": "car"}', '{"id": 0, "name": "car"}', r"instances_train2017.json: duplicate category id 0"),
])
def test_bad_coco_input_is_named(tmp_path, old, new, message):
    assert old in COCO_TRAIN
    coco_raw(tmp_path, COCO_TRAIN.replace(old, new, 1))
    coco_error(tmp_path, message)


def test_coco_malformed_json_names_the_line(tmp_path):
    coco_raw(tmp_path, '{\n "images": [\n  {"id": 1,, "file_name": "a.jpg"}\n ]\n}')
    coco_error(tmp_path, r"annotations/instances_train2017.json:3: malformed JSON")


def test_coco_unknown_class_or_remap_name(tmp_path):
    coco_raw(tmp_path)
    coco_error(tmp_path, r"instances_train2017.json: unknown class 'bus'; the file's categories are person, car, truck",
               ["car", "bus"])
    coco_error(tmp_path, r"instances_train2017.json: remap names unknown categor\(ies\) 'lorry'",
               options={"remap": {"lorry": "vehicle"}})


RECORDS = {
    "train": [{"filename": "r0.png", "ann": {"bboxes": [[10, 20, 50, 60], [5.5, 6.25, 30, 12]], "labels": [1, 0],
                                             "masks": [[[10, 20, 50, 40, 10, 60]], None]}},
              {"filename": "r1.png", "ann": {"bboxes": [[0, 0, 120, 90]], "labels": [2]}}],
    "val": [{"filename": "r2.png", "ann": {"bboxes": [[30, 30, 60, 45]], "labels": [0],
                                           "bboxes_ignore": [[1, 1, 9, 9]], "labels_ignore": [1]}}],
}


@pytest.mark.parametrize("fmt, writer", [("yolo", yolo.write), ("coco", coco.write)])
def test_writer_round_trip(tmp_path, fmt, writer):
    classes = ["cat", "dog", "bird"]
    images = {rec["filename"]: make_image(tmp_path / "src" / rec["filename"], 120, 90)
              for records in RECORDS.values() for rec in records}
    writer(tmp_path / "raw", RECORDS, classes, lambda rec: images[rec["filename"]])
    convert(fmt, tmp_path, classes)
    for split, records in RECORDS.items():
        data, middle = output(tmp_path, split)
        assert [r["filename"].rsplit("/", 1)[-1] for r in middle] == [r["filename"] for r in records]
        for rec, got in zip(records, middle):
            assert got["ann"]["labels"] == rec["ann"]["labels"]
            assert got["ann"]["bboxes"] == approx(*rec["ann"]["bboxes"])
            if fmt == "coco":  # YOLO has no ignore regions
                assert got["ann"]["labels_ignore"] == rec["ann"].get("labels_ignore", [])
                assert got["ann"]["bboxes_ignore"] == approx(*rec["ann"].get("bboxes_ignore", []))
    train, _ = output(tmp_path, "train")
    assert train["annotations"][0]["segmentation"] == approx([10, 20, 50, 40, 10, 60])
    assert train["annotations"][0]["area"] == pytest.approx(800, abs=0.1)
