"""Benchmark conversion: a generated dataset written in every format, converted, images/s printed.

    python -m detpipe.bench_convert --images 10000 --json docs/bench_convert.json

Each format's writer lays out the same records and images (hard links of a few distinct JPEGs, so
disk use stays small); :func:`detpipe.convert.convert_dataset` then converts each, timed. The baseline
converts the VIA copy again with image sizes taken from a full decode of every image, as the
tutorial's ``mmcv.imread(...).shape`` does; the ratio is what header-only reads buy.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import tempfile
import time
from pathlib import Path
from unittest import mock

import numpy as np
from PIL import Image

from detpipe import convert
from detpipe.formats import coco, kitti, via, voc, yolo

WRITERS = {"coco": coco.write, "kitti": kitti.write, "via": via.write, "voc": voc.write, "yolo": yolo.write}
CLASSES = ["Car", "Pedestrian", "Cyclist"]  # KITTI type names, so the same records suit every format


def make_records(n: int, width: int, height: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    records = []
    for i in range(n):
        boxes, labels = [], []
        for _ in range(rng.randint(1, 6)):
            x1, y1 = rng.uniform(0, width - 40), rng.uniform(0, height - 40)
            boxes.append([round(x1, 1), round(y1, 1), round(x1 + rng.uniform(20, 200), 1),
                          round(y1 + rng.uniform(20, 150), 1)])
            labels.append(rng.randrange(len(CLASSES)))
        records.append({"filename": f"{i:06d}.jpg", "ann": {"bboxes": boxes, "labels": labels}})
    return records


def full_decode_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as im:
        return im.convert("RGB").size


def timed_sizes(read, paths: list[Path]) -> float:
    start = time.perf_counter()
    for path in paths:
        read(path)
    return round(time.perf_counter() - start, 2)


def timed_convert(fmt: str, src: Path, out: Path) -> float:
    start = time.perf_counter()
    convert.convert_dataset(fmt, src, out, CLASSES, val_fraction=0.1, seed=0)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=10000)
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--json", type=Path, help="write the figures here")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rng = np.random.default_rng(0)
        sources = []
        for i in range(16):  # photo-like: a smooth colour field plus sensor noise, JPEG quality 90
            field = Image.fromarray(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)).resize(
                (args.width, args.height), Image.BICUBIC)
            noisy = np.asarray(field, dtype=np.int16) + rng.normal(0, 6, (args.height, args.width, 3)).astype(np.int16)
            path = tmp / f"src{i}.jpg"
            Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(path, quality=90)
            sources.append(path)
        records = make_records(args.images, args.width, args.height, seed=0)
        splits = {"train": records[: len(records) * 9 // 10], "val": records[len(records) * 9 // 10:]}
        rows = []
        for fmt, write in WRITERS.items():
            root = tmp / fmt
            start = time.perf_counter()
            write(root, splits, CLASSES, lambda rec: sources[int(rec["filename"][:6]) % len(sources)])
            written = time.perf_counter() - start
            seconds = timed_convert(fmt, root, tmp / f"{fmt}_out")
            rows.append({"format": fmt, "images": args.images, "write_s": round(written, 2),
                         "convert_s": round(seconds, 2), "images_per_s": round(args.images / seconds)})
        convert.image_size.cache_clear()
        with mock.patch.object(convert, "image_size", full_decode_size):
            seconds = timed_convert("via", tmp / "via", tmp / "via_decoded")
        baseline = {"format": "via, full decode", "images": args.images, "convert_s": round(seconds, 2),
                    "images_per_s": round(args.images / seconds)}
        paths = sorted((tmp / "via").rglob("*.jpg"))
        convert.image_size.cache_clear()
        sizes = {"header_s": timed_sizes(convert.image_size, paths), "decode_s": timed_sizes(full_decode_size, paths)}
    header_only = next(r for r in rows if r["format"] == "via")
    speedup = {"conversion": round(baseline["convert_s"] / header_only["convert_s"], 1),
               "image_sizes": round(sizes["decode_s"] / sizes["header_s"], 1)}
    print(f"{'format':<18}{'images':>8}{'convert s':>11}{'images/s':>10}")
    for r in [*rows, baseline]:
        print(f"{r['format']:<18}{r['images']:>8}{r['convert_s']:>11}{r['images_per_s']:>10}")
    print(f"reading {args.images} image sizes: header {sizes['header_s']} s, full decode {sizes['decode_s']} s "
          f"({speedup['image_sizes']}x); whole VIA conversion {speedup['conversion']}x faster than with decoding")
    if args.json:
        machine = {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()}
        args.json.write_text(json.dumps({"machine": machine, "image_size": [args.width, args.height],
                                         "formats": rows, "full_decode_baseline": baseline, "image_sizes": sizes,
                                         "speedup_header_only": speedup}, indent=1) + "\n")


if __name__ == "__main__":
    main()
