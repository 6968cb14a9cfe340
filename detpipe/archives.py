"""Fetch dataset archives (http, https, file URL or local path) and unpack them safely.

Transfers stream to ``<name>.part`` with a progress bar, hashing as they go, and resume with an HTTP ``Range``
request after a dropped connection, retrying with exponential back-off. The sha256 is checked before the file
is kept. Extraction checks every member first (absolute paths, ``..``, links leaving the target, device files,
total size) and unpacks into a temporary folder, so a failure leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import http.client
import lzma
import os
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
import zlib
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from detpipe.errors import DetpipeError

CHUNK = 1 << 20
MAX_LINK_HOPS = 40  # as Linux: a longer chain of links is a loop


def _hasher(path: Path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h


def sha256_of(path: Path) -> str:
    return _hasher(path).hexdigest()


def human_bytes(n: float) -> str:
    """``n`` bytes as e.g. "3.2 GB", in units of 1024 (as ``download.max_unpacked_gb`` counts)."""
    for unit in ("B", "KB", "MB"):
        if n < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def local_path(url: str) -> Path | None:
    """The filesystem path of a file URL or a plain path; None for a network URL."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme == "file":
        return Path(urllib.request.url2pathname(parsed.path))
    return None if parsed.scheme in ("http", "https") else Path(url)


def _copy(src, out, h, bar) -> None:
    """Stream ``src`` into ``out``; ``read1`` returns what has arrived, so a stalled transfer keeps it."""
    while chunk := src.read1(CHUNK):
        out.write(chunk)
        h.update(chunk)
        bar.update(len(chunk))


def _transfer(url: str, part: Path, bar, timeout: float):
    """Append the rest of ``url`` to ``part`` (from its size when the server honours Range); return its hash."""
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        resp = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416:  # nothing left to send: the .part is already whole
            return _hasher(part)
        raise
    with resp:
        if resp.status != 206:  # a whole file (no Range sent, or the server ignored it): start again
            have = 0
        h = _hasher(part) if have else hashlib.sha256()
        length = resp.headers.get("Content-Length")
        bar.reset(total=have + int(length) if length else None)
        bar.update(have)
        with open(part, "ab" if have else "wb") as out:
            _copy(resp, out, h, bar)
        if length and part.stat().st_size < have + int(length):
            raise http.client.IncompleteRead(b"", have + int(length) - part.stat().st_size)
    return h


def _download(url: str, part: Path, bar, retries: int, backoff: float, timeout: float):
    tries = max(retries, 1)
    for attempt in range(tries):
        try:
            return _transfer(url, part, bar, timeout)
        except urllib.error.HTTPError as exc:
            if exc.code < 500:  # the request is wrong (404...): trying again cannot help
                part.unlink(missing_ok=True)
                raise DetpipeError(f"{url}: download failed (HTTP {exc.code} {exc.reason})") from None
            reason = f"HTTP {exc.code} {exc.reason}"
        except (OSError, http.client.HTTPException) as exc:  # dropped connection, timeout, refused
            reason = getattr(exc, "reason", None) or exc
        if attempt + 1 < tries:
            time.sleep(backoff * 2**attempt)
    raise DetpipeError(f"{url}: download failed after {tries} tries ({reason})")


def fetch(url: str, dest: Path, sha256: str | None, *, retries: int = 4, backoff: float = 1.0,
          timeout: float = 60, progress: bool = True) -> str:
    """Put ``url`` at ``dest`` and return its sha256; a given ``sha256`` must match or nothing is kept.

    The transfer goes to ``dest.part``; one left by an interrupted transfer is resumed.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    src = local_path(url)
    with tqdm(unit="B", unit_scale=True, unit_divisor=1024, desc=dest.name, disable=not progress,
              file=sys.stderr) as bar:
        if src is None:
            h = _download(url, part, bar, retries, backoff, timeout)
        elif not src.is_file():
            raise DetpipeError(f"{src}: no such file")
        else:
            bar.reset(total=src.stat().st_size)
            h = hashlib.sha256()
            with open(src, "rb") as f, open(part, "wb") as out:
                _copy(f, out, h, bar)
    got = h.hexdigest()
    if sha256 and got != sha256.lower():
        part.unlink()
        raise DetpipeError(f"{url}: sha256 mismatch: expected {sha256.lower()}, got {got}")
    part.replace(dest)
    return got


def _member_error(archive: Path, name: str, why: str) -> DetpipeError:
    return DetpipeError(f"{archive}: refusing {why} {name!r} in archive")


def _inside(links: dict[str, str], path: PurePosixPath) -> bool:
    """Whether ``path`` (relative to the unpack folder) stays in it, following the archive's own symlinks."""
    if path.is_absolute():
        return False
    todo, stack, hops = list(path.parts), [], 0
    while todo:
        part = todo.pop(0)
        if part == "..":
            if not stack:
                return False
            stack.pop()
        elif part != ".":
            stack.append(part)
            target = links.get("/".join(stack))
            if target is not None:
                hops += 1
                if hops > MAX_LINK_HOPS or target.startswith("/"):
                    return False
                stack.pop()
                todo[:0] = PurePosixPath(target).parts
    return True


def _check_members(archive: Path, names: list[str], sizes: list[int], links: dict[str, tuple[str, bool]],
                   max_bytes: int) -> None:
    """Refuse unsafe names, links (``name -> (target, hard)``) leading out of the unpack folder, and oversize."""
    for name in names:
        if PurePosixPath(name).is_absolute() or ".." in PurePosixPath(name).parts:
            raise _member_error(archive, name, "unsafe path")
    symlinks = {str(PurePosixPath(name)): target for name, (target, hard) in links.items() if not hard}
    for name, (target, hard) in links.items():
        if not _inside(symlinks, (PurePosixPath() if hard else PurePosixPath(name).parent) / target):
            raise _member_error(archive, name, f"link to {target!r} outside the target:")
    total = sum(sizes)
    if total > max_bytes:
        raise DetpipeError(f"{archive}: unpacks to {human_bytes(total)}, over the {human_bytes(max_bytes)} limit "
                           "(download.max_unpacked_gb)")


def extract(archive: Path, dest: Path, *, max_bytes: int) -> None:
    """Unpack a zip or tar (plain, gz, bz2, xz; recognised by content) into ``dest`` after checking every member."""
    try:
        if tarfile.is_tarfile(archive):
            with tarfile.open(archive) as tf:
                members = tf.getmembers()
                for m in members:
                    if not (m.isfile() or m.isdir() or m.issym() or m.islnk()):
                        raise _member_error(archive, m.name, "device file or FIFO")
                links = {m.name: (m.linkname, m.islnk()) for m in members if m.issym() or m.islnk()}
                _check_members(archive, [m.name for m in members], [m.size for m in members], links, max_bytes)
                tf.extractall(dest, filter="data")
        elif zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                infos = zf.infolist()
                links = {i.filename: (zf.read(i).decode(), False)
                         for i in infos if stat.S_ISLNK(i.external_attr >> 16)}
                _check_members(archive, [i.filename for i in infos], [i.file_size for i in infos], links, max_bytes)
                zf.extractall(dest)
        else:
            raise DetpipeError(f"{archive}: not a zip or tar archive")
    except tarfile.FilterError as exc:  # tarfile's own check while unpacking, behind ours
        raise DetpipeError(f"{archive}: refusing {exc}") from None
    except (tarfile.TarError, zipfile.BadZipFile, zlib.error, lzma.LZMAError, EOFError, OSError) as exc:
        raise DetpipeError(f"{archive}: unpacking failed, damaged archive? ({exc})") from None


def _merge(src: Path, dest: Path) -> None:
    """Move the contents of ``src`` into ``dest``, merging folders both have (VOC's trainval and test tars)."""
    for entry in src.iterdir():
        target = dest / entry.name
        if entry.is_dir() and not entry.is_symlink() and target.is_dir() and not target.is_symlink():
            _merge(entry, target)
        else:
            os.replace(entry, target)


def fetch_dataset(archives: list[dict], dest: Path, *, cache: Path, max_bytes: int, retries: int = 4,
                  backoff: float = 1.0, progress: bool = True) -> None:
    """Download, verify and unpack each of ``archives`` (``{url, sha256, subdir}``) into ``dest``.

    Verified archives are kept in ``cache`` as ``<sha256>-<name>``: one already there is not fetched again.
    A ``url`` that is a local folder is copied as it is.
    """
    dest, cache = Path(dest), Path(cache)
    for item in archives:
        url, sha256, subdir = item["url"], (item.get("sha256") or "").lower(), item.get("subdir") or ""
        src = local_path(url)
        if src is not None and src.is_dir():
            if not (src / subdir).is_dir():
                raise DetpipeError(f"{src / subdir}: no such folder")
            shutil.copytree(src / subdir, dest, dirs_exist_ok=True)
            continue
        name = Path(urllib.parse.urlparse(url).path).name or "archive"
        cached = cache / f"{sha256}-{name}"
        if not sha256:
            got = fetch(url, cache / name, None, retries=retries, backoff=backoff, progress=progress)
            (cache / name).replace(cache / f"{got}-{name}")
            raise DetpipeError(f"{url}: no sha256 recorded; the downloaded file's sha256 is {got}; "
                               "check it and set it as sha256 in params/datasets.yaml")
        if cached.is_file() and sha256_of(cached) == sha256:
            print(f"{url}: already downloaded and verified", file=sys.stderr)
        else:
            fetch(url, cached, sha256, retries=retries, backoff=backoff, progress=progress)
        unpacked = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.unpack-"))
        try:
            extract(cached, unpacked, max_bytes=max_bytes)
            if not (unpacked / subdir).is_dir():
                raise DetpipeError(f"{url}: archive has no folder {subdir!r}")
            _merge(unpacked / subdir, dest)
        finally:
            shutil.rmtree(unpacked, ignore_errors=True)
