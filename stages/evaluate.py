"""Stage 4: COCO bbox (and segm for mask models) metrics of the trained model on the val split.

python stages/evaluate.py --data data/coco --images data/raw --model runs/train --out runs/eval
"""

from pathlib import Path

from detpipe import cli, config, evaluate


def main() -> None:
    p = cli.parser(__doc__, "data", "images", "model")
    p.add_argument("--out", default="runs/eval", help="output folder (default: %(default)s)")
    args = p.parse_args()
    cfg = config.load(args.params, args.overrides)
    evaluate.run(cfg, Path(args.data), Path(args.images), Path(args.model), Path(args.out))


if __name__ == "__main__":
    cli.main(main)
