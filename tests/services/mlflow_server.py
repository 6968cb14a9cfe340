"""An MLflow tracking server for one test, and the helpers that wait for an MLflow web server to answer.

``with mlflow_server(backend_store_uri, folder) as url:`` runs ``mlflow server`` on a free port of 127.0.0.1 with
that backend store (e.g. the URL of :func:`tests.services.postgres.postgres`), serving artifacts itself (clients
upload and download through it) from ``folder/artifacts``; its output goes to ``folder/mlflow-server.log``, whose
tail a failed start shows. Afterwards its process group is stopped.

``mlflow_server(..., auth=(admin, password))`` runs MLflow's basic-auth app (``--app-name basic-auth``, which needs
``mlflow[auth]``): its configuration is ``folder/basic_auth.ini`` (:func:`write_auth_config`: users and
permissions in ``folder/basic_auth.db``, ``default_permission = READ``, accepted passwords kept 60 s), named by
``MLFLOW_AUTH_CONFIG_PATH``; the admin's password goes in ``MLFLOW_AUTH_ADMIN_PASSWORD`` (the server creates that
user at its first start) and the static key the app wants for CSRF in ``MLFLOW_FLASK_SERVER_SECRET_KEY``.
``/health`` answers without credentials there too, so the same wait works.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from tests.conftest import BIN
from tests.services import free_port, stop

# MLflow 3 starts a job runner (huey workers) with the server unless told not to: nothing here needs it.
SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def log_tail(log: Path | None, chars: int = 3000) -> str:
    return log.read_text(errors="replace")[-chars:] if log is not None and log.is_file() else ""


def wait_until_up(url: str, proc: subprocess.Popen, seconds: float = 90, log: Path | None = None) -> None:
    """Wait for ``url/health`` to answer; fail (with the tail of ``log``) when ``proc`` exits or time runs out."""
    what = " ".join([Path(str(proc.args[0])).name, *map(str, proc.args[1:2])])  # "mlflow ui", "mlflow server"
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{what} exited with status {proc.returncode}\n{log_tail(log)}")
        try:
            urllib.request.urlopen(f"{url}/health", timeout=1)
            return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"{what} did not answer on {url} within {seconds:g} s\n{log_tail(log)}")


def write_auth_config(folder: Path, admin: str, default_permission: str = "READ", cache_s: int = 60) -> Path:
    """``folder/basic_auth.ini`` for MLflow's basic-auth app, the structure of the one MLflow ships
    (mlflow/server/auth/basic_auth.ini), its user database in ``folder/basic_auth.db``; no password in it.

    ``cache_s``: ``auth_cache_ttl_seconds``, how long the server keeps a password it accepted (MLflow's default 0
    checks its slow hash at every request, about half a second each on two busy cores)."""
    config = folder / "basic_auth.ini"
    config.write_text("[mlflow]\n"
                      f"default_permission = {default_permission}\n"
                      f"database_uri = sqlite:///{folder.resolve() / 'basic_auth.db'}\n"
                      f"admin_username = {admin}\n"
                      "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
                      f"auth_cache_ttl_seconds = {cache_s}\n")
    config.chmod(0o600)
    return config


@contextlib.contextmanager
def mlflow_server(backend_store_uri: str, folder: Path, *args: str, env: dict | None = None,
                  auth: tuple[str, str] | None = None) -> Iterator[str]:
    """``mlflow server`` on 127.0.0.1 (``args``: more options); yields its URL, ``http://127.0.0.1:<port>``.
    ``auth``: ``(admin, password)``, run the basic-auth app with that admin."""
    folder.mkdir(parents=True, exist_ok=True)
    log = folder / "mlflow-server.log"
    port = free_port()
    cmd = [str(BIN / "mlflow"), "server", "--backend-store-uri", backend_store_uri, "--serve-artifacts",
           "--artifacts-destination", str(folder / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1", *args]
    server_env = {**os.environ, **SERVER_ENV}
    # A client's credentials in the test's own environment are no business of the server's.
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        server_env.pop(name, None)
    if auth is not None:
        admin, password = auth
        cmd += ["--app-name", "basic-auth"]
        server_env.pop("MLFLOW_AUTH_ADMIN_USERNAME", None)  # it would override the file's admin_username
        server_env.update({"MLFLOW_AUTH_CONFIG_PATH": str(write_auth_config(folder, admin)),
                           "MLFLOW_AUTH_ADMIN_PASSWORD": password,
                           "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16)})
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=folder, env={**server_env, **(env or {})},
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        # The first start against an empty database creates MLflow's tables (a few dozen migrations).
        wait_until_up(url, proc, seconds=240, log=log)
        yield url
    finally:
        stop(proc)
