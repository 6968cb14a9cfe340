import hashlib
import json

import pytest
from PIL import Image
from pycocotools.coco import COCO

from detpipe import synthetic
from detpipe.conversion import convert_dataset
from detpipe.errors import DetpipeError
from detpipe.formats import middle, polygon_area


def test_synthetic_is_seeded(tmp_path):
    args = {"num_train": 3, "num_val": 2, "image_size": 64, "max_objects": 3, "seed": 7}
    synthetic.generate(tmp_path / "a", **args)
    synthetic.generate(tmp_path / "b", **args)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) == 3 + 2 + 2  # images plus one VIA file per split
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
    synthetic.generate(tmp_path / "c", **{**args, "seed": 8})
    assert (tmp_path / "c/train/train_00000.jpg").read_bytes() != (tmp_path / "a/train/train_00000.jpg").read_bytes()


# sha256 of train/train_00000.jpg of the default dataset (params/datasets.yaml `synthetic`: 128 px, at most 4
# objects, seed 0), taken before the kinds of MORE_CLASSES were added. The first image is drawn first, so
# generating one image gives the same bytes as generating all 800 + 100.
DEFAULT_FIRST_IMAGE_SHA256 = "f246e2373264ae1d2044f57d76d86333fdc74e2350fe532c08712c65f0a75399"


def test_default_synthetic_bytes_unchanged(tmp_path):
    synthetic.generate(tmp_path, num_train=1, num_val=1, image_size=128, max_objects=4, seed=0)
    assert hashlib.sha256((tmp_path / "train/train_00000.jpg").read_bytes()).hexdigest() == DEFAULT_FIRST_IMAGE_SHA256


@pytest.mark.parametrize("kind, corners", [("star", 10), ("hexagon", 6), ("diamond", 4), ("pentagon", 5)])
def test_more_shape_kinds_generate_and_convert(tmp_path, kind, corners):
    assert kind in synthetic.MORE_CLASSES and kind not in synthetic.CLASSES
    synthetic.generate(tmp_path / "raw", num_train=3, num_val=1, image_size=64, max_objects=3, seed=0, classes=(kind,))
    via = json.loads((tmp_path / "raw/train/via_region_data.json").read_text())
    regions = [r for entry in via.values() for r in entry["regions"]]
    assert regions and all(r["region_attributes"] == {"label": kind} for r in regions)
    assert all(len(r["shape_attributes"]["all_points_x"]) == corners for r in regions)
    stats = convert_dataset("via", tmp_path / "raw", tmp_path / "coco", [kind], min_box_size=2,
                            splits={"train": "train", "val": "val"})
    assert stats["splits"]["train"]["images"] == 3
    coco = COCO(str(tmp_path / "coco/train.json"))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == [kind]
    for ann in coco.loadAnns(coco.getAnnIds()):
        assert coco.annToMask(ann).sum() > 0
        x, y, w, h = ann["bbox"]
        assert w > 0 and h > 0 and ann["area"] < w * h


def test_diamond_is_a_rhombus_not_a_square():
    xs, ys = zip(*synthetic._polygon("diamond", 0, 0, 1, 0))
    assert (max(xs) - min(xs)) / (max(ys) - min(ys)) == pytest.approx(0.6)
    with pytest.raises(ValueError, match="unknown shape"):
        synthetic._polygon("ring", 0, 0, 1, 0)


def test_converted_synthetic_loads_in_pycocotools(tiny_coco):
    coco = COCO(str(tiny_coco / "coco/train.json"))
    assert len(coco.getImgIds()) == 8
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(synthetic.CLASSES)
    assert min(coco.getCatIds()) == 1
    for ann in coco.loadAnns(coco.getAnnIds()):
        assert coco.annToMask(ann).sum() > 0
        x, y, w, h = ann["bbox"]
        assert w > 0 and h > 0 and ann["area"] < w * h  # polygon area, not the box's
    stats = json.loads((tiny_coco / "coco/stats.json").read_text())
    assert stats["splits"]["train"]["images"] == 8
    assert sum(stats["splits"]["train"]["objects_per_class"].values()) == len(coco.getAnnIds())
    assert len(stats["content_hash"]) == 64


def write_via(split_dir, entries, size=(100, 80)):
    split_dir.mkdir(parents=True)
    for entry in entries.values():
        Image.new("RGB", size).save(split_dir / entry["filename"])
    (split_dir / "via_region_data.json").write_text(json.dumps(entries))


def region(shape, label="a"):
    return {"shape_attributes": shape, "region_attributes": {"label": label} if label else {}}


def test_via_shapes_both_versions_and_clipping(tmp_path):
    poly = {"name": "polygon", "all_points_x": [10, 50, 50, 10], "all_points_y": [10, 10, 30, 30]}
    rect = {"name": "rect", "x": 90, "y": 60, "width": 30, "height": 40}  # runs off the image: clipped
    tiny = {"name": "rect", "x": 5, "y": 5, "width": 0.5, "height": 9}  # degenerate: dropped
    circle = {"name": "circle", "cx": 50, "cy": 40, "r": 10}
    entries = {
        "one.jpg1": {"filename": "one.jpg", "regions": {"0": region(poly), "1": region(rect, "b")}},  # VIA 1.x
        "two.jpg1": {"filename": "two.jpg", "regions": [region(circle, "b"), region(tiny)]},  # VIA 2.x
    }
    write_via(tmp_path / "train", entries)
    write_via(tmp_path / "val", {"v.jpg1": {"filename": "v.jpg", "regions": []}})
    stats = convert_dataset("via", tmp_path, tmp_path / "out", ["a", "b"], min_box_size=1)
    coco = json.loads((tmp_path / "out/train.json").read_text())
    anns = coco["annotations"]
    assert [a["category_id"] for a in anns] == [1, 2, 2]
    assert anns[0]["bbox"] == [10, 10, 40, 20] and anns[0]["area"] == 800
    assert anns[1]["bbox"] == [90, 60, 10, 20]
    assert anns[2]["area"] == pytest.approx(3.14159 * 100, rel=0.01)
    assert stats["splits"]["train"]["boxes_changed"] == {
        "clipped_outside_image": 1, "dropped_outside_image": 0, "dropped_degenerate": 1, "size_differs_from_header": 0}
    assert coco["images"][0] == {"id": 1, "file_name": "train/one.jpg", "width": 100, "height": 80}
    middle = json.loads((tmp_path / "out/train_middle.json").read_text())
    assert middle[0] == {"filename": "train/one.jpg", "width": 100, "height": 80,
                         "ann": {"bboxes": [[10, 10, 50, 30], [90, 60, 100, 80]], "labels": [0, 1],
                                 "bboxes_ignore": [], "labels_ignore": []}}
    COCO(str(tmp_path / "out/train.json"))


def convert_via(tmp_path, classes, **kw):
    return convert_dataset("via", tmp_path, tmp_path / "out", classes, splits={"train": "train"}, **kw)


def test_single_class_needs_no_attribute(tmp_path):
    poly = {"name": "polygon", "all_points_x": [1, 20, 20], "all_points_y": [1, 1, 20]}
    write_via(tmp_path / "train", {"x": {"filename": "x.jpg", "regions": [region(poly, None)]}})
    convert_via(tmp_path, ["balloon"])
    assert json.loads((tmp_path / "out/train.json").read_text())["annotations"][0]["category_id"] == 1


@pytest.mark.parametrize("label, message", [("zebra", "unknown class 'zebra'"), (None, "no 'label' region attribute")])
def test_bad_labels_are_named(tmp_path, label, message):
    poly = {"name": "polygon", "all_points_x": [1, 20, 20], "all_points_y": [1, 1, 20]}
    write_via(tmp_path / "train", {"x": {"filename": "x.jpg", "regions": [region(poly, label)]}})
    with pytest.raises(DetpipeError, match=message):
        convert_via(tmp_path, ["a", "b"])
    assert not (tmp_path / "out").exists()


def test_open_class_list_takes_labels_in_order_seen(tmp_path):
    poly = {"name": "polygon", "all_points_x": [1, 20, 20], "all_points_y": [1, 1, 20]}
    write_via(tmp_path / "train", {"x": {"filename": "x.jpg", "regions": [region(poly, "dog"), region(poly, "cat")]}})
    assert convert_via(tmp_path, None)["classes"] == ["dog", "cat"]


def test_malformed_json_names_the_line(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "train/via_region_data.json").write_text('{\n"a": {\n  "filename": "x.jpg",\n  oops\n}')
    with pytest.raises(DetpipeError, match=r"via_region_data.json:4: malformed JSON"):
        convert_via(tmp_path, ["a"])


def test_missing_images_are_listed(tmp_path):
    write_via(tmp_path / "train", {k: {"filename": f"{k}.jpg", "regions": []} for k in "abcdefg"})
    for k in "bcdefg":
        (tmp_path / f"train/{k}.jpg").unlink()
    with pytest.raises(DetpipeError, match=r"labels refer to 6 missing image\(s\): train/b.jpg, train/c.jpg, "
                                           r"train/d.jpg, train/e.jpg, train/f.jpg \(and 1 more\)"):
        convert_via(tmp_path, ["a"])


def test_strict_turns_clipping_into_an_error(tmp_path):
    rect = {"name": "rect", "x": 90, "y": 60, "width": 30, "height": 40}
    write_via(tmp_path / "train", {"x": {"filename": "x.jpg", "regions": [region(rect)]}})
    assert convert_via(tmp_path, ["a"])["splits"]["train"]["boxes_changed"]["clipped_outside_image"] == 1
    with pytest.raises(DetpipeError, match=r"train/x.jpg: box 0: clipped outside image \(convert.strict is on\)"):
        convert_via(tmp_path, ["a"], strict=True)


def test_failed_conversion_writes_nothing(tmp_path):
    write_via(tmp_path / "raw/train", {"x": {"filename": "x.jpg", "regions": []}})
    with pytest.raises(DetpipeError, match="val"):
        convert_dataset("via", tmp_path / "raw", tmp_path / "coco", ["a"])
    assert not (tmp_path / "coco").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["raw"]


def test_middle_format_arrays(tiny_coco):
    records = json.loads((tiny_coco / "coco/val_middle.json").read_text())
    assert set(records[0]) == {"filename", "width", "height", "ann"}
    assert set(records[0]["ann"]) == {"bboxes", "labels", "bboxes_ignore", "labels_ignore"}
    assert min(lab for r in records for lab in r["ann"]["labels"]) >= 0  # 0-based, as mmdetection wants
    arrays = middle.as_arrays(records)
    assert arrays[0]["ann"]["bboxes"].shape[1] == 4 and arrays[0]["ann"]["labels"].dtype.kind == "i"


def test_polygon_area():
    assert polygon_area([0, 4, 4, 0], [0, 0, 3, 3]) == 12


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".bmp"])
@pytest.mark.parametrize("orientation", [None, 6])
def test_image_size_never_decodes_pixels(tmp_path, monkeypatch, suffix, orientation):
    from PIL import ImageFile

    from detpipe.formats import image_size
    from tests.fixtures import make_image

    path = make_image(tmp_path / f"a{suffix}", 300, 200, orientation=orientation if suffix != ".bmp" else None)

    def no_decode(self):
        raise AssertionError("pixels decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decode)
    assert image_size.__wrapped__(path) == (300, 200)


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_image_size_as_a_viewer_shows_it_and_truncation(tmp_path, suffix):
    from detpipe.formats import image_size
    from tests.fixtures import make_image

    assert image_size(make_image(tmp_path / f"r{suffix}", 30, 20, orientation=6)) == (30, 20)  # stored 20 x 30
    cut = make_image(tmp_path / f"t{suffix}", 30, 20)
    cut.write_bytes(cut.read_bytes()[:-20])
    with pytest.raises(DetpipeError, match=f"t{suffix}: (truncated|not a readable image)"):
        image_size(cut)
    (tmp_path / f"g{suffix}").write_bytes(b"not an image")
    with pytest.raises(DetpipeError, match="not a readable image"):
        image_size(tmp_path / f"g{suffix}")


def test_custom_loader_records_are_checked(tmp_path):
    """A format of one's own returns middle-format records; the core checks them like any format's."""
    from detpipe.formats import register
    from tests.fixtures import make_image

    make_image(tmp_path / "raw/a.jpg", 40, 30)
    make_image(tmp_path / "raw/b.jpg", 40, 30)
    returned = {}

    @register("test_custom")
    def load(src, classes, splits, scale=1.0):
        return returned["records"]

    def convert(records, classes=("cat", "dog"), out="out", **kw):
        returned["records"] = records
        return convert_dataset("test_custom", tmp_path / "raw", tmp_path / out, classes, **kw)

    box = {"filename": "a.jpg", "ann": {"bboxes": [[1, 2, 11, 12]], "labels": ["dog"]}}
    stats = convert([box, {"filename": "b.jpg", "ann": {"bboxes": [], "labels": []}}], classes=None, out="ok",
                    options={"scale": 2.0})
    assert stats["classes"] == ["dog"] and stats["splits"]["train"]["images"] == 1  # seeded split of a list
    for records, message in [
        ([{"ann": {"bboxes": [], "labels": []}}, box], "lacks filename or ann{bboxes, labels}"),
        ([{**box, "ann": {"bboxes": [[1, 2, 11, 12]], "labels": [2]}}, {**box, "filename": "b.jpg"}],
         r"a.jpg: box 0: label 2 is not a class index 0..1"),
        ([{**box, "ann": {"bboxes": [[1, 2, 11]], "labels": [0]}}, {**box, "filename": "b.jpg"}],
         r"a.jpg: box 0: box \[1, 2, 11\] is not four numbers"),
        ([{**box, "ann": {"bboxes": [[1, 2, 11, 12]], "labels": []}}, {**box, "filename": "b.jpg"}],
         "ann lists of boxes, labels and masks differ in length"),
    ]:
        with pytest.raises(DetpipeError, match=message):
            convert(records)
        assert not (tmp_path / "out").exists()
    with pytest.raises(DetpipeError, match=r"format 'test_custom': bad options \{'scales': 2\}"):
        convert([box, box], options={"scales": 2})
