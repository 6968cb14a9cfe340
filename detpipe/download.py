"""Fetch a dataset archive over http(s)/file with a sha256 check and a progress bar, and unpack it safely."""

from __future__ import annotations

import hashlib
import shutil
import sys
import tarfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path, PurePosixPath

from detpipe.errors import DetpipeError

CHUNK = 1 << 20


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def fetch(url: str, dest: Path, sha256: str, progress: bool = True) -> Path:
    """Stream ``url`` to ``dest`` and verify its sha256; on a mismatch nothing is left behind."""
    from tqdm import tqdm

    if "://" not in url:
        url = Path(url).resolve().as_uri()
    tmp = dest.with_name(dest.name + ".part")
    h = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=60) as resp, open(tmp, "wb") as out:
            total = int(resp.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=dest.name, disable=not progress,
                      file=sys.stderr) as bar:
                while chunk := resp.read(CHUNK):
                    out.write(chunk)
                    h.update(chunk)
                    bar.update(len(chunk))
    except (urllib.error.URLError, OSError) as exc:
        tmp.unlink(missing_ok=True)
        raise DetpipeError(f"{url}: download failed ({getattr(exc, 'reason', exc)})") from None
    if h.hexdigest() != sha256.lower():
        tmp.unlink(missing_ok=True)
        raise DetpipeError(f"{url}: sha256 mismatch: expected {sha256.lower()}, got {h.hexdigest()}")
    tmp.replace(dest)
    return dest


def _check_member(name: str, archive: Path) -> None:
    p = PurePosixPath(name)
    if p.is_absolute() or ".." in p.parts:
        raise DetpipeError(f"{archive}: refusing unsafe path {name!r} in archive")


def extract(archive: Path, dest: Path) -> None:
    """Unpack a zip or tar(.gz/.bz2/.xz) into ``dest``, refusing absolute paths, ``..`` and links."""
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            for name in zf.namelist():
                _check_member(name, archive)
            zf.extractall(dest)
        return
    try:
        with tarfile.open(archive) as tf:
            for m in tf.getmembers():
                _check_member(m.name, archive)
                if not (m.isfile() or m.isdir()):
                    raise DetpipeError(f"{archive}: refusing link or special file {m.name!r} in archive")
            tf.extractall(dest, filter="data")
    except tarfile.TarError as exc:
        raise DetpipeError(f"{archive}: not a readable zip or tar archive ({exc})") from None


def fetch_dataset(url: str, sha256: str, dest: Path, subdir: str = "") -> None:
    """Download, verify and unpack into ``dest`` (an empty folder).

    ``subdir`` names the archive's folder that holds the dataset (the balloon zip wraps it in ``balloon/``).
    """
    archive = dest / ".archive"
    fetch(url, archive, sha256)
    unpacked = dest / ".unpacked"
    extract(archive, unpacked)
    archive.unlink()
    root = unpacked / subdir
    if not root.is_dir():
        raise DetpipeError(f"{url}: archive has no folder {subdir!r}")
    for item in root.iterdir():
        shutil.move(str(item), dest / item.name)
    shutil.rmtree(unpacked)
