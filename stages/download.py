"""Stage 1: put the selected dataset's raw files, as published, into data/raw."""

import shutil
from pathlib import Path

from detpipe import cli, config
from detpipe.errors import DetpipeError
from detpipe.io import atomic_dir


def run() -> None:
    p = cli.parser(__doc__)
    p.add_argument("--out", default="data/raw", help="output folder (default: %(default)s)")
    args = p.parse_args()
    cfg = config.load(args.params, args.overrides)
    entry = cfg.data
    with atomic_dir(Path(args.out)) as tmp:
        if entry.source == "synthetic":
            from tqdm import tqdm

            from detpipe.formats import synthetic

            gen = entry.generate
            with tqdm(total=gen.num_train + gen.num_val, desc="generate", unit="img") as bar:
                synthetic.generate(tmp, num_train=gen.num_train, num_val=gen.num_val,
                                   image_size=gen.image_size, max_objects=gen.max_objects, seed=gen.seed,
                                   classes=tuple(entry.classes), progress=bar.update)
        elif entry.source == "url":
            from detpipe.download import fetch_dataset

            fetch_dataset(entry.url, entry.sha256, tmp, entry.subdir)
        else:
            src = Path(entry.path)
            if not src.is_dir():
                raise DetpipeError(f"{config.DATASETS_FILE}: {cfg.dataset}.path: folder {src} does not exist")
            shutil.copytree(src, tmp, dirs_exist_ok=True)


if __name__ == "__main__":
    cli.main(run)
