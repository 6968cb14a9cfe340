"""What every stage script shares: the params/override flags and one-line errors with exit status 2."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Callable

from detpipe.errors import DetpipeError, reset_terminated, terminate

# Input folders the later stages read, by flag: default (the pipeline's layout) and meaning.
INPUTS = {
    "data": ("data/coco", "converted dataset"),
    "images": ("data/raw", "image root"),
    "model": ("runs/train", "train stage output (model.pt, run.json, logs)"),
    "eval": ("runs/eval", "evaluate stage output (metrics, predictions)"),
}


def parser(description: str, *inputs: str) -> argparse.ArgumentParser:
    """Flags every stage has, plus the named input-folder flags of :data:`INPUTS`."""
    p = argparse.ArgumentParser(description=description)
    for flag in inputs:
        default, meaning = INPUTS[flag]
        p.add_argument(f"--{flag}", default=default, help=f"{meaning} (default: %(default)s)")
    p.add_argument("--params", default="params/detpipe.yaml", help="params file (default: %(default)s)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a param for this run only, e.g. --set train.lr=0.02 (repeatable)")
    return p


def main(fn: Callable[[], None]) -> None:
    """Run a stage; a user error becomes ``error: <one line>`` on stderr and exit status 2.

    SIGTERM (what Snakemake and DVC send to a cancelled job) unwinds like Ctrl-C: no temporary output stays.
    """
    previous = signal.signal(signal.SIGTERM, terminate)  # temporary outputs removed, as for Ctrl-C
    try:
        fn()
    except DetpipeError as exc:
        if os.environ.get("RANK", "0") == "0":  # under torchrun every process fails alike: rank 0 says it once
            print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)  # one line, whatever the message held
        sys.exit(2)
    except KeyboardInterrupt:
        print("error: interrupted; no output was written", file=sys.stderr)
        sys.exit(130)
    finally:  # a stage run in-process (tests, notebooks) leaves SIGTERM as it found it
        signal.signal(signal.SIGTERM, previous)
        reset_terminated()
