"""Stage 5: one self-contained HTML report of the run (metrics, dataset, training, evaluation, provenance, runs).

python stages/report.py --data data/coco --images data/raw --model runs/train --eval runs/eval \
    --out reports/index.html --figures reports/figures
"""

from pathlib import Path

from detpipe import cli, config, report


def main() -> None:
    p = cli.parser(__doc__, "data", "images", "model", "eval")
    p.add_argument("--out", default="reports/index.html", help="HTML file to write (default: %(default)s)")
    p.add_argument("--figures", default="reports/figures",
                   help="folder for the page's figures as files, for `snakemake --report` (default: %(default)s)")
    args = p.parse_args()
    cfg = config.load(args.params, args.overrides)
    report.run(cfg, Path(args.data), Path(args.images), Path(args.model), Path(args.eval), Path(args.out),
               Path(args.figures))


if __name__ == "__main__":
    cli.main(main)
