"""Download and unpack against servers started on 127.0.0.1, with archives built by the tests."""

import hashlib
import http.server
import io
import tarfile
import threading
import zipfile

import pytest

from detpipe.download import extract, fetch, fetch_dataset
from detpipe.errors import DetpipeError

MB = 1 << 20


class Server:
    """Serves ``files`` (name -> bytes) with Range support; ``mode`` makes it misbehave on purpose.

    drop_once: the first GET sends the headers and half the body, then closes the connection.
    drop_always: every GET does that. no_range: Range headers are ignored (200 and the whole file).
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
                data = server.files.get(self.path.lstrip("/"))
                if data is None:
                    self.send_error(404)
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
                drop = server.mode == "drop_always" or (server.mode == "drop_once" and len(server.requests) == 1)
                self.wfile.write(body[: len(body) // 2] if drop else body)
                if drop:
                    self.wfile.flush()
                    self.close_connection = True

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


def zip_bytes(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
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


@pytest.mark.parametrize("mode", ["w", "w:gz", "w:bz2", "w:xz", "zip"])
def test_fetch_verify_unpack_every_archive_type(server, tmp_path, mode):
    s = server()
    s.files["set"] = zip_bytes(SET) if mode == "zip" else tar_bytes(SET, mode)  # no suffix: types come from bytes
    dest = get(tmp_path, f"{s.url}/set", sha(s.files["set"]), subdir="balloon")
    assert (dest / "train/a.txt").read_bytes() == b"hello"
    assert sorted(p.name for p in dest.iterdir()) == ["train", "val"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp folder left


def test_dropped_connection_resumes_with_range(server, tmp_path):
    s = server("drop_once")
    s.files["big.tar"] = tar_bytes({"x/blob": BIG}, "w")
    dest = get(tmp_path, f"{s.url}/big.tar", sha(s.files["big.tar"]), subdir="x")
    assert (dest / "blob").read_bytes() == BIG
    assert len(s.requests) == 2 and s.requests[0]["range"] is None
    assert s.requests[1]["range"] == f"bytes={len(s.files['big.tar']) // 2}-"


def test_server_without_range_support_restarts(server, tmp_path):
    s = server("no_range")
    s.files["big.tar"] = tar_bytes({"x/blob": BIG}, "w")
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache/big.tar.part").write_bytes(b"junk from an earlier run")
    dest = get(tmp_path, f"{s.url}/big.tar", sha(s.files["big.tar"]), subdir="x")
    assert (dest / "blob").read_bytes() == BIG
    assert s.requests[0]["range"] == "bytes=24-"


def test_part_file_from_an_interrupted_run_is_resumed(server, tmp_path):
    s = server()
    data = tar_bytes({"x/blob": BIG}, "w")
    s.files["big.tar"] = data
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache/big.tar.part").write_bytes(data[:1000])
    get(tmp_path, f"{s.url}/big.tar", sha(data), subdir="x")
    assert [r["range"] for r in s.requests] == ["bytes=1000-"]


def test_wrong_bytes_fail_the_checksum_and_leave_nothing(server, tmp_path):
    s = server()
    s.files["set.tgz"] = tar_bytes(SET)
    expected = sha(tar_bytes({"balloon/train/a.txt": b"other"}))
    with pytest.raises(DetpipeError, match=f"sha256 mismatch: expected {expected}, got {sha(s.files['set.tgz'])}"):
        get(tmp_path, f"{s.url}/set.tgz", expected)
    assert list((tmp_path / "out").iterdir()) == [] and list((tmp_path / "cache").iterdir()) == []


def test_retries_give_up_with_a_count(server, tmp_path):
    s = server("drop_always")
    s.files["big.tar"] = BIG
    with pytest.raises(DetpipeError, match=r"big.tar: download failed after 3 tries"):
        get(tmp_path, f"{s.url}/big.tar", sha(BIG))
    assert len(s.requests) == 3
    assert all(r["range"] for r in s.requests[1:])  # each retry resumes
    assert list((tmp_path / "out").iterdir()) == []


def test_not_found_is_not_retried(server, tmp_path):
    s = server()
    with pytest.raises(DetpipeError, match=r"nothing.zip: download failed \(HTTP 404"):
        get(tmp_path, f"{s.url}/nothing.zip", "0" * 64)
    assert len(s.requests) == 1


def test_verified_archive_in_cache_is_not_fetched_again(server, tmp_path, capfd):
    s = server()
    s.files["set.zip"] = zip_bytes(SET)
    get(tmp_path, f"{s.url}/set.zip", sha(s.files["set.zip"]), subdir="balloon")
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
    with pytest.raises(DetpipeError, match=f"no sha256 recorded; the downloaded file's sha256 is {digest}"):
        get(tmp_path, f"{s.url}/set.zip", "")
    assert list((tmp_path / "out").iterdir()) == []
    get(tmp_path, f"{s.url}/set.zip", digest, subdir="balloon")
    assert len(s.requests) == 1


def test_file_url_local_path_and_local_folder(tmp_path):
    data = tar_bytes(SET)
    (tmp_path / "set.tgz").write_bytes(data)
    assert (get(tmp_path, (tmp_path / "set.tgz").as_uri(), sha(data)) / "balloon/val/b.txt").is_file()
    assert fetch(str(tmp_path / "set.tgz"), tmp_path / "copy", sha(data), progress=False) == sha(data)
    (tmp_path / "folder/inner").mkdir(parents=True)
    (tmp_path / "folder/inner/f.txt").write_text("x")
    dest = tmp_path / "from_folder"
    dest.mkdir()
    fetch_dataset([{"url": str(tmp_path / "folder"), "sha256": "", "subdir": "inner"}], dest,
                  cache=tmp_path / "cache", max_bytes=MB)
    assert (dest / "f.txt").read_text() == "x"
    with pytest.raises(DetpipeError, match="no such file"):
        fetch(str(tmp_path / "missing.zip"), tmp_path / "m", "0" * 64)


def test_missing_subdir_is_named(tmp_path):
    data = tar_bytes({"a.txt": b"x"})
    (tmp_path / "set.tgz").write_bytes(data)
    with pytest.raises(DetpipeError, match="archive has no folder 'balloon'"):
        get(tmp_path, str(tmp_path / "set.tgz"), sha(data), subdir="balloon")
    assert list((tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize("archive, message", [
    (lambda: tar_bytes({"/etc/evil": b"x"}), "refusing unsafe path '/etc/evil'"),
    (lambda: tar_bytes({"d/../../evil": b"x"}), "refusing unsafe path 'd/../../evil'"),
    (lambda: zip_bytes({"../evil": b"x"}), "refusing unsafe path '../evil'"),
    (lambda: tar_bytes({"d/a": b"x"}, extra=[link("d/l", "../../etc/passwd")]), "link to '../../etc/passwd' outside"),
    (lambda: tar_bytes({"d/a": b"x"}, extra=[link("d/l", "/etc/passwd")]), "link to '/etc/passwd' outside"),
    (lambda: tar_bytes({"d/a": b"x"}, extra=[link("d/h", "../x", tarfile.LNKTYPE)]), "link to '../x' outside"),
    (lambda: tar_bytes({"d/a": b"x"}, extra=[link("d/dev", "", tarfile.CHRTYPE)]), "device file or FIFO 'd/dev'"),
    (lambda: tar_bytes({"d/a": b"x" * (MB + 1)}), r"unpacks to 1.0 MB, over the 1.0 MB limit"),
    (lambda: b"not an archive at all", "not a zip or tar archive"),
])
def test_unsafe_archives_are_refused_before_anything_is_written(tmp_path, archive, message):
    data = archive()
    (tmp_path / "a").write_bytes(data)
    with pytest.raises(DetpipeError, match=message):
        get(tmp_path, str(tmp_path / "a"), sha(data))
    assert list((tmp_path / "out").iterdir()) == []
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_links_inside_the_archive_are_allowed(tmp_path):
    data = tar_bytes({"d/a": b"x"}, extra=[link("d/sub/l", "../a"), link("d/h", "d/a", tarfile.LNKTYPE)])
    archive = tmp_path / "a.tar"
    archive.write_bytes(data)
    extract(archive, tmp_path / "x", max_bytes=MB)
    assert (tmp_path / "x/d/sub/l").read_bytes() == b"x" and (tmp_path / "x/d/h").read_bytes() == b"x"


def test_corrupt_archive_leaves_nothing_half_unpacked(tmp_path):
    data = tar_bytes({"d/a": b"x" * 5000, "d/b": BIG}, "w:gz")
    data = data[: len(data) // 2]  # the gzip stream ends in the middle of the second member
    (tmp_path / "a.tgz").write_bytes(data)
    with pytest.raises(DetpipeError, match="a.tgz: damaged archive"):
        get(tmp_path, str(tmp_path / "a.tgz"), sha(data))
    assert list((tmp_path / "out").iterdir()) == []
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
