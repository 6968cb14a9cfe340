"""Fetch dataset archives (http, https, file URL or local path) and unpack them safely.

Transfers stream to ``<name>.part`` with a progress bar and resume with an HTTP ``Range`` request after
a dropped connection, retrying with exponential back-off. The sha256 is checked before anything is
unpacked. Extraction checks every member first (absolute paths, ``..``, links leaving the target, device
files, total size) and unpacks into a temporary folder, so a failure leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import http.client
import shutil
import stat
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.parse
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


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB"):
        if n < 1000:
            return f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def local_path(url: str) -> Path | None:
    """The filesystem path of a file URL or a plain path; None for a network URL."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme == "file":
        return Path(urllib.request.url2pathname(parsed.path))
    return None if parsed.scheme in ("http", "https") else Path(url)


def _transfer(url: str, part: Path, bar) -> None:
    """Append the rest of ``url`` to ``part`` (resuming from its size when the server honours Range)."""
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        resp = urllib.request.urlopen(request, timeout=60)
    except urllib.error.HTTPError as exc:
        if exc.code == 416:  # nothing left to send: the .part is already whole
            return
        raise
    with resp:
        if have and resp.status != 206:  # the server ignored Range: start again
            have = 0
        length = resp.headers.get("Content-Length")
        bar.reset(total=have + int(length) if length else None)
        bar.update(have)
        with open(part, "ab" if have else "wb") as out:
            while chunk := resp.read(CHUNK):
                out.write(chunk)
                bar.update(len(chunk))
        if length and part.stat().st_size < have + int(length):
            raise http.client.IncompleteRead(b"", have + int(length) - part.stat().st_size)


def fetch(url: str, dest: Path, sha256: str | None, *, retries: int = 4, backoff: float = 1.0,
          progress: bool = True) -> str:
    """Put ``url`` at ``dest`` and return its sha256; a given ``sha256`` must match or nothing is kept.

    An interrupted transfer leaves ``dest.part``, which the next try (or the next run) resumes.
    """
    from tqdm import tqdm

    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    src = local_path(url)
    if src is not None:
        if not src.is_file():
            raise DetpipeError(f"{url}: no such file")
        shutil.copyfile(src, part)
    else:
        with tqdm(unit="B", unit_scale=True, desc=dest.name, disable=not progress, file=sys.stderr) as bar:
            for attempt in range(1, retries + 1):
                try:
                    _transfer(url, part, bar)
                    break
                except urllib.error.HTTPError as exc:
                    if exc.code < 500 or attempt == retries:
                        part.unlink(missing_ok=True)
                        raise DetpipeError(f"{url}: download failed (HTTP {exc.code} {exc.reason})") from None
                except (OSError, http.client.HTTPException) as exc:  # dropped connection, timeout, refused
                    if attempt == retries:
                        reason = getattr(exc, "reason", None) or exc
                        raise DetpipeError(f"{url}: download failed after {retries} tries ({reason})") from None
                time.sleep(backoff * 2 ** (attempt - 1))
    got = sha256_of(part)
    if sha256 and got != sha256.lower():
        part.unlink()
        raise DetpipeError(f"{url}: sha256 mismatch: expected {sha256.lower()}, got {got}")
    part.replace(dest)
    return got


def _member_error(archive: Path, name: str, why: str) -> DetpipeError:
    return DetpipeError(f"{archive}: refusing {why} {name!r} in archive")


def _check_name(archive: Path, name: str) -> PurePosixPath:
    p = PurePosixPath(name)
    if p.is_absolute() or ".." in p.parts:
        raise _member_error(archive, name, "unsafe path")
    return p


def _check_link(archive: Path, name: str, target: str, hard: bool) -> None:
    """A link may point anywhere inside the unpacked tree, never out of it."""
    outside = _member_error(archive, name, f"link to {target!r} outside the target:")
    if PurePosixPath(target).is_absolute():
        raise outside
    depth = 0
    for part in ((PurePosixPath() if hard else PurePosixPath(name).parent) / target).parts:
        depth += -1 if part == ".." else 0 if part == "." else 1
        if depth < 0:
            raise outside


def _check_size(archive: Path, total: int, max_bytes: int) -> None:
    if total > max_bytes:
        raise DetpipeError(f"{archive}: unpacks to {human_bytes(total)}, over the {human_bytes(max_bytes)} limit "
                           "(download.max_unpacked_gb)")


def extract(archive: Path, dest: Path, *, max_bytes: int) -> None:
    """Unpack a zip or tar (plain, gz, bz2, xz; recognised by content) into ``dest`` after checking every member."""
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            infos = zf.infolist()
            for info in infos:
                _check_name(archive, info.filename)
                if stat.S_ISLNK(info.external_attr >> 16):
                    _check_link(archive, info.filename, zf.read(info).decode(), hard=False)
            _check_size(archive, sum(i.file_size for i in infos), max_bytes)
            zf.extractall(dest)
        return
    try:
        with tarfile.open(archive) as tf:
            members = tf.getmembers()
            for m in members:
                _check_name(archive, m.name)
                if m.issym() or m.islnk():
                    _check_link(archive, m.name, m.linkname, hard=m.islnk())
                elif not (m.isfile() or m.isdir()):
                    raise _member_error(archive, m.name, "device file or FIFO")
            _check_size(archive, sum(m.size for m in members), max_bytes)
            tf.extractall(dest, filter="data")
    except tarfile.ReadError:
        raise DetpipeError(f"{archive}: not a zip or tar archive") from None
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise DetpipeError(f"{archive}: damaged archive ({exc})") from None


def fetch_dataset(archives: list[dict], dest: Path, *, cache: Path, max_bytes: int, retries: int = 4,
                  backoff: float = 1.0, progress: bool = True) -> None:
    """Download, verify and unpack each of ``archives`` (``{url, sha256, subdir}``) into ``dest``.

    Verified archives are kept in ``cache`` as ``<sha256>-<name>``: one already there is not fetched again.
    A ``url`` that is a local folder is copied as it is.
    """
    cache = Path(cache)
    for item in archives:
        url, sha256, subdir = item["url"], (item.get("sha256") or "").lower(), item.get("subdir") or ""
        src = local_path(url)
        if src is not None and src.is_dir():
            shutil.copytree(src / subdir, dest, dirs_exist_ok=True)
            continue
        name = Path(urllib.parse.urlparse(url).path).name or "archive"
        cache.mkdir(parents=True, exist_ok=True)
        cached = cache / f"{sha256}-{name}"
        if sha256 and cached.is_file() and sha256_of(cached) == sha256:
            print(f"{url}: already downloaded and verified", file=sys.stderr)
        else:
            got = fetch(url, cache / name, sha256, retries=retries, backoff=backoff, progress=progress)
            cached = cache / f"{got}-{name}"
            (cache / name).replace(cached)
            if not sha256:
                raise DetpipeError(f"{url}: no sha256 recorded; the downloaded file's sha256 is {got}; "
                                   "check it and set it as sha256 in params/datasets.yaml")
        unpacked = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.unpack-"))
        try:
            extract(cached, unpacked, max_bytes=max_bytes)
            root = unpacked / subdir
            if not root.is_dir():
                raise DetpipeError(f"{url}: archive has no folder {subdir!r}")
            for entry in root.iterdir():
                shutil.move(str(entry), dest / entry.name)
        finally:
            shutil.rmtree(unpacked, ignore_errors=True)
