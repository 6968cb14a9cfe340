"""An S3-compatible server for the tests: moto's server mode on 127.0.0.1, with access keys checked.

``s3_server()`` starts ``python -m moto.server`` in its own process group on a free port of 127.0.0.1, waits
until it answers, makes an IAM user whose access key may do anything in S3 plus a bucket, and yields an
``S3Server`` (endpoint_url, bucket, credentials). Moto checks signatures from then on, so a request signed with
another secret gets 403 like on AWS. The server is killed when the block ends, whatever happened in it.

Nothing is put into ``os.environ``: the keys reach boto3 as arguments and DVC through the ``.dvc/config.local``
a test writes with ``dvc remote modify --local``.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

from tests.services import free_port, stop

HOST = "127.0.0.1"
REGION = "us-east-1"
# The IAM calls that make the user and its key (create_user, put_user_policy, create_access_key) run before any
# key exists, so moto lets exactly that many actions through unsigned and checks every later one.
BOOTSTRAP_ACTIONS = 3


class Credentials(NamedTuple):
    access_key_id: str
    secret_access_key: str


class S3Server(NamedTuple):
    endpoint_url: str
    bucket: str
    credentials: Credentials


def _server_env() -> dict[str, str]:
    # the server needs no AWS settings of its own; the caller's (if any) must not change what it accepts
    env = {key: value for key, value in os.environ.items() if not key.startswith(("AWS_", "MOTO_"))}
    return {**env, "INITIAL_NO_AUTH_ACTION_COUNT": str(BOOTSTRAP_ACTIONS)}


def _answers(url: str) -> bool:
    try:  # moto's own API: answered without counting as an (unsigned) AWS action
        with urllib.request.urlopen(f"{url}/moto-api/data.json", timeout=1) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _start(log: Path, timeout: float) -> tuple[subprocess.Popen, str]:
    """Start moto on a free port and wait until it answers; a port taken in between is retried with another."""
    for _ in range(3):
        port = free_port()
        with log.open("ab") as out:
            proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", HOST, "-p", str(port)],
                                    stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=_server_env(), start_new_session=True)
        url = f"http://{HOST}:{port}"
        deadline = time.monotonic() + timeout
        while proc.poll() is None and time.monotonic() < deadline:
            if _answers(url):
                return proc, url
            time.sleep(0.1)
        exited = proc.poll() is not None  # e.g. the port was taken after free_port() looked
        stop(proc, timeout=10)
        if not exited:
            break  # it ran but never answered: another port will not help
    raise RuntimeError(f"moto's S3 server did not start on {HOST}:\n{log.read_text(errors='replace')[-3000:]}")


def _make_user_and_bucket(url: str, bucket: str) -> Credentials:
    import boto3

    iam = boto3.client("iam", endpoint_url=url, region_name=REGION,
                       aws_access_key_id="bootstrap", aws_secret_access_key="bootstrap")
    iam.create_user(UserName="detpipe")
    policy = {"Version": "2012-10-17",
              "Statement": [{"Effect": "Allow", "Action": "s3:*",
                             "Resource": [f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"]}]}
    iam.put_user_policy(UserName="detpipe", PolicyName="detpipe-bucket", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName="detpipe")["AccessKey"]
    credentials = Credentials(key["AccessKeyId"], key["SecretAccessKey"])
    client(url, credentials).create_bucket(Bucket=bucket)  # signed: checks that the key works
    return credentials


def client(endpoint_url: str, credentials: Credentials):
    """A boto3 S3 client for the server, with the keys passed as arguments (nothing read from or put in the env)."""
    import boto3

    return boto3.client("s3", endpoint_url=endpoint_url, region_name=REGION,
                        aws_access_key_id=credentials.access_key_id,
                        aws_secret_access_key=credentials.secret_access_key)


@contextlib.contextmanager
def s3_server(bucket: str = "detpipe-test", timeout: float = 60) -> Iterator[S3Server]:
    """Moto's S3 server on a free port of 127.0.0.1 with ``bucket`` made; stopped when the block ends."""
    with tempfile.TemporaryDirectory(prefix="moto-") as tmp:
        log = Path(tmp) / "moto.log"
        proc, url = _start(log, timeout)
        try:
            try:
                credentials = _make_user_and_bucket(url, bucket)
            except Exception as error:
                raise RuntimeError(f"moto's S3 server at {url} did not take the bucket {bucket!r}: {error}\n"
                                   f"{log.read_text(errors='replace')[-3000:]}") from error
            yield S3Server(url, bucket, credentials)
        finally:
            stop(proc, timeout=10)
