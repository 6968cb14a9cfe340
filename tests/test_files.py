"""Atomic outputs: whole or absent, and what a SIGKILL leaves behind is cleared by the next write."""

import os
import signal
import subprocess
import sys

import pytest

from detpipe.files import atomic_dir, atomic_path, remove_stale_temporaries, write_text

KILLED_MID_WRITE = """
import os, signal, sys
from pathlib import Path
from detpipe.files import atomic_dir, atomic_path
target = Path(sys.argv[1])
with (atomic_dir if sys.argv[2] == "dir" else atomic_path)(target) as tmp:
    (tmp / "half.txt" if sys.argv[2] == "dir" else tmp).write_text("half")
    os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.parametrize("kind", ["dir", "file"])
def test_a_killed_write_leaves_a_temporary_that_the_next_write_removes(tmp_path, kind):
    target = tmp_path / "out" / ("raw" if kind == "dir" else "metrics.json")
    result = subprocess.run([sys.executable, "-c", KILLED_MID_WRITE, str(target), kind])
    assert result.returncode == -signal.SIGKILL
    [left] = list(target.parent.glob(f".{target.name}.*.tmp"))
    assert not target.exists()
    if kind == "dir":
        with atomic_dir(target) as tmp:
            (tmp / "whole.txt").write_text("whole")
    else:
        write_text(target, "whole")
    assert not left.exists() and sorted(p.name for p in target.parent.iterdir()) == [target.name]


def test_temporaries_of_a_live_process_are_kept(tmp_path):
    mine = tmp_path / f".out.{os.getpid()}.abc.tmp"
    mine.mkdir()
    other = tmp_path / ".out.notapid.tmp"
    other.write_text("")
    assert remove_stale_temporaries(tmp_path / "out") == []
    assert mine.exists() and other.exists()


def test_a_failed_block_leaves_no_output_and_no_temporary(tmp_path):
    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "a" / "b") as tmp:
        (tmp / "x").write_text("x")
        raise RuntimeError
    assert not (tmp_path / "a").exists()  # parents this call made are removed too
    (tmp_path / "f").write_text("old")
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "f") as tmp:
        tmp.write_text("new")
        raise RuntimeError
    assert (tmp_path / "f").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["f"]


def test_temporaries_of_a_similarly_named_output_are_not_touched(tmp_path):
    other = tmp_path / ".train.2.999999.abc.tmp"  # the temporary of output "train.2", not of "train"
    other.mkdir()
    assert remove_stale_temporaries(tmp_path / "train") == []
    assert other.exists()
