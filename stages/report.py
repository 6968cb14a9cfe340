"""Stage 5: one self-contained HTML report of the run (metrics, curves, samples, metadata, earlier runs)."""

import json
import sys
from pathlib import Path

from detpipe import cli, config
from detpipe.errors import DetpipeError


def run() -> None:
    p = cli.parser(__doc__, "data", "images", "train-dir", "eval-dir")
    p.add_argument("--out", default="reports/index.html", help="HTML file to write (default: %(default)s)")
    args = p.parse_args()
    cfg = config.load(args.params, args.overrides)
    for folder in (args.data, args.train_dir, args.eval_dir):
        if not Path(folder).is_dir():
            raise DetpipeError(f"{folder}: missing; run the earlier stages first")
    from detpipe import tracking
    from detpipe.io import write_text
    from detpipe.report import build_report

    page = build_report(cfg, Path(args.data), Path(args.images), Path(args.train_dir), Path(args.eval_dir))
    write_text(Path(args.out), page)
    run_id = json.loads((Path(args.train_dir) / "run.json").read_text())["run_id"]
    tracking.Run(run_id).log_artifact(Path(args.out), "report")
    print(f"report -> {args.out}", file=sys.stderr)


if __name__ == "__main__":
    cli.main(run)
