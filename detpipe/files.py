"""File helpers: atomic writes (every output appears whole or not at all) and the raw data's content hash.

Temporaries are hidden siblings named ``.<name>.<pid>.<random>.tmp``. A process killed with SIGKILL cannot
remove its own, so the next write of the same output removes those whose process is gone.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from detpipe.errors import DetpipeError, check_terminated


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale_temporaries(path: Path) -> list[Path]:
    """Remove the temporaries of ``path`` left by processes that no longer run; return what was removed."""
    path = Path(path)
    removed = []
    if not path.parent.is_dir():
        return removed
    own = re.compile(rf"\.{re.escape(path.name)}\.(\d+)\.[^.]+\.tmp")  # not those of "<name>.2" and the like
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        match = own.fullmatch(tmp.name)
        if match is None or _alive(int(match.group(1))):
            continue
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(tmp) if tmp.is_dir() and not tmp.is_symlink() else tmp.unlink()
        removed.append(tmp)
    return removed


def _prefix(path: Path) -> str:
    return f".{path.name}.{os.getpid()}."


@contextlib.contextmanager
def atomic_path(path: Path):
    """Yield a temporary sibling of ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_prefix(path), suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        check_terminated()  # a SIGTERM whose KeyboardInterrupt was lost: no output is put in place
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; outputs should read like any other file
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_dir(path: Path):
    """Yield an empty temporary folder beside ``path``; it replaces ``path`` only if the block succeeds."""
    path = Path(path)
    missing = [p for p in [path.parent, *path.parent.parents] if not p.exists()]
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=_prefix(path), suffix=".tmp"))
    try:
        yield tmp
        check_terminated()
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


def check_output_folder(out: Path, marker: str, stage: str, inputs: dict[str, Path | None]) -> None:
    """``out`` is about to be replaced whole (:func:`atomic_dir`): refuse one that is or holds an input (or the
    working directory), and an existing folder that is not empty and lacks ``marker`` (not an earlier ``stage``
    output, so someone else's files)."""
    resolved = Path(out).resolve()
    for what, path in {"the working directory": Path.cwd(), **inputs}.items():
        if path is not None and (resolved == Path(path).resolve() or resolved in Path(path).resolve().parents):
            raise DetpipeError(f"{out}: the output folder would replace {what} ({path}); pick another --out")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / marker).is_file())):
        raise DetpipeError(f"{out}: exists and is not an earlier {stage} output (no {marker}); "
                           "pick a new or empty --out")


def write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: Path, data, compact: bool = False) -> None:
    """Pretty JSON for files people read; ``compact`` for big data files (C encoder, several times faster)."""
    text = json.dumps(data, separators=(",", ":")) if compact else json.dumps(data, indent=1)
    write_text(path, text + "\n")


def read_json(path: Path, what: str):
    """A JSON file; missing or malformed is a one-line error naming ``what`` the file is, and the line."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise DetpipeError(f"{path}: {what} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        line = f":{exc.lineno}" if isinstance(exc, json.JSONDecodeError) else ""
        why = exc.msg if isinstance(exc, json.JSONDecodeError) else "not UTF-8 text"
        raise DetpipeError(f"{path}{line}: malformed JSON in {what} ({why})") from None


def read_json_keys(path: Path, what: str, keys: tuple[str, ...]) -> dict:
    """A JSON object that must hold ``keys``; anything else is a one-line error naming the first missing key."""
    data = read_json(path, what)
    if not isinstance(data, dict):
        raise DetpipeError(f"{path}: {what} is not a JSON object")
    for key in keys:
        if key not in data:
            raise DetpipeError(f"{path}: {what} has no key {key!r}")
    return data


def atomic_torch_save(obj, path: Path) -> None:
    import torch  # heavy: only the stages that save tensors pay for it

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


MARKER = ".download.json"  # written by the download stage into data/raw: the source and the content hash


def write_marker(raw: Path, source) -> None:
    write_json(Path(raw) / MARKER, {"source": source, "content_hash": tree_hash(raw)})


def read_marker(raw: Path) -> dict | None:
    marker = Path(raw) / MARKER
    return read_json(marker, "download record") if marker.is_file() else None


def content_hash(raw: Path) -> str:
    """The raw data's content hash: the download stage's record of it, else computed now."""
    marker = read_marker(raw)
    return marker["content_hash"] if marker and "content_hash" in marker else tree_hash(raw)


def tree_hash(folder: Path) -> str:
    """sha256 over every file's relative path and bytes (but the download marker): the data's content hash."""
    h = hashlib.sha256()
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.name != MARKER):
        h.update(path.relative_to(folder).as_posix().encode() + b"\0")
        h.update(path.read_bytes())
    return h.hexdigest()
