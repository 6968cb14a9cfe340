"""Stage 3: train the detector named in params on the train split; one MLflow run per training.

python stages/train.py --data data/coco --images data/raw --out runs/train
"""

import os
import sys
from pathlib import Path

from detpipe import cli, config, train


def main() -> None:
    p = cli.parser(__doc__, "data", "images")
    p.add_argument("--out", default="runs/train", help="output folder (default: %(default)s)")
    args = p.parse_args()
    cfg = config.load(args.params, args.overrides)
    launch = train.launch_command(cfg, sys.argv)
    if launch:  # train.processes > 1: the same script again, once per process, under torchrun
        os.execv(launch[0], launch)
    train.run(cfg, Path(args.data), Path(args.images), Path(args.out))


if __name__ == "__main__":
    cli.main(main)
