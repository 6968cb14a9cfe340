"""The download stage: put a dataset's raw files, as published, into one folder, and record their hash.

Sources (``params/datasets.yaml``): ``synthetic`` (generated from a seed), ``local`` (a folder copied as
it is) and ``url`` (archives downloaded, verified and unpacked by :mod:`detpipe.archives`). The output
is written whole or not at all; ``.download.json`` in it records the source and the content hash.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from tqdm import tqdm

from detpipe import synthetic
from detpipe.archives import fetch_dataset
from detpipe.errors import DetpipeError
from detpipe.files import atomic_dir, read_marker, write_marker

GB = 1 << 30


def _synthetic(entry: dict, out: Path) -> None:
    gen = entry["generate"]
    with tqdm(total=gen["num_train"] + gen["num_val"], desc="generate", unit="img", file=sys.stderr) as bar:
        synthetic.generate(out, num_train=gen["num_train"], num_val=gen["num_val"], image_size=gen["image_size"],
                           max_objects=gen["max_objects"], seed=gen["seed"], classes=tuple(entry["classes"]),
                           progress=bar.update)


def _local(entry: dict, out: Path, where: str) -> None:
    src = Path(entry["path"])
    if not src.is_dir():
        raise DetpipeError(f"{where}.path: folder {src} does not exist")
    shutil.copytree(src, out, dirs_exist_ok=True)


def run(entry: dict, out: Path, *, cache: Path, max_unpacked_gb: float, max_ratio: float, retries: int,
        where: str = "dataset") -> None:
    """Fill ``out`` from the registry ``entry`` (``where`` names it in errors, e.g. ``datasets.yaml: voc2007``).

    An output already made from the same archives is kept: their hashes pin the content.
    """
    out = Path(out)
    source = entry["source"]
    if source == "url":
        archives = [dict(a) for a in entry["archives"]]
        marker = read_marker(out) if out.is_dir() else None
        if marker is not None and marker.get("source") == archives:
            print(f"{out}: already downloaded and verified")
            return
        with atomic_dir(out) as tmp:
            fetch_dataset(archives, tmp, cache=Path(cache), max_bytes=int(max_unpacked_gb * GB), max_ratio=max_ratio,
                          retries=retries)
            write_marker(tmp, archives)
        return
    with atomic_dir(out) as tmp:
        if source == "synthetic":
            _synthetic(entry, tmp)
        elif source == "local":
            _local(entry, tmp, where)
        else:
            raise DetpipeError(f"{where}: unknown source {source!r}")
        write_marker(tmp, entry)
