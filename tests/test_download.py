"""Download and unpack against servers started on 127.0.0.1, with archives built by the tests."""

import hashlib
import http.server
import io
import random
import stat
import struct
import tarfile
import threading
import time
import zipfile
from pathlib import Path

import pytest

from detpipe import archives
from detpipe.archives import extract, fetch, fetch_dataset
from detpipe.errors import DetpipeError

MB = 1 << 20


class Server:
    """Serves ``files`` (name -> bytes) with Range support; ``mode`` makes it misbehave on purpose.

    drop_once: the first GET sends the headers and half the body, then closes the connection.
    drop_always: every GET does that. stall_once: the first GET sends half the body, then stops sending.
    no_range: Range headers are ignored (200 and the whole file). error_always: every GET answers 503.
    """

    def __init__(self, mode: str = ""):
        self.files: dict[str, bytes] = {}
        self.mode = mode
        self.requests: list[dict] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                server.requests.append({"path": self.path, "range": self.headers.get("Range")})
                first = len(server.requests) == 1
                data = server.files.get(self.path.lstrip("/"))
                if data is None or server.mode == "error_always":
                    self.send_error(404 if data is None else 503)
                    return
                start = 0
                rng = self.headers.get("Range")
                if rng and server.mode != "no_range":
                    start = int(rng.removeprefix("bytes=").rstrip("-"))
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                cut = server.mode == "drop_always" or (server.mode in ("drop_once", "stall_once") and first)
                self.wfile.write(body[: len(body) // 2] if cut else body)
                if cut:
                    self.wfile.flush()
                    self.close_connection = True
                    if server.mode == "stall_once":
                        time.sleep(1)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()


@pytest.fixture
def server():
    servers = []

    def start(mode=""):
        servers.append(Server(mode))
        return servers[-1]
    yield start
    for s in servers:
        s.httpd.shutdown()
        s.httpd.server_close()


def tar_bytes(files: dict[str, bytes], mode: str = "w:gz", extra=()) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for info in extra:
            tf.addfile(info)
    return buf.getvalue()


def zip_bytes(files: dict[str, bytes], symlinks: dict[str, str] | None = None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
        for name, target in (symlinks or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, target)
    return buf.getvalue()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def link(name: str, target: str, kind=tarfile.SYMTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


SET = {"balloon/train/a.txt": b"hello", "balloon/val/b.txt": b"world"}
BIG = bytes(range(256)) * 4096  # 1 MiB: big enough to be cut in half mid-transfer


def get(tmp_path, url, digest, **kw):
    dest = tmp_path / "out"
    dest.mkdir(exist_ok=True)
    fetch_dataset([{"url": url, "sha256": digest, **kw}], dest, cache=tmp_path / "cache", max_bytes=MB,
                  retries=3, backoff=0, progress=False)
    return dest


def leftovers(tmp_path) -> list[str]:
    """Temporary unpack folders (``.unpack-*`` inside ``out``, or anything hidden beside it) left behind."""
    out = tmp_path / "out"
    return [p.name for p in [*tmp_path.iterdir(), *(out.iterdir() if out.is_dir() else [])] if p.name.startswith(".")]


@pytest.mark.parametrize("mode", ["w", "w:gz", "w:bz2", "w:xz", "zip"])
def test_fetch_verify_unpack_every_archive_type(server, tmp_path, mode):
    s = server()
    s.files["set"] = zip_bytes(SET) if mode == "zip" else tar_bytes(SET, mode)  # no suffix: types come from bytes
    dest = get(tmp_path, f"{s.url}/set", sha(s.files["set"]), subdir="balloon")
    assert (dest / "train/a.txt").read_bytes() == b"hello"
    assert sorted(p.name for p in dest.iterdir()) == ["train", "val"]
    assert leftovers(tmp_path) == []
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [f"{sha(s.files['set'])}-set"]


def test_dropped_connection_resumes_with_range(server, tmp_path):
    s = server("drop_once")
    s.files["big.tar"] = tar_bytes({"x/blob": BIG}, "w")
    dest = get(tmp_path, f"{s.url}/big.tar", sha(s.files["big.tar"]), subdir="x")
    assert (dest / "blob").read_bytes() == BIG
    assert len(s.requests) == 2 and s.requests[0]["range"] is None
    assert s.requests[1]["range"] == f"bytes={len(s.files['big.tar']) // 2}-"


def test_stalled_connection_times_out_and_resumes(server, tmp_path):
    s = server("stall_once")
    s.files["big"] = BIG
    assert fetch(f"{s.url}/big", tmp_path / "big", sha(BIG), backoff=0, timeout=0.2, progress=False) == sha(BIG)
    assert (tmp_path / "big").read_bytes() == BIG
    assert [r["range"] for r in s.requests] == [None, f"bytes={len(BIG) // 2}-"]


def test_server_without_range_support_restarts(server, tmp_path):
    s = server("no_range")
    s.files["big.tar"] = tar_bytes({"x/blob": BIG}, "w")
    digest = sha(s.files["big.tar"])
    (tmp_path / "cache").mkdir()
    (tmp_path / f"cache/{digest}-big.tar.part").write_bytes(b"junk from an earlier run")
    dest = get(tmp_path, f"{s.url}/big.tar", digest, subdir="x")
    assert (dest / "blob").read_bytes() == BIG
    assert [r["range"] for r in s.requests] == ["bytes=24-"]


def test_part_file_from_an_interrupted_run_is_resumed(server, tmp_path):
    s = server()
    data = tar_bytes({"x/blob": BIG}, "w")
    s.files["big.tar"] = data
    (tmp_path / "cache").mkdir()
    (tmp_path / f"cache/{sha(data)}-big.tar.part").write_bytes(data[:1000])
    assert (get(tmp_path, f"{s.url}/big.tar", sha(data), subdir="x") / "blob").read_bytes() == BIG
    assert [r["range"] for r in s.requests] == ["bytes=1000-"]


def test_wrong_bytes_fail_the_checksum_and_leave_nothing(server, tmp_path):
    s = server()
    s.files["set.tgz"] = tar_bytes(SET)
    expected = sha(tar_bytes({"balloon/train/a.txt": b"other"}))
    with pytest.raises(DetpipeError, match=f"sha256 mismatch: expected {expected}, got {sha(s.files['set.tgz'])}"):
        get(tmp_path, f"{s.url}/set.tgz", expected)
    assert list((tmp_path / "out").iterdir()) == [] and list((tmp_path / "cache").iterdir()) == []
    assert leftovers(tmp_path) == []


def test_retries_give_up_with_a_count_and_keep_the_part_for_next_time(server, tmp_path):
    s = server("drop_always")
    s.files["big.tar"] = BIG
    with pytest.raises(DetpipeError, match=r"big.tar: download failed after 3 tries \(IncompleteRead"):
        get(tmp_path, f"{s.url}/big.tar", sha(BIG))
    assert len(s.requests) == 3
    assert all(r["range"] for r in s.requests[1:])  # each retry resumes
    assert list((tmp_path / "out").iterdir()) == []
    part = tmp_path / f"cache/{sha(BIG)}-big.tar.part"
    assert part.read_bytes() == BIG[: part.stat().st_size] and 0 < part.stat().st_size < len(BIG)


def test_server_errors_are_retried_with_exponential_backoff(server, tmp_path, monkeypatch):
    s = server("error_always")
    s.files["f"] = b"x"
    waits = []
    monkeypatch.setattr(archives.time, "sleep", waits.append)
    with pytest.raises(DetpipeError, match=r"/f: download failed after 4 tries \(HTTP 503"):
        fetch(f"{s.url}/f", tmp_path / "f", None, retries=4, backoff=1.5, progress=False)
    assert len(s.requests) == 4 and waits == [1.5, 3, 6]


def test_not_found_is_not_retried(server, tmp_path):
    s = server()
    with pytest.raises(DetpipeError, match=r"nothing.zip: download failed \(HTTP 404"):
        get(tmp_path, f"{s.url}/nothing.zip", "0" * 64)
    assert len(s.requests) == 1


def test_verified_archive_in_cache_is_not_fetched_again(server, tmp_path, capfd):
    s = server()
    s.files["set.zip"] = zip_bytes(SET)
    get(tmp_path, f"{s.url}/set.zip", sha(s.files["set.zip"]), subdir="balloon")
    assert len(s.requests) == 1
    (tmp_path / "out2").mkdir()
    fetch_dataset([{"url": f"{s.url}/set.zip", "sha256": sha(s.files["set.zip"]), "subdir": "balloon"}],
                  tmp_path / "out2", cache=tmp_path / "cache", max_bytes=MB, progress=False)
    assert len(s.requests) == 1
    assert "already downloaded and verified" in capfd.readouterr().err
    assert (tmp_path / "out2/val/b.txt").read_bytes() == b"world"


def test_unrecorded_hash_stops_before_unpacking_and_keeps_the_file(server, tmp_path):
    s = server()
    s.files["set.zip"] = zip_bytes(SET)
    digest = sha(s.files["set.zip"])
    with pytest.raises(DetpipeError, match=f"no sha256 recorded; the downloaded file's sha256 is {digest}; check"):
        get(tmp_path, f"{s.url}/set.zip", "")
    assert list((tmp_path / "out").iterdir()) == []
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [f"{digest}-set.zip"]
    assert sorted(p.name for p in get(tmp_path, f"{s.url}/set.zip", digest, subdir="balloon").iterdir()) == [
        "train", "val"]
    assert len(s.requests) == 1


def test_file_url_and_local_paths(tmp_path, monkeypatch):
    data = tar_bytes(SET)
    (tmp_path / "set.tgz").write_bytes(data)
    assert (get(tmp_path, (tmp_path / "set.tgz").as_uri(), sha(data)) / "balloon/val/b.txt").is_file()
    assert fetch(str(tmp_path / "set.tgz"), tmp_path / "abs", sha(data), progress=False) == sha(data)
    monkeypatch.chdir(tmp_path)
    assert fetch("set.tgz", tmp_path / "rel", None, progress=False) == sha(data)
    assert (tmp_path / "rel").read_bytes() == data
    with pytest.raises(DetpipeError, match=f"{tmp_path / 'missing.zip'}: no such file"):
        fetch(str(tmp_path / "missing.zip"), tmp_path / "m", "0" * 64)


def test_local_folder_is_copied(tmp_path):
    (tmp_path / "folder/inner/sub").mkdir(parents=True)
    (tmp_path / "folder/inner/sub/f.txt").write_text("x")
    dest = tmp_path / "dest"
    dest.mkdir()
    fetch_dataset([{"url": (tmp_path / "folder").as_uri(), "sha256": "", "subdir": "inner"}], dest,
                  cache=tmp_path / "cache", max_bytes=MB)
    assert (dest / "sub/f.txt").read_text() == "x"
    with pytest.raises(DetpipeError, match="no such folder"):
        fetch_dataset([{"url": str(tmp_path / "folder"), "sha256": "", "subdir": "other"}], dest,
                      cache=tmp_path / "cache", max_bytes=MB)


def test_archives_unpack_into_one_folder_and_merge(server, tmp_path):
    """COCO: images and annotations come in separate zips; VOC: trainval and test tars share folders."""
    s = server()
    s.files["trainval.tar"] = tar_bytes({"VOCdevkit/VOC2007/JPEGImages/1.jpg": b"1",
                                         "VOCdevkit/VOC2007/Annotations/1.xml": b"a"}, "w")
    s.files["test.tar"] = tar_bytes({"VOCdevkit/VOC2007/JPEGImages/2.jpg": b"2"}, "w")
    s.files["ann.zip"] = zip_bytes({"annotations/instances.json": b"{}"})
    dest = tmp_path / "out"
    dest.mkdir()
    fetch_dataset([{"url": f"{s.url}/{name}", "sha256": sha(s.files[name]), "subdir": subdir}
                   for name, subdir in [("trainval.tar", "VOCdevkit/VOC2007"), ("test.tar", "VOCdevkit/VOC2007"),
                                        ("ann.zip", "")]],
                  dest, cache=tmp_path / "cache", max_bytes=MB, backoff=0, progress=False)
    assert sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()) == [
        "Annotations/1.xml", "JPEGImages/1.jpg", "JPEGImages/2.jpg", "annotations/instances.json"]
    assert leftovers(tmp_path) == []


def test_missing_subdir_is_named(tmp_path):
    data = tar_bytes({"a.txt": b"x"})
    (tmp_path / "set.tgz").write_bytes(data)
    with pytest.raises(DetpipeError, match="archive has no folder 'balloon'"):
        get(tmp_path, str(tmp_path / "set.tgz"), sha(data), subdir="balloon")
    assert list((tmp_path / "out").iterdir()) == [] and leftovers(tmp_path) == []


@pytest.mark.parametrize("archive, message", [
    (lambda: tar_bytes({"/etc/evil": b"x"}), "refusing unsafe path '/etc/evil'"),
    (lambda: tar_bytes({"d/../../evil": b"x"}), "refusing unsafe path 'd/../../evil'"),
    (lambda: zip_bytes({"../evil": b"x"}), "refusing unsafe path '../evil'"),
    (lambda: tar_bytes({"d/a": b"x"}, extra=[link("d/l", "../../etc/passwd")]), "link to '../../etc/passwd' outside"),
    (lambda: tar_bytes({"d/a": b"x"}, extra=[link("d/l", "/etc/passwd")]), "link to '/etc/passwd' outside"),
    (lambda: tar_bytes({"d/a": b"x"}, extra=[link("d/h", "../x", tarfile.LNKTYPE)]), "link to '../x' outside"),
    (lambda: tar_bytes({"d/a": b"x"}, extra=[link("s", "t/.."), link("t", ".")]), r"link to 't/\.\.' outside"),
    (lambda: zip_bytes({"d/a": b"x"}, {"d/l": "../../etc/passwd"}), "link to '../../etc/passwd' outside"),
    (lambda: tar_bytes({"d/a": b"x"}, extra=[link("d/dev", "", tarfile.CHRTYPE)]), "device file or FIFO 'd/dev'"),
    (lambda: tar_bytes({"d/a": b"x"}, extra=[link("d/fifo", "", tarfile.FIFOTYPE)]), "device file or FIFO"),
    (lambda: tar_bytes({"d/a": b"x" * (MB + 1)}), r"unpacks to at least 1.0 MB, over the 1.0 MB limit"),
    (lambda: zip_bytes({"d/a": b"x" * MB, "d/b": b"x"}), r"unpacks to 1.0 MB, over the 1.0 MB limit"),
    (lambda: b"not an archive at all", "not a zip or tar archive"),
])
def test_unsafe_archives_are_refused_before_anything_is_written(tmp_path, archive, message):
    data = archive()
    (tmp_path / "a").write_bytes(data)
    with pytest.raises(DetpipeError, match=message):
        extract(tmp_path / "a", tmp_path / "direct", max_bytes=MB)
    assert not (tmp_path / "direct").exists()  # refused before extraction started
    with pytest.raises(DetpipeError, match=message):
        get(tmp_path, str(tmp_path / "a"), sha(data))
    assert list((tmp_path / "out").iterdir()) == [] and leftovers(tmp_path) == []


def test_links_inside_the_archive_are_allowed(tmp_path):
    extra = [link("d/sub/l", "../a"), link("d/h", "d/a", tarfile.LNKTYPE), link("d/up", "sub/.."),
             link("d/chain", "up/a")]
    (tmp_path / "a.tar").write_bytes(tar_bytes({"d/a": b"x"}, extra=extra))
    extract(tmp_path / "a.tar", tmp_path / "x", max_bytes=MB)
    for name in ("sub/l", "h", "chain"):
        assert (tmp_path / "x/d" / name).read_bytes() == b"x"
    (tmp_path / "a.zip").write_bytes(zip_bytes({"d/a": b"x"}, {"d/sub/l": "../a"}))
    extract(tmp_path / "a.zip", tmp_path / "z", max_bytes=MB)  # zipfile writes the link as a file naming its target
    assert (tmp_path / "z/d/sub/l").read_bytes() == b"../a"


@pytest.mark.parametrize("name, damage", [
    ("a.tgz", lambda data: data[: len(data) // 2]),  # the gzip stream ends in the middle of the second member
    ("a.zip", lambda data: data.replace(b"y" * 100, b"z" * 100, 1)),  # the second member fails its CRC
])
def test_corrupt_archive_leaves_nothing_half_unpacked(tmp_path, name, damage):
    files = {"d/a": b"x" * 5000, "d/b": b"y" * 5000 + BIG[:200_000]}
    data = damage(zip_bytes(files) if name.endswith(".zip") else tar_bytes(files))
    (tmp_path / name).write_bytes(data)
    with pytest.raises(DetpipeError, match=f"{name}: unpacking failed, damaged archive"):
        get(tmp_path, str(tmp_path / name), sha(data))
    assert list((tmp_path / "out").iterdir()) == [] and leftovers(tmp_path) == []


def zip_deflated(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buf.getvalue()


ZEROS = bytes(64 * MB)  # deflates about 1000 times


@pytest.mark.parametrize("name, build, message", [
    ("bomb.zip", lambda: zip_deflated({"d/readme.txt": b"hi", "d/zeros.bin": ZEROS}),
     r"bomb.zip: refusing member 'd/zeros.bin': unpacks to 64.0 MB from 6\d.\d KB \(10\d\d×\), "
     r"over download.max_ratio 200$"),
    ("bomb.tgz", lambda: tar_bytes({"d/readme.txt": b"hi", "d/zeros.bin": ZEROS}),
     r"bomb.tgz: refusing archive \(largest member 'd/zeros.bin', 64.0 MB\): unpacks to at least 64.0 MB from "
     r"6\d.\d KB \(10\d\d×\), over download.max_ratio 200$"),
    ("many.tar.xz", lambda: tar_bytes({f"d/{i}.bin": bytes(MB // 2) for i in range(48)}, "w:xz"),
     r"many.tar.xz: refusing archive \(largest member 'd/0.bin', 512.0 KB\): unpacks to at least"),
])
def test_bombs_are_refused_before_anything_is_written(tmp_path, name, build, message):
    data = build()
    (tmp_path / name).write_bytes(data)
    with pytest.raises(DetpipeError, match=message) as err:
        extract(tmp_path / name, tmp_path / "direct", max_bytes=1 << 40)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "direct").exists()
    dest = tmp_path / "out"
    dest.mkdir()
    with pytest.raises(DetpipeError, match=message):
        fetch_dataset([{"url": str(tmp_path / name), "sha256": sha(data)}], dest, cache=tmp_path / "cache",
                      max_bytes=1 << 40, progress=False)  # the default max_ratio: 200
    assert list(dest.iterdir()) == [] and leftovers(tmp_path) == []


def test_tar_bomb_stops_reading_at_the_first_header_over_the_limit(tmp_path, monkeypatch):
    """256 members of 256 KiB zeros (64 MiB): refused once the running total passes 200 × the archive size
    (about 50 members in), without reading the rest of the stream."""
    (tmp_path / "many.tgz").write_bytes(tar_bytes({f"d/{i}.bin": bytes(MB // 4) for i in range(256)}))
    seen = []
    real_next = tarfile.TarFile.next
    monkeypatch.setattr(tarfile.TarFile, "next", lambda self: seen.append(1) or real_next(self))
    with pytest.raises(DetpipeError, match=r"unpacks to at least \d+\.\d MB from .*over download.max_ratio 200"):
        extract(tmp_path / "many.tgz", tmp_path / "x", max_bytes=1 << 40)
    assert len(seen) < 100 and not (tmp_path / "x").exists()


def realistic(seed: int = 0) -> dict[str, bytes]:
    """Images (incompressible, as JPEG data is), annotations (text that compresses well, but small)."""
    rng = random.Random(seed)
    files = {f"set/images/{i}.jpg": b"\xff\xd8\xff\xe0" + rng.randbytes(300_000) for i in range(4)}
    files["set/annotations.json"] = b'{"box": [0, 0, 10, 10], "label": "balloon"}, ' * 20_000  # ~900 KB
    files["set/empty.txt"] = b""
    return files


@pytest.mark.parametrize("mode", ["zip", "w:gz", "w:bz2", "w:xz"])
def test_realistic_archives_extract_under_the_default_ratio(tmp_path, mode):
    files = realistic()
    data = zip_deflated(files) if mode == "zip" else tar_bytes(files, mode)
    (tmp_path / "set").write_bytes(data)
    dest = tmp_path / "out"
    dest.mkdir()
    fetch_dataset([{"url": str(tmp_path / "set"), "sha256": sha(data), "subdir": "set"}], dest,
                  cache=tmp_path / "cache", max_bytes=64 * MB, progress=False)
    assert {p.relative_to(dest).as_posix(): p.read_bytes() for p in dest.rglob("*") if p.is_file()} == {
        name.removeprefix("set/"): body for name, body in files.items()}
    assert leftovers(tmp_path) == []


def test_max_ratio_is_respected_just_above_and_below(tmp_path):
    rng = random.Random(1)
    body = rng.randbytes(100_000) + bytes(3 * MB)  # a member with a ratio of a few tens
    (tmp_path / "a.zip").write_bytes(zip_deflated({"d/mixed.bin": body}))
    (info,) = zipfile.ZipFile(tmp_path / "a.zip").infolist()
    member_ratio = info.file_size / info.compress_size
    assert 10 < member_ratio < 200
    with pytest.raises(DetpipeError, match=r"refusing member 'd/mixed.bin': .*over download.max_ratio"):
        extract(tmp_path / "a.zip", tmp_path / "no", max_bytes=1 << 40, max_ratio=member_ratio * 0.99)
    assert not (tmp_path / "no").exists()
    extract(tmp_path / "a.zip", tmp_path / "yes", max_bytes=1 << 40, max_ratio=member_ratio * 1.01)
    assert (tmp_path / "yes/d/mixed.bin").read_bytes() == body

    (tmp_path / "a.tgz").write_bytes(tar_bytes({"d/mixed.bin": body, "d/b.txt": b"x"}))
    ratio = (len(body) + 1) / (tmp_path / "a.tgz").stat().st_size
    with pytest.raises(DetpipeError, match=r"refusing archive \(largest member 'd/mixed.bin', 3.1 MB\)"):
        fetch_dataset([{"url": str(tmp_path / "a.tgz"), "sha256": sha((tmp_path / "a.tgz").read_bytes())}],
                      tmp_path / "out", cache=tmp_path / "cache", max_bytes=1 << 40, max_ratio=ratio * 0.99,
                      progress=False)
    assert list((tmp_path / "out").iterdir()) == [] and leftovers(tmp_path) == []
    extract(tmp_path / "a.tgz", tmp_path / "tyes", max_bytes=1 << 40, max_ratio=ratio * 1.01)
    assert (tmp_path / "tyes/d/mixed.bin").read_bytes() == body


def test_small_members_with_odd_ratios_are_not_refused(tmp_path):
    """Below 1 MiB unpacked neither a member nor a whole archive is held to the ratio."""
    (tmp_path / "a.zip").write_bytes(zip_deflated({"a.txt": bytes(MB - 1)}))
    extract(tmp_path / "a.zip", tmp_path / "x", max_bytes=1 << 40, max_ratio=2)
    assert (tmp_path / "x/a.txt").stat().st_size == MB - 1


def test_zip_header_that_understates_the_size_ends_in_one_line_and_nothing_kept(tmp_path):
    """The headers say 1000 bytes (no ratio to refuse), the data inflates to 2 MiB: zipfile stops at 1000 bytes
    and fails the CRC; the error names the archive and member, and the partial output goes."""
    data = bytearray(zip_deflated({"d/ok.txt": b"fine", "d/zeros.bin": bytes(2 * MB)}))
    for sig, at in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):  # local header and central directory
        pos = data.rindex(sig)  # the second member's
        assert struct.unpack_from("<I", data, pos + at)[0] == 2 * MB
        struct.pack_into("<I", data, pos + at, 1000)
    (tmp_path / "liar.zip").write_bytes(bytes(data))
    with pytest.raises(DetpipeError, match=r"liar.zip: unpacking failed, damaged archive\? "
                                           r"\(Bad CRC-32 for file 'd/zeros.bin'\)$") as err:
        get(tmp_path, str(tmp_path / "liar.zip"), sha(bytes(data)))
    assert "\n" not in str(err.value)
    assert list((tmp_path / "out").iterdir()) == [] and leftovers(tmp_path) == []


def test_unpack_folder_is_inside_dest_and_gone_afterwards(tmp_path, monkeypatch):
    """A killed run leaves the unpack folder inside dest (the caller's temporary folder), never beside it."""
    made = []
    real = archives.tempfile.mkdtemp

    def mkdtemp(**kw):
        made.append(real(**kw))
        return made[-1]
    monkeypatch.setattr(archives.tempfile, "mkdtemp", mkdtemp)
    (tmp_path / "a.zip").write_bytes(zip_bytes({"top.txt": b"t", "d/a.txt": b"a"}))
    (tmp_path / "b.tgz").write_bytes(tar_bytes({"d/b.txt": b"b"}))
    dest = tmp_path / "out"
    dest.mkdir()
    fetch_dataset([{"url": str(tmp_path / n), "sha256": sha((tmp_path / n).read_bytes()), "subdir": ""}
                   for n in ("a.zip", "b.tgz")], dest, cache=tmp_path / "cache", max_bytes=MB, progress=False)
    assert [Path(m).parent for m in made] == [dest, dest]
    assert all(Path(m).name.startswith(".unpack-") for m in made)
    assert sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*")) == [
        "d", "d/a.txt", "d/b.txt", "top.txt"]
    assert leftovers(tmp_path) == []
