"""Stands in for ``python stages/<name>.py ...`` in tests/test_reruns.py: writes the stage's declared outputs
(from the pipeline table) without doing the work, so Snakemake and DVC record a run in seconds."""

import sys
from pathlib import Path

from detpipe.pipeline import STAGES

stage = STAGES[Path(sys.argv[1]).stem]
for out in [*stage.outs, *stage.metrics]:
    path = Path(out) / "out.txt" if out in stage.dir_outs else Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{stage.name}\n")
