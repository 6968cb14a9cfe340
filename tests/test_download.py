import hashlib
import http.server
import io
import tarfile
import threading
import zipfile
from functools import partial

import pytest

from detpipe.download import extract, fetch_dataset
from detpipe.errors import DetpipeError


@pytest.fixture
def serve(tmp_path):
    """Serve ``tmp_path/www`` on 127.0.0.1; yields the base URL."""
    root = tmp_path / "www"
    root.mkdir()
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


def make_tar(path, files: dict[str, bytes]) -> str:
    with tarfile.open(path, "w:gz") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_fetch_verify_unpack_over_http(serve, tmp_path):
    root, base = serve
    sha = make_tar(root / "set.tar.gz", {"balloon/train/a.txt": b"hello", "balloon/val/b.txt": b"world"})
    dest = tmp_path / "out"
    dest.mkdir()
    fetch_dataset(f"{base}/set.tar.gz", sha, dest, subdir="balloon")
    assert (dest / "train/a.txt").read_bytes() == b"hello"
    assert sorted(p.name for p in dest.iterdir()) == ["train", "val"]


def test_checksum_mismatch_names_both_hashes_and_leaves_nothing(serve, tmp_path):
    root, base = serve
    sha = make_tar(root / "set.tar.gz", {"a.txt": b"x"})
    dest = tmp_path / "out"
    dest.mkdir()
    with pytest.raises(DetpipeError, match=f"sha256 mismatch: expected {'0' * 64}, got {sha}"):
        fetch_dataset(f"{base}/set.tar.gz", "0" * 64, dest)
    assert list(dest.iterdir()) == []


def test_missing_subdir_is_named(serve, tmp_path):
    root, base = serve
    sha = make_tar(root / "set.tar.gz", {"a.txt": b"x"})
    with pytest.raises(DetpipeError, match="archive has no folder 'balloon'"):
        fetch_dataset(f"{base}/set.tar.gz", sha, tmp_path, subdir="balloon")


def test_missing_url_is_one_line(serve, tmp_path):
    _, base = serve
    with pytest.raises(DetpipeError, match="download failed"):
        fetch_dataset(f"{base}/nope.zip", "0" * 64, tmp_path)


def test_local_path_and_zip(tmp_path):
    archive = tmp_path / "set.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("train/a.txt", "a")
    dest = tmp_path / "out"
    dest.mkdir()
    fetch_dataset(str(archive), hashlib.sha256(archive.read_bytes()).hexdigest(), dest)
    assert (dest / "train/a.txt").read_text() == "a"


@pytest.mark.parametrize("name", ["../evil.txt", "/etc/evil.txt"])
def test_unsafe_members_are_refused(tmp_path, name):
    archive = tmp_path / "bad.tar.gz"
    make_tar(archive, {name: b"x"})
    with pytest.raises(DetpipeError, match="refusing unsafe path"):
        extract(archive, tmp_path / "out")
    assert not (tmp_path / "evil.txt").exists()


def test_links_are_refused(tmp_path):
    archive = tmp_path / "link.tar"
    with tarfile.open(archive, "w") as tf:
        info = tarfile.TarInfo("link")
        info.type = tarfile.SYMTYPE
        info.linkname = "/etc/passwd"
        tf.addfile(info)
    with pytest.raises(DetpipeError, match="refusing link"):
        extract(archive, tmp_path / "out")
