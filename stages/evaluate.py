"""Stage 4: COCO bbox (and segm for mask models) metrics of the trained model on the val split."""

import json
import sys
from pathlib import Path

from detpipe import cli, config


def run() -> None:
    p = cli.parser(__doc__, "data", "images", "train-dir")
    p.add_argument("--out", default="runs/eval", help="output folder (default: %(default)s)")
    args = p.parse_args()
    cfg = config.load(args.params, args.overrides)
    from detpipe.evaluation import run_evaluation

    metrics = run_evaluation(cfg, Path(args.data), Path(args.images), Path(args.train_dir), Path(args.out))
    print(json.dumps(metrics, indent=1), file=sys.stderr)


if __name__ == "__main__":
    cli.main(run)
