"""What every stage script shares: the params/override flags and one-line errors with exit status 2."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from detpipe.errors import DetpipeError


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--params", default="params/detpipe.yaml", help="params file (default: %(default)s)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a param for this run only, e.g. --set train.lr=0.02 (repeatable)")
    return p


def main(fn: Callable[[], None]) -> None:
    """Run a stage; a user error becomes ``error: <one line>`` on stderr and exit status 2."""
    try:
        fn()
    except DetpipeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("error: interrupted; no output was written", file=sys.stderr)
        sys.exit(130)
