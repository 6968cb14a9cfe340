"""Compare an experiment's training runs from MLflow: one row per run, best first (docs/tracking.md).

python -m detpipe.compare [--experiment NAME] [--out runs.csv | runs.md]

Columns: run name and id, how it was launched (DVC experiment name, Snakemake run id, or the launcher), the hash
of the converted data it trained on, the key metrics of its latest evaluation (bbox_mAP, bbox_mAP_50, ...), and
only the params that differ between the runs. The experiment defaults to the params file's ``experiment``.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from detpipe import cli, config, tracking
from detpipe.errors import DetpipeError
from detpipe.files import write_text


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "" if value is None else str(value)


def markdown(rows: list[dict]) -> str:
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(r[c]).replace("|", "\\|") for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def to_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: _cell(v) for k, v in r.items()} for r in rows)
    return buf.getvalue()


def text(rows: list[dict]) -> str:
    """Aligned columns for a terminal (run ids cut to 8 characters)."""
    table = [list(rows[0])] + [[_cell(r[c])[:8] if c == "run_id" else _cell(r[c]) for c in r] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in table) + "\n"


WRITERS = {".csv": to_csv, ".md": markdown}


def run(experiment: str, out: Path | None = None) -> list[dict]:
    """Print the comparison of ``experiment``'s runs (and write it to ``out``, CSV or Markdown by its suffix)."""
    if out is not None and Path(out).suffix not in WRITERS:
        raise DetpipeError(f"{out}: --out must end in .csv or .md")
    rows = tracking.comparison(experiment)
    store = tracking.without_credentials(tracking.tracking_uri())
    print(f"experiment {experiment!r}: {len(rows)} training runs, best first ({store})")
    print(text(rows), end="")
    if out is not None:
        write_text(Path(out), WRITERS[Path(out).suffix](rows))
    return rows


def main() -> None:
    p = cli.parser(__doc__)
    p.add_argument("--experiment", help="MLflow experiment (default: the params file's experiment)")
    p.add_argument("--out", help="also write the table to this .csv or .md file")
    args = p.parse_args()
    experiment = args.experiment or config.load(args.params, args.overrides).experiment
    run(experiment, Path(args.out) if args.out else None)


if __name__ == "__main__":
    cli.main(main)
