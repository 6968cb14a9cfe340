"""Raw folder -> ``<split>.json`` (COCO), ``<split>_middle.json`` (mmdetection middle format), ``stats.json``."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from detpipe.errors import DetpipeError
from detpipe.formats import middle
from detpipe.io import atomic_dir, tree_hash, write_json

FORMATS = ("via",)


def _converter(fmt: str):
    if fmt == "via":
        from detpipe.formats import via

        return via.convert
    raise DetpipeError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")


def stats_of(coco: dict, events: dict) -> dict:
    names = {c["id"]: c["name"] for c in coco["categories"]}
    per_class = Counter(names[a["category_id"]] for a in coco["annotations"] if not a.get("iscrowd"))
    return {
        "images": len(coco["images"]),
        "objects": sum(per_class.values()),
        "ignored": sum(1 for a in coco["annotations"] if a.get("iscrowd")),
        "objects_per_class": {n: per_class.get(n, 0) for n in names.values()},
        "boxes_changed": {"clipped_outside_image": 0, "dropped_degenerate": 0, **events},
    }


def convert_dataset(fmt: str, src: Path, out: Path, classes: list[str], min_box_size: float = 1.0) -> dict:
    """Convert ``src`` into ``out`` atomically; returns the stats written to ``stats.json``."""
    splits = _converter(fmt)(src, list(classes), min_box_size=min_box_size)
    stats = {"format": fmt, "classes": list(classes), "content_hash": tree_hash(src), "splits": {}}
    with atomic_dir(out) as tmp:
        for split, (coco, events) in splits.items():
            write_json(tmp / f"{split}.json", coco)
            write_json(tmp / f"{split}_middle.json", middle.from_coco(coco))
            stats["splits"][split] = stats_of(coco, events)
        write_json(tmp / "stats.json", stats)
    return stats
