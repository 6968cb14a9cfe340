"""Stage 1: put the selected dataset's raw files, as published, into data/raw.

Standalone (no params): python stages/download.py --url URL --sha256 HEX --out DIR [--subdir NAME]
"""

import json
import os
import shutil
from pathlib import Path

from detpipe import cli, config
from detpipe.download import fetch_dataset
from detpipe.errors import DetpipeError
from detpipe.io import MARKER, atomic_dir, write_marker

GB = 1 << 30


def _synthetic(entry, out: Path) -> None:
    from tqdm import tqdm

    from detpipe.formats import synthetic

    gen = entry.generate
    with tqdm(total=gen.num_train + gen.num_val, desc="generate", unit="img") as bar:
        synthetic.generate(out, num_train=gen.num_train, num_val=gen.num_val, image_size=gen.image_size,
                           max_objects=gen.max_objects, seed=gen.seed, classes=tuple(entry.classes),
                           progress=bar.update)


def _local(entry, out: Path, name: str) -> None:
    src = Path(entry.path)
    if not src.is_dir():
        raise DetpipeError(f"{config.DATASETS_FILE}: {name}.path: folder {src} does not exist")
    shutil.copytree(src, out, dirs_exist_ok=True)


def _archives(archives: list[dict], out: Path, cache: Path, max_gb: float, retries: int) -> None:
    marker = out / MARKER
    if marker.is_file() and json.loads(marker.read_text()).get("source") == archives:
        print(f"{out}: already downloaded and verified")
        return
    with atomic_dir(out) as tmp:
        fetch_dataset(archives, tmp, cache=cache, max_bytes=int(max_gb * GB), retries=retries)
        write_marker(tmp, archives)


def run() -> None:
    p = cli.parser(__doc__)
    p.add_argument("--out", default="data/raw", help="output folder (default: %(default)s)")
    p.add_argument("--url", help="standalone: archive URL or path (skips params)")
    p.add_argument("--sha256", help="standalone: expected sha256 of the archive")
    p.add_argument("--subdir", default="", help="standalone: folder inside the archive holding the dataset")
    p.add_argument("--cache", default=os.environ.get("DETPIPE_CACHE", str(Path.home() / ".cache/detpipe")),
                   help="standalone: where verified archives are kept (default: %(default)s)")
    args = p.parse_args()
    out = Path(args.out)
    if args.url:
        if not args.sha256:
            raise DetpipeError("--sha256 is required with --url (the archive is verified before unpacking)")
        _archives([{"url": args.url, "sha256": args.sha256, "subdir": args.subdir}], out,
                  Path(args.cache), max_gb=64, retries=4)
        return
    cfg = config.load(args.params, args.overrides)
    entry = cfg.data
    if entry.source == "url":
        dl = cfg.download
        _archives(config.dict_of(entry.archives), out, Path(dl.cache), dl.max_unpacked_gb, dl.retries)
        return
    with atomic_dir(out) as tmp:
        if entry.source == "synthetic":
            _synthetic(entry, tmp)
        else:
            _local(entry, tmp, cfg.dataset)
        write_marker(tmp, config.dict_of(entry))


if __name__ == "__main__":
    cli.main(run)
