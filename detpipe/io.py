"""Atomic writes: every output appears whole or not at all."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from detpipe.errors import DetpipeError


@contextlib.contextmanager
def atomic_path(path: Path):
    """Yield a temporary sibling of ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; outputs should read like any other file
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def read_json(path: Path, what: str):
    """A JSON file; missing or malformed is a one-line error naming ``what`` the file is, and the line."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise DetpipeError(f"{path}: {what} is missing") from None
    except json.JSONDecodeError as exc:
        raise DetpipeError(f"{path}:{exc.lineno}: malformed JSON ({exc.msg})") from None


def listing(items: list[str], n: int = 5) -> str:
    """The first ``n`` of ``items`` and how many more: for errors that list every problem of a kind."""
    more = f" (and {len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def write_json(path: Path, data, compact: bool = False) -> None:
    """Pretty JSON for files people read; ``compact`` for big data files (C encoder, several times faster)."""
    text = json.dumps(data, separators=(",", ":")) if compact else json.dumps(data, indent=1)
    write_text(path, text + "\n")


def atomic_torch_save(obj, path: Path) -> None:
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


@contextlib.contextmanager
def atomic_dir(path: Path):
    """Yield an empty temporary folder beside ``path``; it replaces ``path`` only if the block succeeds."""
    path = Path(path)
    missing = [p for p in [path.parent, *path.parent.parents] if not p.exists()]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        os.chmod(tmp, 0o755)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
            for folder in missing:  # parents this call made, innermost first, if still empty
                with contextlib.suppress(OSError):
                    folder.rmdir()


MARKER = ".download.json"  # written by the download stage into data/raw: the source and the content hash


def write_marker(raw: Path, source) -> None:
    write_json(Path(raw) / MARKER, {"source": source, "content_hash": tree_hash(raw)})


def content_hash(raw: Path) -> str:
    """The raw data's content hash: the download stage's record of it, else computed now."""
    marker = Path(raw) / MARKER
    return json.loads(marker.read_text())["content_hash"] if marker.is_file() else tree_hash(raw)


def tree_hash(folder: Path) -> str:
    """sha256 over every file's relative path and bytes (but the download marker): the data's content hash."""
    import hashlib

    h = hashlib.sha256()
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.name != MARKER):
        h.update(path.relative_to(folder).as_posix().encode() + b"\0")
        h.update(path.read_bytes())
    return h.hexdigest()
