"""KITTI and Pascal VOC loaders and writers, on small hand-written folders converted by the core."""

import json

import pytest
from pycocotools.coco import COCO

from detpipe.conversion import GEOMETRY, convert_dataset
from detpipe.errors import DetpipeError
from detpipe.formats import ClassList, kitti, voc
from tests.fixtures import make_image

NO_CHANGES = dict.fromkeys(GEOMETRY, 0)


def put(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def read(out, name):
    return json.loads((out / name).read_text())


def by_file(out, *splits):
    return {rec["filename"]: rec for split in splits for rec in read(out, f"{split}_middle.json")}


# ---------------------------------------------------------------------------------------------- KITTI

CAR = "Car 0.50 1 -1.57 4.00 5.00 30.00 25.00 1.50 1.60 3.90 1.00 1.50 20.00 -1.50"
PEDESTRIAN_SCORED = "Pedestrian 0.00 0 0.20 40.00 10.00 60.00 38.00 1.70 0.60 0.80 2.00 1.60 10.00 0.10 0.93"
DONTCARE = "DontCare -1 -1 -10 0.00 0.00 8.00 8.00 -1 -1 -1 -1000 -1000 -1000 -10"
VAN = "Van 0.00 0 0.00 10.00 30.00 20.00 40.00 0 0 0 0 0 0 0"
CYCLIST = "Cyclist 0.20 2 0.00 1.00 2.00 11.00 12.00 0 0 0 0 0 0 0"
KITTI_CLASSES = ["Car", "Pedestrian", "Cyclist"]


def kitti_tiny(root, lists=True):
    """Three images of three kinds and suffixes; the second has an empty label file (no objects)."""
    make_image(root / "training/image_2/000000.jpeg", 64, 48)
    make_image(root / "training/image_2/000001.png", 50, 40, "L")
    make_image(root / "training/image_2/000002.jpg", 32, 24)
    put(root / "training/label_2/000000.txt", f"{CAR}\n{PEDESTRIAN_SCORED}\n{DONTCARE}\n{VAN}\n")
    put(root / "training/label_2/000001.txt", "")
    put(root / "training/label_2/000002.txt", f"{CYCLIST}\n")
    if lists:
        put(root / "train.txt", "000000\n000001\n")
        put(root / "val.txt", "000002\n")
    return root


def test_kitti_objects_dontcare_and_unselected_types(tmp_path):
    src, out = kitti_tiny(tmp_path / "kitti_tiny"), tmp_path / "out"
    stats = convert_dataset("kitti", src, out, KITTI_CLASSES)
    coco = read(out, "train.json")
    assert coco["images"] == [
        {"id": 1, "file_name": "training/image_2/000000.jpeg", "width": 64, "height": 48},
        {"id": 2, "file_name": "training/image_2/000001.png", "width": 50, "height": 40}]
    assert coco["categories"] == [{"id": 1, "name": "Car", "supercategory": "object"},
                                  {"id": 2, "name": "Pedestrian", "supercategory": "object"},
                                  {"id": 3, "name": "Cyclist", "supercategory": "object"}]
    anns = coco["annotations"]
    assert anns[:2] == [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [4, 5, 26, 20], "area": 520, "iscrowd": 0,
         "attributes": {"truncated": 0.5, "occluded": 1}},
        {"id": 2, "image_id": 1, "category_id": 2, "bbox": [40, 10, 20, 28], "area": 560, "iscrowd": 0,
         "attributes": {"truncated": 0.0, "occluded": 0}}]
    # DontCare, then the unselected Van: an iscrowd region in every category, so no class is penalised there
    assert [(a["category_id"], a["bbox"], a["area"], a["iscrowd"]) for a in anns[2:]] == [
        (1, [0, 0, 8, 8], 64, 1), (2, [0, 0, 8, 8], 64, 1), (3, [0, 0, 8, 8], 64, 1),
        (1, [10, 30, 10, 10], 100, 1), (2, [10, 30, 10, 10], 100, 1), (3, [10, 30, 10, 10], 100, 1)]
    assert read(out, "train_middle.json") == [
        {"filename": "training/image_2/000000.jpeg", "width": 64, "height": 48,
         "ann": {"bboxes": [[4, 5, 30, 25], [40, 10, 60, 38]], "labels": [0, 1],
                 "bboxes_ignore": [[0, 0, 8, 8], [10, 30, 20, 40]], "labels_ignore": [-1, -1]}},
        {"filename": "training/image_2/000001.png", "width": 50, "height": 40,
         "ann": {"bboxes": [], "labels": [], "bboxes_ignore": [], "labels_ignore": []}}]
    assert read(out, "val.json")["annotations"] == [
        {"id": 1, "image_id": 1, "category_id": 3, "bbox": [1, 2, 10, 10], "area": 100, "iscrowd": 0,
         "attributes": {"truncated": 0.2, "occluded": 2}}]
    assert stats["splits"]["train"] == {
        "images": 2, "objects": 2, "ignored": 2, "objects_per_class": {"Car": 1, "Pedestrian": 1, "Cyclist": 0},
        "boxes_changed": {**NO_CHANGES, "ignored_dontcare": 1, "ignored_unselected_class": 1}}
    assert stats["splits"]["val"]["boxes_changed"] == NO_CHANGES
    for split in ("train", "val"):
        coco = COCO(str(out / f"{split}.json"))
        assert len(coco.getAnnIds(iscrowd=0)) == {"train": 2, "val": 1}[split]


def test_kitti_class_selection(tmp_path):
    src, out = kitti_tiny(tmp_path / "kitti_tiny"), tmp_path / "out"
    stats = convert_dataset("kitti", src, out, ["Pedestrian"])
    assert read(out, "train_middle.json")[0]["ann"] == {
        "bboxes": [[40, 10, 60, 38]], "labels": [0],
        "bboxes_ignore": [[4, 5, 30, 25], [0, 0, 8, 8], [10, 30, 20, 40]], "labels_ignore": [-1, -1, -1]}
    assert stats["splits"]["train"]["boxes_changed"]["ignored_unselected_class"] == 2
    assert stats["splits"]["val"]["boxes_changed"]["ignored_unselected_class"] == 1
    assert read(out, "val_middle.json")[0]["ann"]["labels_ignore"] == [-1]


def test_kitti_open_classes_are_every_type_in_fixed_order_and_split_with_a_seed(tmp_path):
    src, out = kitti_tiny(tmp_path / "kitti_tiny", lists=False), tmp_path / "out"
    stats = convert_dataset("kitti", src, out, None, val_fraction=0.34, seed=0)
    assert stats["classes"] == list(kitti.TYPES) and "DontCare" not in stats["classes"]
    assert sorted(stats["splits"]) == ["train", "val"]
    assert stats["splits"]["train"]["images"] + stats["splits"]["val"]["images"] == 3
    records = by_file(out, "train", "val")
    assert records["training/image_2/000000.jpeg"]["ann"] == {  # Van is a class now; DontCare still ignored
        "bboxes": [[4, 5, 30, 25], [40, 10, 60, 38], [10, 30, 20, 40]], "labels": [0, 3, 1],
        "bboxes_ignore": [[0, 0, 8, 8]], "labels_ignore": [-1]}
    assert records["training/image_2/000002.jpg"]["ann"]["labels"] == [kitti.TYPES.index("Cyclist")]


def test_kitti_types_of_your_own(tmp_path):
    """KITTI-layout exports of custom data: a listed type is an object, an unlisted unknown one an error."""
    src = kitti_tiny(tmp_path / "kitti_tiny")
    put(src / "training/label_2/000002.txt", CYCLIST.replace("Cyclist", "Forklift") + "\n")
    stats = convert_dataset("kitti", src, tmp_path / "out", ["Car", "Forklift"])
    assert stats["splits"]["val"]["objects_per_class"] == {"Car": 0, "Forklift": 1}
    with pytest.raises(DetpipeError) as err:
        convert_dataset("kitti", src, tmp_path / "out2", ["Car"])
    assert str(err.value) == (f"{src}/training/label_2/000002.txt:1: unknown class 'Forklift'; classes are Car "
                              "(other KITTI types become ignore regions)")
    assert not (tmp_path / "out2").exists()
    assert convert_dataset("kitti", src, tmp_path / "out3")["classes"] == [*kitti.TYPES, "Forklift"]


def kitti_bad_line(root):
    put(root / "training/label_2/000000.txt", f"{CAR}\nCar 0.00 0 0.00 1 2 3\n")
    return f"{root}/training/label_2/000000.txt:2: expected 15 fields, got 7"


def kitti_not_a_number(root):
    put(root / "training/label_2/000002.txt", CYCLIST.replace("11.00", "eleven"))
    return f"{root}/training/label_2/000002.txt:1: could not convert string to float: 'eleven'"


def kitti_unknown_type(root):
    put(root / "training/label_2/000000.txt", f"{CAR}\n{VAN.replace('Van', 'Bus')}\n")
    return (f"{root}/training/label_2/000000.txt:2: unknown class 'Bus'; classes are Car, Pedestrian, Cyclist "
            "(other KITTI types become ignore regions)")


def kitti_listed_without_label(root):
    put(root / "train.txt", "000000\n" + "".join(f"00010{i}\n" for i in range(7)))
    return (f"{root}/train.txt: 7 listed id(s) have no label file: training/label_2/000100.txt, "
            "training/label_2/000101.txt, training/label_2/000102.txt, training/label_2/000103.txt, "
            "training/label_2/000104.txt (and 2 more)")


def kitti_label_without_image(root):
    (root / "training/image_2/000002.jpg").unlink()
    return f"{root}: labels refer to 1 missing image(s): training/image_2/000002.jpeg"


def kitti_listed_twice(root):
    put(root / "val.txt", "000002\n000001\n")
    return f"{root}: 1 duplicate image name(s): training/image_2/000001.png"


def kitti_truncated_jpeg(root):
    image = root / "training/image_2/000000.jpeg"
    image.write_bytes(image.read_bytes()[:-200])
    return f"{image}: truncated JPEG image (no end marker)"


def kitti_empty(root):
    for path in [root / "train.txt", root / "val.txt", *(root / "training/label_2").iterdir()]:
        path.unlink()
    return f"{root}: no annotated images found for format 'kitti'"


@pytest.mark.parametrize("break_it", [kitti_bad_line, kitti_not_a_number, kitti_unknown_type,
                                      kitti_listed_without_label, kitti_label_without_image, kitti_listed_twice,
                                      kitti_truncated_jpeg, kitti_empty])
def test_kitti_errors_name_the_file_and_write_nothing(tmp_path, break_it):
    src = kitti_tiny(tmp_path / "kitti_tiny")
    message = break_it(src)
    with pytest.raises(DetpipeError) as err:
        convert_dataset("kitti", src, tmp_path / "out", KITTI_CLASSES)
    assert str(err.value) == message
    assert not (tmp_path / "out").exists()


def test_kitti_writer_round_trip(tmp_path):
    a = make_image(tmp_path / "src/a.png", 40, 30)
    b = make_image(tmp_path / "src/b.jpg", 20, 16)
    records = {"train": [{"filename": "a.png", "ann": {"bboxes": [[1.5, 2, 20, 25], [3, 4, 9, 9]], "labels": [1, 0],
                                                       "bboxes_ignore": [[0, 0, 5, 5]], "labels_ignore": [-1]}}],
               "val": [{"filename": "b.jpg", "ann": {"bboxes": [[2, 2, 18, 14]], "labels": [2]}}]}
    kitti.write(tmp_path / "raw", records, KITTI_CLASSES, lambda rec: {"a.png": a, "b.jpg": b}[rec["filename"]])
    assert (tmp_path / "raw/train.txt").read_text() == "a\n"
    assert (tmp_path / "raw/training/label_2/a.txt").read_text().splitlines() == [
        "Pedestrian 0.00 0 0.00 1.50 2.00 20.00 25.00 0.00 0.00 0.00 0.00 0.00 0.00 0.00",
        "Car 0.00 0 0.00 3.00 4.00 9.00 9.00 0.00 0.00 0.00 0.00 0.00 0.00 0.00",
        "DontCare 0.00 0 0.00 0.00 0.00 5.00 5.00 0.00 0.00 0.00 0.00 0.00 0.00 0.00"]
    convert_dataset("kitti", tmp_path / "raw", tmp_path / "out", KITTI_CLASSES)
    assert read(tmp_path / "out", "train_middle.json") == [
        {"filename": "training/image_2/a.png", "width": 40, "height": 30,
         "ann": {"bboxes": [[1.5, 2, 20, 25], [3, 4, 9, 9]], "labels": [1, 0],
                 "bboxes_ignore": [[0, 0, 5, 5]], "labels_ignore": [-1]}}]
    assert read(tmp_path / "out", "val_middle.json") == [
        {"filename": "training/image_2/b.jpg", "width": 20, "height": 16,
         "ann": {"bboxes": [[2, 2, 18, 14]], "labels": [2], "bboxes_ignore": [], "labels_ignore": []}}]


# ------------------------------------------------------------------------------------------------ VOC

VOC_CLASSES = ["cat", "dog"]
VOC_000001 = """\
<annotation>
  <folder>VOC2007</folder>
  <filename>000001.jpg</filename>
  <size><width>64</width><height>48</height><depth>3</depth></size>
  <object>
    <name>dog</name>
    <pose>Left</pose>
    <truncated>1</truncated>
    <difficult>0</difficult>
    <bndbox><xmin>5</xmin><ymin>6</ymin><xmax>30</xmax><ymax>25</ymax></bndbox>
  </object>
  <object>
    <name>cat</name>
    <pose>Unspecified</pose>
    <truncated>0</truncated>
    <difficult>1</difficult>
    <bndbox><xmin>1</xmin><ymin>1</ymin><xmax>10</xmax><ymax>10</ymax></bndbox>
  </object>
</annotation>
"""


def voc_xml(filename, size, name, box):
    """One object, no extras; ``filename`` None leaves the element out."""
    file_element = f"<filename>{filename}</filename>" if filename else ""
    return (f"<annotation>{file_element}<size><width>{size[0]}</width><height>{size[1]}</height></size>"
            f"<object><name>{name}</name><bndbox><xmin>{box[0]}</xmin><ymin>{box[1]}</ymin>"
            f"<xmax>{box[2]}</xmax><ymax>{box[3]}</ymax></bndbox></object></annotation>\n")


def voc_devkit(root):
    """Six images of every odd kind; XML sizes as a viewer shows them, one 0 x 0, one that disagrees."""
    make_image(root / "JPEGImages/000001.jpg", 64, 48)
    put(root / "Annotations/000001.xml", VOC_000001)
    kinds = {"000002.png": ((40, 30), "L", (0, 0)), "000003.png": ((30, 20), "P", (31, 20)),
             "000004.png": ((30, 20), "RGBA", (30, 20)), "000005.png": ((30, 20), "I;16", (30, 20)),
             "000006.jpg": ((40, 60), "RGB", (40, 60))}
    for name, ((w, h), mode, size) in kinds.items():
        make_image(root / "JPEGImages" / name, w, h, mode, orientation=6 if name == "000006.jpg" else None)
        put(root / f"Annotations/{name[:6]}.xml", voc_xml(name, size, "cat", (1, 1, w, h)))
    put(root / "ImageSets/Main/train.txt", "000001\n000002\n000003\n")
    put(root / "ImageSets/Main/val.txt", "000004\n000005\n000006\n")
    return root


def test_voc_devkit(tmp_path):
    src, out = voc_devkit(tmp_path / "VOC2007"), tmp_path / "out"
    stats = convert_dataset("voc", src, out, VOC_CLASSES)
    train = read(out, "train.json")
    assert train["images"] == [
        {"id": 1, "file_name": "JPEGImages/000001.jpg", "width": 64, "height": 48},
        {"id": 2, "file_name": "JPEGImages/000002.png", "width": 40, "height": 30},
        {"id": 3, "file_name": "JPEGImages/000003.png", "width": 30, "height": 20}]
    assert train["annotations"][:2] == [  # 1-based pixel indices 5..30 are 0-based coordinates 4..30
        {"id": 1, "image_id": 1, "category_id": 2, "bbox": [4, 5, 26, 20], "area": 520, "iscrowd": 0,
         "attributes": {"pose": "Left", "truncated": 1}},
        {"id": 2, "image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "area": 100, "iscrowd": 1}]
    assert train["annotations"][2]["bbox"] == [0, 0, 40, 30]  # the whole image, so nothing clipped
    assert read(out, "train_middle.json")[0] == {
        "filename": "JPEGImages/000001.jpg", "width": 64, "height": 48,
        "ann": {"bboxes": [[4, 5, 30, 25]], "labels": [1], "bboxes_ignore": [[0, 0, 10, 10]], "labels_ignore": [0]}}
    assert stats["splits"]["train"] == {  # 000003's XML says 31 wide; 000002's 0 x 0 is no size at all
        "images": 3, "objects": 3, "ignored": 1, "objects_per_class": {"cat": 2, "dog": 1},
        "boxes_changed": {**NO_CHANGES, "size_differs_from_header": 1, "ignored_difficult": 1}}
    val = read(out, "val.json")
    assert [(i["file_name"], i["width"], i["height"]) for i in val["images"]] == [
        ("JPEGImages/000004.png", 30, 20), ("JPEGImages/000005.png", 30, 20),
        ("JPEGImages/000006.jpg", 40, 60)]  # EXIF-rotated: the size a viewer shows
    assert [a["bbox"] for a in val["annotations"]] == [[0, 0, 30, 20], [0, 0, 30, 20], [0, 0, 40, 60]]
    assert stats["splits"]["val"]["boxes_changed"] == NO_CHANGES
    for split in ("train", "val"):
        COCO(str(out / f"{split}.json"))


@pytest.mark.parametrize("image_folder", [".", "images"])
def test_voc_flat_folder_is_split_with_a_seed(tmp_path, image_folder):
    src = tmp_path / "flat"
    for i in range(6):
        make_image(src / image_folder / f"img{i}.jpg", 32, 24, seed=i)
        name = "bird" if i % 2 else "boat"
        put(src / f"img{i}.xml", voc_xml(None if i == 0 else f"img{i}.jpg", (32, 24), name, (2, 3, 20, 21)))
    runs = {seed: convert_dataset("voc", src, tmp_path / f"out{seed}", None, val_fraction=0.5, seed=seed)
            for seed in (0, 1)}
    assert runs[0]["classes"] == ["boat", "bird"]  # open classes: in the order the sorted XMLs name them
    prefix = "" if image_folder == "." else "images/"
    splits = {seed: {s: sorted(by_file(tmp_path / f"out{seed}", s)) for s in ("train", "val")} for seed in (0, 1)}
    assert sorted(splits[0]["train"] + splits[0]["val"]) == [f"{prefix}img{i}.jpg" for i in range(6)]
    assert len(splits[0]["val"]) == 3
    again = convert_dataset("voc", src, tmp_path / "again", None, val_fraction=0.5, seed=0)
    assert again == runs[0] and sorted(by_file(tmp_path / "again", "val")) == splits[0]["val"]
    assert splits[1]["val"] != splits[0]["val"]
    assert by_file(tmp_path / "out0", "train", "val")[f"{prefix}img0.jpg"]["ann"]["bboxes"] == [[1, 2, 20, 21]]


def voc_malformed(root):
    put(root / "Annotations/000002.xml", "<annotation>\n  <filename>000002.png</filename>\n  <object>\n</annotation>\n")
    return f"{root}/Annotations/000002.xml:4: malformed XML (mismatched tag)"


def voc_no_bndbox(root):
    put(root / "Annotations/000001.xml", VOC_000001.replace("<bndbox><xmin>1</xmin>", "<box><xmin>1</xmin>")
        .replace("</ymax></bndbox>\n  </object>\n</annotation>", "</ymax></box>\n  </object>\n</annotation>"))
    return f"{root}/Annotations/000001.xml: object 1 (cat): missing <bndbox> or a non-numeric xmin, ymin, xmax, ymax"


def voc_not_a_number(root):
    put(root / "Annotations/000001.xml", VOC_000001.replace("<xmax>30</xmax>", "<xmax>30px</xmax>"))
    return f"{root}/Annotations/000001.xml: object 0 (dog): missing <bndbox> or a non-numeric xmin, ymin, xmax, ymax"


def voc_unknown_class(root):
    put(root / "Annotations/000001.xml", VOC_000001.replace("<name>dog</name>", "<name>zebra</name>"))
    return f"{root}/Annotations/000001.xml: object 0: unknown class 'zebra'; classes are cat, dog"


def voc_same_image_twice(root):
    put(root / "Annotations/000003.xml", voc_xml("000001.jpg", (64, 48), "cat", (1, 1, 9, 9)))
    return f"{root}: 1 duplicate image name(s): JPEGImages/000001.jpg"


def voc_listed_without_xml(root):
    put(root / "ImageSets/Main/val.txt", "000004\n000404\n")
    return f"{root}/ImageSets/Main/val.txt: 1 listed id(s) have no annotation file: Annotations/000404.xml"


def voc_xml_without_image(root):
    (root / "JPEGImages/000005.png").unlink()
    (root / "JPEGImages/000006.jpg").unlink()
    return f"{root}: labels refer to 2 missing image(s): JPEGImages/000005.png, JPEGImages/000006.jpg"


def voc_truncated_jpeg(root):
    image = root / "JPEGImages/000001.jpg"
    image.write_bytes(image.read_bytes()[:-200])
    return f"{image}: truncated JPEG image (no end marker)"


def voc_empty(root):
    for path in [*(root / "ImageSets/Main").iterdir(), *(root / "Annotations").iterdir()]:
        path.unlink()
    return f"{root}: no annotated images found for format 'voc'"


@pytest.mark.parametrize("break_it", [voc_malformed, voc_no_bndbox, voc_not_a_number, voc_unknown_class,
                                      voc_same_image_twice, voc_listed_without_xml, voc_xml_without_image,
                                      voc_truncated_jpeg, voc_empty])
def test_voc_errors_name_the_file_and_write_nothing(tmp_path, break_it):
    src = voc_devkit(tmp_path / "VOC2007")
    message = break_it(src)
    with pytest.raises(DetpipeError) as err:
        convert_dataset("voc", src, tmp_path / "out", VOC_CLASSES)
    assert str(err.value) == message
    assert not (tmp_path / "out").exists()


def test_voc_writer_round_trip(tmp_path):
    a = make_image(tmp_path / "src/a.jpg", 40, 30)
    b = make_image(tmp_path / "src/b.png", 20, 16, "L")
    records = {"train": [{"filename": "a.jpg", "ann": {"bboxes": [[0, 0, 20, 25.5]], "labels": [1],
                                                       "bboxes_ignore": [[3, 4, 9, 9], [0, 0, 5, 5]],
                                                       "labels_ignore": [0, -1]}}],
               "val": [{"filename": "b.png", "width": 20, "height": 16, "ann": {"bboxes": [], "labels": []}}]}
    voc.write(tmp_path / "raw", records, VOC_CLASSES, lambda rec: {"a.jpg": a, "b.png": b}[rec["filename"]])
    assert (tmp_path / "raw/ImageSets/Main/val.txt").read_text() == "b\n"
    assert "<xmin>1</xmin>" in (tmp_path / "raw/Annotations/a.xml").read_text()  # 1-based on disk
    stats = convert_dataset("voc", tmp_path / "raw", tmp_path / "out", VOC_CLASSES)
    assert read(tmp_path / "out", "train_middle.json") == [  # the every-class ignore region has no VOC form
        {"filename": "JPEGImages/a.jpg", "width": 40, "height": 30,
         "ann": {"bboxes": [[0, 0, 20, 25.5]], "labels": [1], "bboxes_ignore": [[3, 4, 9, 9]], "labels_ignore": [0]}}]
    assert read(tmp_path / "out", "val_middle.json") == [
        {"filename": "JPEGImages/b.png", "width": 20, "height": 16,
         "ann": {"bboxes": [], "labels": [], "bboxes_ignore": [], "labels_ignore": []}}]
    assert stats["splits"]["train"]["boxes_changed"] == {**NO_CHANGES, "ignored_difficult": 1}


# ------------------------------------------------------------------------------------ VOC layouts found


def voc_flat(root, annotations, images, stems=("a", "b", "c", "d")):
    """One image and XML per stem, one object each (classes alternate): XMLs in ``annotations``, images in
    ``images`` (``.``: ``root`` itself)."""
    for i, stem in enumerate(stems):
        make_image(root / images / f"{stem}.jpg", 32, 24, seed=i)
        put(root / annotations / f"{stem}.xml", voc_xml(f"{stem}.jpg", (32, 24), VOC_CLASSES[i % 2], (2, 3, 20, 21)))
    return root


@pytest.mark.parametrize("annotations, images", [("annotations", "images"), ("Annotations", "Images"),
                                                 ("labels", "JPEGImages"), ("XML", "imgs"), (".", ".")])
def test_voc_flat_layouts_are_found_and_split_with_a_seed(tmp_path, annotations, images):
    src = voc_flat(tmp_path / "raw", annotations, images)
    stats = convert_dataset("voc", src, tmp_path / "out", VOC_CLASSES, val_fraction=0.5, seed=0)
    prefix = "" if images == "." else f"{images}/"
    records = by_file(tmp_path / "out", "train", "val")
    assert sorted(records) == [f"{prefix}{s}.jpg" for s in "abcd"]
    assert records[f"{prefix}b.jpg"]["ann"] == {"bboxes": [[1, 2, 20, 21]], "labels": [1],
                                                "bboxes_ignore": [], "labels_ignore": []}
    assert stats["splits"]["train"]["images"] == stats["splits"]["val"]["images"] == 2


def test_voc_flat_layout_with_split_lists(tmp_path):
    src = voc_flat(tmp_path / "raw", "annotations", "images")
    put(src / "ImageSets/Main/train.txt", "a\nb\nc\n")
    put(src / "ImageSets/Main/val.txt", "d\n")
    convert_dataset("voc", src, tmp_path / "out", VOC_CLASSES)
    assert sorted(by_file(tmp_path / "out", "train")) == ["images/a.jpg", "images/b.jpg", "images/c.jpg"]
    assert sorted(by_file(tmp_path / "out", "val")) == ["images/d.jpg"]


@pytest.mark.parametrize("annotations, images", [(".", "."), ("annotations", "images")])
def test_voc_split_folders_roboflow_style(tmp_path, annotations, images):
    """Roboflow's VOC export: ``train/``, ``valid/``, ``test/``, each with its images and XMLs; ``valid`` is val."""
    src = tmp_path / "raw"
    put(src / "README.roboflow.txt", "exported\n")
    for folder, stems in (("train", "abc"), ("valid", "d"), ("test", "e")):
        voc_flat(src / folder, annotations, images, stems=tuple(f"{folder}_{s}" for s in stems))
    stats = convert_dataset("voc", src, tmp_path / "out", VOC_CLASSES)
    assert list(stats["splits"]) == ["train", "val", "test"]
    inner = "" if images == "." else f"{images}/"
    assert sorted(by_file(tmp_path / "out", "val")) == [f"valid/{inner}valid_d.jpg"]
    assert sorted(by_file(tmp_path / "out", "train")) == [f"train/{inner}train_{s}.jpg" for s in "abc"]
    assert sorted(by_file(tmp_path / "out", "test")) == [f"test/{inner}test_e.jpg"]


def test_voc_split_folders_chosen_with_splits(tmp_path):
    src = tmp_path / "raw"
    for folder in ("train", "test"):
        voc_flat(src / folder, ".", ".", stems=(f"{folder}_a", f"{folder}_b"))
    stats = convert_dataset("voc", src, tmp_path / "out", VOC_CLASSES, splits={"train": "train", "val": "test"})
    assert sorted(by_file(tmp_path / "out", "val")) == ["test/test_a.jpg", "test/test_b.jpg"]
    assert list(stats["splits"]) == ["train", "val"]
    with pytest.raises(DetpipeError) as err:
        convert_dataset("voc", src, tmp_path / "out2", VOC_CLASSES, splits={"train": "train", "val": "valid"})
    assert str(err.value) == (f"{src}/valid: split folder is missing or holds no Pascal VOC annotations "
                              "(split folders here: test, train)")


def test_voc_train_folder_without_val_is_split_with_a_seed(tmp_path):
    """``train/`` and ``test/`` but no ``val/``: train is split with the seed, test (and its classes) left out."""
    src = voc_flat(tmp_path / "raw" / "train", ".", ".").parent
    put(src / "test/t.xml", voc_xml("t.jpg", (32, 24), "horse", (2, 3, 20, 21)))
    make_image(src / "test/t.jpg", 32, 24)
    stats = convert_dataset("voc", src, tmp_path / "out", None, val_fraction=0.25, seed=0)
    assert (stats["splits"]["train"]["images"], stats["splits"]["val"]["images"]) == (3, 1)
    assert sorted(by_file(tmp_path / "out", "train", "val")) == [f"train/{s}.jpg" for s in "abcd"]
    assert stats["classes"] == ["cat", "dog"]


def test_voc_image_found_by_name_then_by_stem(tmp_path):
    """``<filename>`` as written, a Windows path's last part, or, when nothing has that name, the stem."""
    src = tmp_path / "raw"
    sizes = {"images/a.jpg": (32, 24), "images/b.png": (30, 20), "images/c.jpg": (20, 16),
             "annotations/d.jpg": (16, 12)}
    for name, size in sizes.items():
        make_image(src / name, *size)
    put(src / "annotations/a.xml", voc_xml(r"C:\Users\me\labelImg\a.jpg", (32, 24), "cat", (1, 1, 9, 9)))
    put(src / "annotations/b.xml", voc_xml("b.jpg", (30, 20), "cat", (1, 1, 9, 9)))  # converted to PNG since
    put(src / "annotations/c.xml", voc_xml(None, (20, 16), "dog", (1, 1, 9, 9)))  # no <filename>
    put(src / "annotations/d.xml", voc_xml("d.jpg", (16, 12), "dog", (1, 1, 9, 9)))  # beside its XML
    convert_dataset("voc", src, tmp_path / "out", VOC_CLASSES, val_fraction=0.25)
    assert sorted(by_file(tmp_path / "out", "train", "val")) == sorted(sizes)


def test_voc_missing_image_in_a_flat_layout_is_named(tmp_path):
    src = voc_flat(tmp_path / "raw", "annotations", "images")
    (src / "images/c.jpg").unlink()
    with pytest.raises(DetpipeError) as err:
        convert_dataset("voc", src, tmp_path / "out", VOC_CLASSES)
    assert str(err.value) == f"{src}: labels refer to 1 missing image(s): images/c.jpg"


def yolo_labels_folder(root):
    make_image(root / "images/a.jpg", 32, 24)
    put(root / "labels/a.txt", "0 0.5 0.5 0.2 0.2\n")


def images_only(root):
    make_image(root / "a.jpg", 32, 24)
    make_image(root / "train/b.jpg", 32, 24)


@pytest.mark.parametrize("build", [yolo_labels_folder, images_only])
def test_voc_no_layout_names_what_was_looked_for(tmp_path, build):
    src = tmp_path / "raw"
    build(src)
    with pytest.raises(DetpipeError) as err:
        convert_dataset("voc", src, tmp_path / "out", VOC_CLASSES)
    assert str(err.value) == (f"{src}: no Pascal VOC annotations found; looked for Annotations/ with JPEGImages/, "
                              "annotations/ with images/, *.xml beside images, train/ val/ valid/ test/ split folders")
    assert not (tmp_path / "out").exists()


def test_voc_writer_output_moved_into_a_flat_layout(tmp_path):
    """The devkit the writer makes, renamed as many sets ship it (lower case, no lists), reads the same."""
    a = make_image(tmp_path / "src/a.jpg", 40, 30)
    records = {"train": [{"filename": "a.jpg", "ann": {"bboxes": [[0, 0, 20, 25]], "labels": [1]}}]}
    voc.write(tmp_path / "raw", records, VOC_CLASSES, lambda rec: a)
    (tmp_path / "raw/Annotations").rename(tmp_path / "raw/annotations")
    (tmp_path / "raw/JPEGImages").rename(tmp_path / "raw/images")
    (tmp_path / "raw/ImageSets/Main/train.txt").unlink()
    loaded = voc.load(tmp_path / "raw", ClassList(VOC_CLASSES), {})
    assert loaded == [{"filename": "images/a.jpg", "width": 40, "height": 30,
                       "ann": {"bboxes": [[0, 0, 20, 25]], "labels": [1], "bboxes_ignore": [], "labels_ignore": [],
                               "attributes": [{}]}, "events": {}}]
