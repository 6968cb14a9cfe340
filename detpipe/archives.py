"""Fetch dataset archives (http, https, file URL or local path) and unpack them safely.

Transfers stream to ``<name>.part`` with a progress bar, hashing as they go, and resume with an HTTP ``Range``
request after a dropped connection, retrying with exponential back-off. The sha256 is checked before the file
is kept. Extraction checks every member first (absolute paths, ``..``, links leaving the target, device files,
total size, compression ratio: a zip bomb) and unpacks into a temporary folder, so a failure leaves nothing behind.
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
RATIO_FLOOR = 1 << 20  # the ratio is only checked above this many unpacked bytes: a small file may compress oddly well
MAX_LINK_BYTES = 4096  # PATH_MAX: a zip symlink member holding more than this is not a link target


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


def _check_members(archive: Path, names: list[str], links: dict[str, tuple[str, bool]]) -> None:
    """Refuse unsafe names and links (``name -> (target, hard)``) leading out of the unpack folder."""
    for name in names:
        if PurePosixPath(name).is_absolute() or ".." in PurePosixPath(name).parts:
            raise _member_error(archive, name, "unsafe path")
    symlinks = {str(PurePosixPath(name)): target for name, (target, hard) in links.items() if not hard}
    for name, (target, hard) in links.items():
        if not _inside(symlinks, (PurePosixPath() if hard else PurePosixPath(name).parent) / target):
            raise _member_error(archive, name, f"link to {target!r} outside the target:")


def _ratio_text(unpacked: int, packed: int, max_ratio: float) -> str:
    return (f"{human_bytes(unpacked)} from {human_bytes(packed)} ({unpacked / max(packed, 1):.0f}×), "
            f"over download.max_ratio {max_ratio:g}")


def _check_size(archive: Path, total: int, max_bytes: int, at_least: bool = False) -> None:
    if total > max_bytes:
        raise DetpipeError(f"{archive}: unpacks to {'at least ' if at_least else ''}{human_bytes(total)}, over the "
                           f"{human_bytes(max_bytes)} limit (download.max_unpacked_gb)")


def _check_total(archive: Path, total: int, largest: tuple[str, int], max_bytes: int, max_ratio: float,
                 at_least: bool = False) -> None:
    """Refuse an archive whose members (``largest``: the biggest, ``(name, size)``) add up to ``total`` bytes,
    over ``max_bytes`` or over ``max_ratio`` times the archive's size on disk. ``at_least``: more may follow."""
    _check_size(archive, total, max_bytes, at_least)
    more = "at least " if at_least else ""
    packed = archive.stat().st_size
    if total > RATIO_FLOOR and total > max_ratio * packed:
        name, size = largest
        raise DetpipeError(f"{archive}: refusing archive (largest member {name!r}, {human_bytes(size)}): "
                           f"unpacks to {more}{_ratio_text(total, packed, max_ratio)}")


def _tar_members(archive: Path, tf: tarfile.TarFile, max_bytes: int, max_ratio: float) -> list[tarfile.TarInfo]:
    """Every member of ``tf``, refusing device files and oversize as soon as a header shows them.

    Headers give each member's unpacked size, but in a compressed tar reaching the next header means
    decompressing the data before it (in memory, nothing is written): stopping at the first header that
    puts the running total over a limit bounds that work for a bomb.
    """
    total, largest = 0, ("", -1)
    for m in tf:
        if not (m.isfile() or m.isdir() or m.issym() or m.islnk()):
            raise _member_error(archive, m.name, "device file or FIFO")
        total += m.size
        if m.size > largest[1]:
            largest = (m.name, m.size)
        _check_total(archive, total, largest, max_bytes, max_ratio, at_least=True)
    return tf.getmembers()


def _zip_check_sizes(archive: Path, infos: list[zipfile.ZipInfo], max_bytes: int, max_ratio: float) -> None:
    """Refuse oversize, and members (above ``RATIO_FLOOR``) or a whole zip unpacking to over ``max_ratio`` times
    their packed size. The sizes are the headers' word: zipfile writes at most ``file_size`` bytes of a member
    and then checks its CRC, so a header declaring less than the data holds ends in ``BadZipFile``."""
    total = sum(i.file_size for i in infos)
    _check_size(archive, total, max_bytes)
    for i in infos:
        if i.file_size > RATIO_FLOOR and i.file_size > max_ratio * i.compress_size:
            raise DetpipeError(f"{archive}: refusing member {i.filename!r}: unpacks to "
                               f"{_ratio_text(i.file_size, i.compress_size, max_ratio)}")
    largest = max(infos, key=lambda i: i.file_size, default=None)
    _check_total(archive, total, (largest.filename, largest.file_size) if largest else ("", 0), max_bytes, max_ratio)


def _zip_link(archive: Path, zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> str:
    with zf.open(info) as f:
        target = f.read(MAX_LINK_BYTES + 1)
    if len(target) > MAX_LINK_BYTES:
        raise _member_error(archive, info.filename, "symlink with a target over 4096 bytes:")
    return target.decode()


def extract(archive: Path, dest: Path, *, max_bytes: int, max_ratio: float = 200.0) -> None:
    """Unpack a zip or tar (plain, gz, bz2, xz; recognised by content) into ``dest`` after checking every member.

    Nothing is written before every check has passed; a failure while unpacking (a damaged archive) can leave
    part of it in ``dest``, so unpack into a temporary folder (as :func:`fetch_dataset` does).
    """
    try:
        if tarfile.is_tarfile(archive):
            with tarfile.open(archive) as tf:
                members = _tar_members(archive, tf, max_bytes, max_ratio)
                links = {m.name: (m.linkname, m.islnk()) for m in members if m.issym() or m.islnk()}
                _check_members(archive, [m.name for m in members], links)
                tf.extractall(dest, filter="data")
        elif zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                infos = zf.infolist()
                _zip_check_sizes(archive, infos, max_bytes, max_ratio)  # first: reading a link reads its data
                links = {i.filename: (_zip_link(archive, zf, i), False)
                         for i in infos if stat.S_ISLNK(i.external_attr >> 16)}
                _check_members(archive, [i.filename for i in infos], links)
                zf.extractall(dest)
        else:
            raise DetpipeError(f"{archive}: not a zip or tar archive")
    except tarfile.FilterError as exc:  # tarfile's own check while unpacking, behind ours
        raise DetpipeError(f"{archive}: refusing {exc}") from None
    except (tarfile.TarError, zipfile.BadZipFile, zlib.error, lzma.LZMAError, EOFError, OSError,
            UnicodeDecodeError) as exc:
        raise DetpipeError(f"{archive}: unpacking failed, damaged archive? ({exc})") from None


def _merge(src: Path, dest: Path, skip: Path) -> None:
    """Move the contents of ``src`` into ``dest``, merging folders both have (VOC's trainval and test tars).

    ``skip`` (the unpack folder, inside ``dest``) is never a target: ``src`` may be that folder itself.
    """
    for entry in src.iterdir():
        target = dest / entry.name
        if target == skip:
            continue
        if entry.is_dir() and not entry.is_symlink() and target.is_dir() and not target.is_symlink():
            _merge(entry, target, skip)
        else:
            os.replace(entry, target)


def fetch_dataset(archives: list[dict], dest: Path, *, cache: Path, max_bytes: int, max_ratio: float = 200.0,
                  retries: int = 4, backoff: float = 1.0, progress: bool = True) -> None:
    """Download, verify and unpack each of ``archives`` (``{url, sha256, subdir}``) into ``dest``.

    Verified archives are kept in ``cache`` as ``<sha256>-<name>``: one already there is not fetched again.
    A ``url`` that is a local folder is copied as it is. Each archive unpacks into a ``.unpack-*`` folder inside
    ``dest`` (so a killed run leaves it only there, in the caller's temporary folder) and is then moved in.
    """
    dest, cache = Path(dest), Path(cache)
    dest.mkdir(parents=True, exist_ok=True)
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
        unpacked = Path(tempfile.mkdtemp(dir=dest, prefix=".unpack-"))
        try:
            extract(cached, unpacked, max_bytes=max_bytes, max_ratio=max_ratio)
            if not (unpacked / subdir).is_dir():
                raise DetpipeError(f"{url}: archive has no folder {subdir!r}")
            _merge(unpacked / subdir, dest, unpacked)
        finally:
            shutil.rmtree(unpacked, ignore_errors=True)
