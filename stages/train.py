"""Stage 3: train the detector named in params on the train split; one MLflow run per training."""

import sys
import time
from pathlib import Path

from detpipe import cli, config


def run() -> None:
    p = cli.parser(__doc__, "data", "images")
    p.add_argument("--out", default="runs/train", help="output folder (default: %(default)s)")
    args = p.parse_args()
    cfg = config.load(args.params, args.overrides)
    from detpipe.training import run_training

    start = time.time()
    run_training(cfg, Path(args.data), Path(args.images), Path(args.out))
    print(f"trained in {time.time() - start:.0f}s -> {args.out}", file=sys.stderr)


if __name__ == "__main__":
    cli.main(run)
