"""Property test: random annotations written in every raw format convert back to the same boxes and labels."""

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pycocotools.coco import COCO

from benchmarks.bench_convert import WRITERS
from detpipe.conversion import convert_dataset
from tests.fixtures import make_image

CLASSES = ["Car", "Pedestrian", "Cyclist"]  # valid KITTI types, so one class list suits every format
WITH_OUTLINES = {"coco", "via", "yolo"}
# How each format can say "ignore this region": KITTI only for every class (DontCare, -1), VOC (difficult)
# and COCO (iscrowd) only for one class; VIA and YOLO cannot.
IGNORE_LABEL = {"kitti": lambda label: -1, "voc": lambda label: label, "coco": lambda label: label}
MODES = ["RGB", "L", "RGBA", "P", "I;16"]


@st.composite
def boxes_in(draw, width: int, height: int):
    x1 = draw(st.integers(0, width - 4))
    y1 = draw(st.integers(0, height - 4))
    return [x1, y1, draw(st.integers(x1 + 3, width)), draw(st.integers(y1 + 3, height))]


@st.composite
def image_records(draw, index: int):
    width, height = draw(st.integers(8, 120)), draw(st.integers(8, 120))
    boxes = draw(st.lists(boxes_in(width, height), max_size=4))
    labels = draw(st.lists(st.integers(0, len(CLASSES) - 1), min_size=len(boxes), max_size=len(boxes)))
    ignore = draw(st.lists(boxes_in(width, height), max_size=2))
    ignore_labels = draw(st.lists(st.integers(0, len(CLASSES) - 1), min_size=len(ignore), max_size=len(ignore)))
    return {"filename": f"img{index:03d}.png", "width": width, "height": height, "mode": draw(st.sampled_from(MODES)),
            "ann": {"bboxes": boxes, "labels": labels, "bboxes_ignore": ignore, "labels_ignore": ignore_labels}}


@st.composite
def datasets(draw):
    n = draw(st.integers(2, 5))
    records = [draw(image_records(i)) for i in range(n)]
    cut = draw(st.integers(1, n - 1))
    return {"train": records[:cut], "val": records[cut:]}


def outline(box):
    x1, y1, x2, y2 = box
    return [[x1, y1, x2, (y1 + y2) / 2, x1, y2]]  # a triangle whose box is ``box``


@pytest.mark.parametrize("fmt", sorted(WRITERS))
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=datasets(), outlines=st.booleans())
def test_round_trip_through_every_format(fmt, data, outlines, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(fmt)
    with_masks = outlines and fmt in WITH_OUTLINES
    images = {}
    for records in data.values():
        for rec in records:
            images[rec["filename"]] = make_image(tmp / "src" / rec["filename"], rec["width"], rec["height"],
                                                 rec.pop("mode"))
            ann = rec["ann"]
            if with_masks:
                ann["masks"] = [outline(b) for b in ann["bboxes"]]
            if fmt in IGNORE_LABEL:
                ann["labels_ignore"] = [IGNORE_LABEL[fmt](label) for label in ann["labels_ignore"]]
            else:
                ann["bboxes_ignore"], ann["labels_ignore"] = [], []
    WRITERS[fmt](tmp / "raw", data, CLASSES, lambda rec: images[rec["filename"]])
    convert_dataset(fmt, tmp / "raw", tmp / "out", CLASSES, min_box_size=1)
    for split, records in data.items():
        coco = json.loads((tmp / "out" / f"{split}.json").read_text())
        COCO(str(tmp / "out" / f"{split}.json"))
        middle = {rec["filename"].rsplit("/", 1)[-1]: rec for rec in
                  json.loads((tmp / "out" / f"{split}_middle.json").read_text())}
        assert sorted(middle) == sorted(rec["filename"] for rec in records)
        for rec in records:
            got = middle[rec["filename"]]
            assert (got["width"], got["height"]) == (rec["width"], rec["height"])
            for key in ("bboxes", "bboxes_ignore"):
                assert got["ann"][key.replace("bboxes", "labels")] == rec["ann"][key.replace("bboxes", "labels")]
                assert len(got["ann"][key]) == len(rec["ann"][key])
                for box, want in zip(got["ann"][key], rec["ann"][key]):
                    assert box == pytest.approx(want, abs=0.02)
        assert [c["name"] for c in coco["categories"]] == CLASSES
        if with_masks:
            areas = sorted(a["area"] for a in coco["annotations"] if not a["iscrowd"])
            want = sorted(0.5 * (b[2] - b[0]) * (b[3] - b[1]) for r in records for b in r["ann"]["bboxes"])
            assert areas == pytest.approx(want, rel=1e-3, abs=0.5)  # the triangle's area, not its box's
