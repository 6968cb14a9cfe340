"""DVC beyond one workspace: an S3 remote (moto's server on 127.0.0.1) and a cache shared by clones on one machine.

Alice's tiny project runs ``dvc repro`` once with its cache in a shared folder (``cache.shared group``) and
commits the result; the remote tests push it to S3 and pull it into fresh ``git clone``s the way a colleague
would, the shared-cache test checks clones out of her cache with links and no copy. docs/scale-out.md shows the
same steps for real S3, MinIO and a shared server.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import stat
from pathlib import Path

import botocore.exceptions
import pytest
import yaml

from tests.conftest import copy_repo, sh, tree_hashes, write_tiny_params
from tests.services import free_port
from tests.services.s3 import Credentials, S3Server, client, s3_server
from tests.test_e2e import dvc_ran

STAGES = {"download", "convert", "train", "evaluate", "report"}
UP_TO_DATE = "Data and pipelines are up to date."
# Kept out of git by the .dvc/.gitignore that every DVC project has; the only things a failed pull may leave.
LOCAL_ONLY = {"!! .dvc/config.local", "!! .dvc/tmp/"}


def dvc_outs(repo: Path) -> list[str]:
    """Every output dvc.yaml caches (files and folders); the metrics file (``cache: false``) lives in git."""
    stages = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]
    return [out if isinstance(out, str) else next(iter(out)) for stage in stages.values()
            for out in stage.get("outs", [])]


def output_files(repo: Path) -> list[Path]:
    return [p for rel in dvc_outs(repo) for p in ([repo / rel] if (repo / rel).is_file() else
                                                   sorted(q for q in (repo / rel).rglob("*") if q.is_file()))]


def metrics(repo: Path) -> dict:
    return json.loads(sh(repo, "dvc", "metrics", "show", "--json", stdout_only=True))


def git_clone(origin: Path, dest: Path) -> Path:
    sh(origin.parent, "git", "clone", "-q", str(origin), str(dest))
    return dest


def set_remote_access(repo: Path, endpoint_url: str, credentials: Credentials) -> None:
    """What each user does once per clone: the endpoint and keys go to .dvc/config.local, which git ignores."""
    for option, value in (("endpointurl", endpoint_url), ("access_key_id", credentials.access_key_id),
                          ("secret_access_key", credentials.secret_access_key)):
        sh(repo, "dvc", "remote", "modify", "--local", "storage", option, value)


def local_only_files(repo: Path) -> set[str]:
    """What ``git status`` lists beside the committed tree: untracked and ignored paths."""
    return set(sh(repo, "git", "status", "--porcelain", "--ignored", stdout_only=True).splitlines())


def listening_hosts(port: int) -> set[str]:
    """The addresses a TCP socket listens on at ``port`` (Linux's /proc/net/tcp*: hex address, hex port)."""
    hosts = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                hosts.add(socket.inet_ntoa(bytes.fromhex(address)[::-1]) if len(address) == 8 else address)
    return hosts


@pytest.fixture(scope="module")
def s3():
    with s3_server() as server:
        yield server


@pytest.fixture(scope="module")
def alice(tmp_path_factory) -> tuple[Path, Path]:
    """Alice's tiny project, run once by ``dvc repro`` with its cache in a shared folder, and committed.

    Returns ``(repo, shared_cache)``. Tests clone it and leave it as it is (the remote fixture adds a commit).
    """
    root = tmp_path_factory.mktemp("dvc-remote")
    repo = copy_repo(root / "alice")
    write_tiny_params(repo)
    sh(repo, "git", "init", "-q")
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "tiny")
    shared = root / "shared-cache"
    sh(repo, "dvc", "cache", "dir", "--local", str(shared))
    sh(repo, "dvc", "config", "--local", "cache.shared", "group")
    assert dvc_ran(sh(repo, "dvc", "repro")) == STAGES
    sh(repo, "git", "add", "-A")  # dvc.lock and the metrics file
    sh(repo, "git", "commit", "-qm", "tiny run")
    return repo, shared


@pytest.fixture(scope="module")
def pushed(alice, s3: S3Server) -> Path:
    """Alice's project with the S3 remote set up as a user does it, and ``dvc push`` done."""
    repo, _ = alice
    sh(repo, "dvc", "remote", "add", "-d", "storage", f"s3://{s3.bucket}/detpipe")
    sh(repo, "git", "commit", "-qm", "DVC remote", ".dvc/config")
    set_remote_access(repo, s3.endpoint_url, s3.credentials)
    assert "files pushed" in sh(repo, "dvc", "push")
    return repo


def test_the_s3_server_listens_on_localhost_checks_keys_and_stops_even_when_the_block_fails():
    before = dict(os.environ)
    with pytest.raises(RuntimeError, match="the block failed"), s3_server(bucket="probe") as server:
        port = int(server.endpoint_url.rsplit(":", 1)[1])
        assert server.endpoint_url == f"http://127.0.0.1:{port}" and listening_hosts(port) == {"127.0.0.1"}
        storage = client(server.endpoint_url, server.credentials)
        storage.put_object(Bucket="probe", Key="a.txt", Body=b"hello")
        assert storage.get_object(Bucket="probe", Key="a.txt")["Body"].read() == b"hello"
        wrong = Credentials(server.credentials.access_key_id, "not-the-secret")
        with pytest.raises(botocore.exceptions.ClientError, match="SignatureDoesNotMatch"):
            client(server.endpoint_url, wrong).get_object(Bucket="probe", Key="a.txt")
        assert dict(os.environ) == before  # the keys went to boto3 as arguments only
        raise RuntimeError("the block failed")
    assert dict(os.environ) == before
    assert listening_hosts(port) == set()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


@pytest.mark.slow
def test_push_then_a_fresh_clone_pulls_data_model_and_metrics_and_repro_runs_nothing(pushed, s3, alice, tmp_path):
    repo = pushed
    secret = s3.credentials.secret_access_key
    # the remote's name and URL are committed; its endpoint and keys are only in the ignored .dvc/config.local
    config = sh(repo, "git", "show", "HEAD:.dvc/config", stdout_only=True)
    assert f"url = s3://{s3.bucket}/detpipe" in config and "remote = storage" in config
    assert secret in (repo / ".dvc/config.local").read_text()
    sh(repo, "git", "check-ignore", "-q", ".dvc/config.local")
    assert sh(repo, "git", "grep", "-lF", secret, check=False, stdout_only=True) == ""
    assert secret not in sh(repo, "git", "log", "--all", "-p", stdout_only=True)
    assert sh(repo, "dvc", "status", "-c").strip() == "Cache and remote 'storage' are in sync."
    keys = [o["Key"] for o in client(s3.endpoint_url, s3.credentials).list_objects_v2(Bucket=s3.bucket)["Contents"]]
    assert keys and all(key.startswith("detpipe/files/md5/") for key in keys)

    outs = dvc_outs(repo)
    assert {"data/raw", "data/coco", "runs/train", "runs/eval/predictions.json", "reports/index.html"} <= set(outs)
    original = tree_hashes(repo, outs)
    assert "runs/train/model.pt" in original and "data/coco/train.json" in original

    colleague = git_clone(repo, tmp_path / "colleague")
    assert not (colleague / ".dvc/config.local").exists() and not (colleague / ".dvc/cache").exists()
    assert not any((colleague / out).exists() for out in outs)
    set_remote_access(colleague, s3.endpoint_url, s3.credentials)
    assert "files fetched" in sh(colleague, "dvc", "pull")

    assert tree_hashes(colleague, outs) == original
    assert metrics(colleague) == metrics(repo)
    assert metrics(colleague)[""]["data"]["runs/eval/metrics.json"]["data"]["num_images"] == 4
    assert sh(colleague, "dvc", "status").strip() == UP_TO_DATE
    repro = sh(colleague, "dvc", "repro")
    assert dvc_ran(repro) == set() and UP_TO_DATE in repro
    assert sh(colleague, "dvc", "status", "-c").strip() == "Cache and remote 'storage' are in sync."
    assert sh(colleague, "git", "status", "--porcelain", stdout_only=True) == ""  # nothing to commit after all


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["wrong secret", "no server at the endpoint"])
def test_a_pull_that_cannot_reach_the_remote_fails_naming_it_and_writes_no_output(pushed, s3, tmp_path, fault):
    colleague = git_clone(pushed, tmp_path / "colleague")
    if fault == "wrong secret":
        endpoint, keys = s3.endpoint_url, Credentials(s3.credentials.access_key_id, "not-the-secret")
        cause = "Forbidden: An error occurred (403) when calling the HeadObject operation: Forbidden"
    else:
        endpoint, keys = f"http://127.0.0.1:{free_port()}", s3.credentials
        cause = f'Could not connect to the endpoint URL: "{endpoint}/{s3.bucket}/detpipe/files/md5"'
    set_remote_access(colleague, endpoint, keys)
    # botocore retries a refused connection with backoff for about 2 minutes; one attempt shows the same error
    with pytest.raises(AssertionError, match="dvc pull failed") as failed:  # sh: the exit status was not 0
        sh(colleague, "dvc", "pull", env={"AWS_MAX_ATTEMPTS": "1"})
    message = str(failed.value)
    # DVC names the remote by its storage type and path, then the cause
    assert f"ERROR: failed to connect to s3 ({s3.bucket}/detpipe/files/md5) - {cause}" in message
    assert "ERROR: failed to pull data from the cloud" in message
    assert not any((colleague / out).exists() for out in dvc_outs(colleague))
    assert local_only_files(colleague) == LOCAL_ONLY  # no partial output, no cache, nothing else

    set_remote_access(colleague, s3.endpoint_url, s3.credentials)  # fixed: the same clone pulls cleanly
    sh(colleague, "dvc", "pull")
    assert sh(colleague, "dvc", "status").strip() == UP_TO_DATE


def cache_object(shared: Path, path: Path) -> Path:
    """Where DVC keeps ``path``'s content in the cache: files/md5/<first 2 hex digits>/<the other 30>."""
    md5 = hashlib.md5(path.read_bytes()).hexdigest()
    return shared / "files/md5" / md5[:2] / md5[2:]


def use_shared_cache(clone: Path, shared: Path, link_type: str) -> None:
    sh(clone, "dvc", "cache", "dir", "--local", str(shared))
    sh(clone, "dvc", "config", "--local", "cache.shared", "group")
    sh(clone, "dvc", "config", "--local", "cache.type", link_type)


@pytest.mark.slow
def test_clones_on_one_machine_check_out_of_one_shared_cache_as_links_with_group_permissions(alice, tmp_path):
    repo, shared = alice
    outs = dvc_outs(repo)
    original = tree_hashes(repo, outs)
    # Alice's run filled the shared cache: folders group-writable and setgid (new files keep the group), the data
    # read-only to everyone (DVC protects it), the run cache group-writable
    assert {stat.S_IMODE(p.stat().st_mode) for p in [shared, *shared.rglob("*")] if p.is_dir()} == {0o2775}
    assert {stat.S_IMODE(p.stat().st_mode) for p in (shared / "files").rglob("*") if p.is_file()} == {0o444}
    assert {stat.S_IMODE(p.stat().st_mode) for p in (shared / "runs").rglob("*") if p.is_file()} == {0o664}

    bob = git_clone(repo, tmp_path / "bob")
    use_shared_cache(bob, shared, "symlink")
    carol = git_clone(repo, tmp_path / "carol")
    use_shared_cache(carol, shared, "hardlink")
    for clone in (bob, carol):
        sh(clone, "dvc", "checkout")  # no remote, no pull, no run
        assert tree_hashes(clone, outs) == original
        assert sh(clone, "dvc", "status").strip() == UP_TO_DATE
        assert not (clone / ".dvc/cache").exists()  # nothing copied into a cache of its own
    files = output_files(bob)
    assert files and all(p.is_symlink() and p.resolve() == cache_object(shared, p).resolve() for p in files)
    assert all(p.stat().st_ino == cache_object(shared, p).stat().st_ino for p in output_files(carol))
    repro = sh(bob, "dvc", "repro")
    assert dvc_ran(repro) == set() and UP_TO_DATE in repro

    # Carol wants copies she can edit: another link type, then relink what is checked out
    sh(carol, "dvc", "config", "--local", "cache.type", "copy")
    sh(carol, "dvc", "checkout", "--relink")
    assert all(not p.is_symlink() and p.stat().st_nlink == 1 for p in output_files(carol))
    assert tree_hashes(carol, outs) == original and sh(carol, "dvc", "status").strip() == UP_TO_DATE

    # Bob's umask keeps everything private, yet what he adds to the shared cache is open to the group
    notes = bob / "notes.txt"
    for i in range(1000):  # content whose cache folder does not exist yet, so DVC makes it
        notes.write_text(f"Bob's note {i}\n")
        if not cache_object(shared, notes).parent.exists():
            break
    assert not cache_object(shared, notes).parent.exists()
    sh(bob, "sh", "-c", "umask 077 && dvc add notes.txt")
    added = cache_object(shared, notes)
    assert stat.S_IMODE(added.parent.stat().st_mode) == 0o2775 and stat.S_IMODE(added.stat().st_mode) == 0o444
    assert notes.is_symlink() and notes.resolve() == added.resolve()
