"""Stage 4: COCO bbox (and segm for mask models) metrics of the trained model on the val split.

python stages/evaluate.py --data data/coco --images data/raw --model runs/train --out runs/eval
Any checkpoint, any split (no MLflow logging): ... --checkpoint some/model.pt --split train --out DIR
"""

from pathlib import Path

from detpipe import cli, config, evaluate


def main() -> None:
    p = cli.parser(__doc__, "data", "images", "model")
    p.add_argument("--out", default="runs/eval", help="output folder (default: %(default)s)")
    p.add_argument("--checkpoint", help="standalone: score this model.pt instead of --model's (not logged to MLflow)")
    p.add_argument("--split", default="val", help="split of --data to score (default: %(default)s)")
    args = p.parse_args()
    cfg = config.load(args.params, args.overrides)
    evaluate.run(cfg, Path(args.data), Path(args.images), Path(args.model), Path(args.out),
                 checkpoint=Path(args.checkpoint) if args.checkpoint else None, split=args.split)


if __name__ == "__main__":
    cli.main(main)
