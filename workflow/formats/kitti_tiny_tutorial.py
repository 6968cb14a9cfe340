"""The mmdetection tutorial's custom dataset, as a detpipe format plugin (walked through in docs/datasets.md).

The tutorial subclasses ``CustomDataset`` and overrides ``load_annotations`` to read KITTI-tiny's label
files into middle-format records. Here the same function is registered by name: every ``*.py`` in
``workflow/formats/`` is imported by the convert stage, so ``format: kitti_tiny_tutorial`` in
params/datasets.yaml and ``python stages/convert.py --format kitti_tiny_tutorial`` both use it.
detpipe then does the rest: image sizes from headers, missing-image and duplicate checks, clipping,
COCO and middle-format files. (The built-in ``kitti`` format does the same with file:line errors.)
"""

from pathlib import Path

from detpipe.formats import register


@register("kitti_tiny_tutorial")
def load_annotations(src: Path, classes: list[str], splits: dict) -> dict[str, list[dict]]:
    cat2label = {name: i for i, name in enumerate(classes)}
    out = {}
    for split, list_file in (splits or {"train": "train.txt", "val": "val.txt"}).items():
        records = []
        for image_id in (src / list_file).read_text().split():
            bboxes, labels, bboxes_ignore, labels_ignore = [], [], [], []
            for line in (src / "training/label_2" / f"{image_id}.txt").read_text().splitlines():
                fields = line.split()
                box = [float(v) for v in fields[4:8]]  # x1 y1 x2 y2 in pixels
                if fields[0] in cat2label:
                    bboxes.append(box)
                    labels.append(cat2label[fields[0]])
                else:  # DontCare and the classes we did not pick: regions the evaluation ignores
                    bboxes_ignore.append(box)
                    labels_ignore.append(-1)
            records.append({"filename": f"training/image_2/{image_id}.jpeg",
                            "ann": {"bboxes": bboxes, "labels": labels,
                                    "bboxes_ignore": bboxes_ignore, "labels_ignore": labels_ignore}})
        out[split] = records
    return out
