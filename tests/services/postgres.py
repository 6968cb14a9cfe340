"""A throwaway PostgreSQL cluster for one test: Debian's ``postgresql`` server, in a temporary folder.

``with postgres() as url:`` makes a cluster (``initdb``) in a new folder under the system's temp folder, starts it
listening on 127.0.0.1 only (a free port) and on a unix socket inside that folder, creates a database and a role
with a random password, yields the SQLAlchemy URL ``postgresql://<role>:<password>@127.0.0.1:<port>/<database>``,
and afterwards stops the server and deletes the folder, also when the test failed.

Authentication: over TCP (loopback only, the only addresses it listens on) every role needs its password
(scram-sha-256); the unix socket trusts local users, but it lies in a folder only the server's user can open.
PostgreSQL refuses to run as root: as root, the server and its tools run as Debian's ``postgres`` system user
(``runuser -u postgres --``), which owns the folder; otherwise they run as the current user.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import pytest

from tests.services import free_port

PACKAGE = "Debian's postgresql package (apt-get install postgresql)"
TOOLS = ("initdb", "pg_ctl", "postgres", "psql")


def missing(what: str) -> NoReturn:
    """Under CI (the CI environment variable set) a missing server fails the test: .ci/run installs it, and a skip
    there would silently drop the check. Elsewhere the test is skipped."""
    if os.environ.get("CI"):
        pytest.fail(f"CI is set but {what}: install {PACKAGE} in .ci/run", pytrace=False)
    pytest.skip(f"{what}: needs {PACKAGE}")


def bindir() -> Path:
    """The folder of the server's programs: ``pg_config --bindir``, else the newest /usr/lib/postgresql/*/bin."""
    candidates = []
    if shutil.which("pg_config"):
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True)
        if out.returncode == 0:
            candidates.append(Path(out.stdout.strip()))
    versions = glob.glob("/usr/lib/postgresql/*/bin")
    candidates += [Path(p) for p in sorted(versions, key=lambda p: int(Path(p).parent.name), reverse=True)
                   if Path(p).parent.name.isdigit()]
    for folder in candidates:
        if all((folder / tool).is_file() for tool in TOOLS):
            return folder
    missing("the PostgreSQL server programs (initdb, pg_ctl, postgres, psql) are not installed")


def as_owner() -> list[str]:
    """The command prefix that runs a program as the cluster's owner: ``postgres`` when we are root."""
    if os.geteuid() != 0:
        return []
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        missing("running as root, but there is no 'postgres' system user to run the server as")
    if not shutil.which("runuser"):
        missing("running as root, but runuser (util-linux) is not installed")
    return ["runuser", "-u", "postgres", "--"]


def _run(cmd: list, cwd: Path, log: Path | None = None) -> str:
    result = subprocess.run([*as_owner(), *map(str, cmd)], cwd=cwd, capture_output=True, text=True, timeout=120)
    if result.returncode:
        tail = log.read_text(errors="replace")[-3000:] if log is not None and log.is_file() else ""
        raise AssertionError(f"{' '.join(map(str, cmd))} failed ({result.returncode}):\n{result.stdout[-2000:]}"
                             f"\n{result.stderr[-2000:]}\n{tail}")
    return result.stdout


@contextlib.contextmanager
def postgres(user: str = "detpipe", database: str = "mlflow") -> Iterator[str]:
    """A running cluster with ``database`` owned by ``user``: yields its SQLAlchemy URL (loopback, password)."""
    bin_ = bindir()
    prefix = as_owner()
    # Not pytest's tmp_path: as root that lies in a folder the postgres user cannot enter.
    folder = Path(tempfile.mkdtemp(prefix="detpipe-postgres-"))
    try:
        if prefix:
            owner = pwd.getpwnam("postgres")
            os.chown(folder, owner.pw_uid, owner.pw_gid)
        data, log, pwfile = folder / "data", folder / "postgres.log", folder / "superuser.pw"
        # The superuser's password: initdb wants one when password authentication is on; nobody uses it.
        pwfile.write_text(secrets.token_hex(16))
        pwfile.chmod(0o600)
        if prefix:
            os.chown(pwfile, owner.pw_uid, owner.pw_gid)
        _run([bin_ / "initdb", "-D", data, "-U", "postgres", "--pwfile", pwfile, "--auth-host=scram-sha-256",
              "--auth-local=trust", "--locale=C", "--encoding=UTF8", "--no-sync"], folder)
        port = free_port()
        options = f"-c listen_addresses=127.0.0.1 -p {port} -k {folder} -c fsync=off"
        try:
            _run([bin_ / "pg_ctl", "-D", data, "-l", log, "-o", options, "-w", "-t", "60", "start"], folder, log)
            password = secrets.token_urlsafe(18)  # letters, digits, - and _: safe in SQL quotes and in a URL
            _run([bin_ / "psql", "-h", folder, "-p", port, "-U", "postgres", "-d", "postgres", "-v",
                  "ON_ERROR_STOP=1", "-qc", f"CREATE ROLE {user} LOGIN PASSWORD '{password}'",
                  "-c", f"CREATE DATABASE {database} OWNER {user}"], folder, log)
            yield f"postgresql://{user}:{password}@127.0.0.1:{port}/{database}"
        finally:
            if (data / "postmaster.pid").exists():
                stop = [*prefix, str(bin_ / "pg_ctl"), "-D", str(data), "-w", "-t", "30", "stop"]
                if subprocess.run([*stop, "-m", "fast"], cwd=folder, capture_output=True).returncode:
                    subprocess.run([*stop, "-m", "immediate"], cwd=folder, capture_output=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
