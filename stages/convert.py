"""Stage 2: raw dataset -> COCO JSON per split, mmdetection's middle format, and a stats file."""

from pathlib import Path

from detpipe import cli, config, convert
from detpipe.errors import DetpipeError


def run() -> None:
    p = cli.parser(__doc__)
    p.add_argument("--src", default="data/raw", help="raw dataset folder (default: %(default)s)")
    p.add_argument("--out", default="data/coco", help="output folder (default: %(default)s)")
    args = p.parse_args()
    cfg = config.load(args.params, args.overrides)
    src = Path(args.src)
    if not src.is_dir():
        raise DetpipeError(f"{src}: raw dataset folder does not exist; run the download stage first")
    convert.convert_dataset(cfg.data.format, src, Path(args.out), cfg.data.classes,
                            min_box_size=cfg.convert.min_box_size)


if __name__ == "__main__":
    cli.main(run)
