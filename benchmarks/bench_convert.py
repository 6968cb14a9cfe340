"""Benchmark conversion: a generated dataset written in every format, converted, images/s printed.

    python -m benchmarks.bench_convert --images 10000 --json docs/bench_convert.json

Per format, its writer lays out 10,000 records with images the size and type that format's best-known
dataset has (hard links of 16 distinct photo-like files, so disk use stays small), and
:func:`detpipe.conversion.convert_dataset` converts them, timed. The baseline converts the same folder
again with every image size taken from a full decode, as the tutorial's ``mmcv.imread(...).shape``
does; the ratio is what header-only reads buy. The size reading alone is timed both ways too.
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

from detpipe import conversion as convert
from detpipe.formats import coco, kitti, via, voc, yolo

WRITERS = {"coco": coco.write, "kitti": kitti.write, "via": via.write, "voc": voc.write, "yolo": yolo.write}
CLASSES = ["Car", "Pedestrian", "Cyclist"]  # KITTI type names, so the same records suit every format
# Each format's images as its best-known dataset ships them: COCO and coco128 640x480 JPEG, KITTI's
# 1242x375 PNG, the balloon set's 1024x768 JPEG, VOC's 500x375 JPEG.
TYPICAL = {"coco": (640, 480, ".jpg"), "kitti": (1242, 375, ".png"), "via": (1024, 768, ".jpg"),
           "voc": (500, 375, ".jpg"), "yolo": (640, 480, ".jpg")}


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


def photo_like(path: Path, width: int, height: int, rng: np.random.Generator) -> Path:
    """A smooth colour field plus sensor noise: compresses and decodes like a photo, unlike pure noise."""
    field = Image.fromarray(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC)
    noisy = np.asarray(field, dtype=np.int16) + rng.normal(0, 6, (height, width, 3)).astype(np.int16)
    Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(path, quality=90)
    return path


def bench_format(fmt: str, tmp: Path, n: int) -> dict:
    width, height, suffix = TYPICAL[fmt]
    rng = np.random.default_rng(0)
    sources = [photo_like(tmp / f"{fmt}_src{i}{suffix}", width, height, rng) for i in range(16)]
    records = make_records(n, width, height, seed=0)
    for rec in records:
        rec["filename"] = rec["filename"].replace(".jpg", suffix)
    splits = {"train": records[: n * 9 // 10], "val": records[n * 9 // 10:]}
    root = tmp / fmt
    WRITERS[fmt](root, splits, CLASSES, lambda rec: sources[int(rec["filename"][:6]) % len(sources)])
    header = timed_convert(fmt, root, tmp / f"{fmt}_out")
    with mock.patch.object(convert, "image_size", full_decode_size):
        decode = timed_convert(fmt, root, tmp / f"{fmt}_decoded")
    paths = sorted(p for p in root.rglob(f"*{suffix}"))
    convert.image_size.cache_clear()
    sizes = {"header": timed_sizes(convert.image_size, paths), "decode": timed_sizes(full_decode_size, paths)}
    return {"format": fmt, "images": n, "image": f"{width}x{height} {suffix[1:]}", "convert_s": round(header, 2),
            "images_per_s": round(n / header), "convert_with_decode_s": round(decode, 2),
            "conversion_speedup": round(decode / header, 1), "sizes_header_s": sizes["header"],
            "sizes_decode_s": sizes["decode"], "sizes_speedup": round(sizes["decode"] / sizes["header"], 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=10000)
    p.add_argument("--json", type=Path, help="write the figures here")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [bench_format(fmt, Path(tmp), args.images) for fmt in WRITERS]
    cols = [("format", 7), ("image", 15), ("convert_s", 10), ("images_per_s", 13), ("convert_with_decode_s", 22),
            ("conversion_speedup", 19), ("sizes_header_s", 15), ("sizes_decode_s", 15), ("sizes_speedup", 14)]
    print("".join(f"{name:>{width}}" for name, width in cols))
    for r in rows:
        print("".join(f"{r[name]!s:>{width}}" for name, width in cols))
    if args.json:
        machine = {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()}
        args.json.write_text(json.dumps({"machine": machine, "formats": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
