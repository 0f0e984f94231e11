"""A real `mlflow server` for tests, as in a cluster: PostgreSQL backend store, artifacts proxied into S3.

Fixtures (conftest imports them), one server per test module that asks:

- `postgres_uri`: a fresh database on 127.0.0.1:5432, dropped afterwards (skips without PostgreSQL);
- `mlflow_server`: `mlflow server` on a free port of 127.0.0.1 over that database, its artifacts in a
  bucket of its own on the session's moto S3 server (`moto_s3`); a `Server` with the URL, the S3
  endpoint and the bucket.

And the helpers tests use for the processes they start themselves: `free_port`, `wait_for`, `stop`.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

MLFLOW = Path(sys.executable).parent / "mlflow"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{proc.args[:3]} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    pytest.fail(f"{url} did not answer within {timeout} s:\n{log.read_text()[-3000:]}")


def stop(proc: subprocess.Popen) -> None:
    """Stop a process started in its own session, and the workers it forked."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(5)  # a graceful stop; uvicorn may linger on idle keep-alive connections
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


@pytest.fixture(scope="module")
def postgres_uri():
    psycopg2 = pytest.importorskip("psycopg2")
    try:
        admin = psycopg2.connect(host="127.0.0.1", port=5432, user="postgres", dbname="postgres", connect_timeout=3)
    except psycopg2.OperationalError:
        pytest.skip("no PostgreSQL on 127.0.0.1:5432")
    admin.autocommit = True
    name = f"lmforge_test_{secrets.token_hex(4)}"
    with admin.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    # +psycopg2: the driver installed here (SQLAlchemy 2.1 would pick psycopg 3 for a bare postgresql://)
    yield f"postgresql+psycopg2://postgres@127.0.0.1:5432/{name}"
    with admin.cursor() as cur:
        cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.close()


@dataclass(frozen=True)
class Server:
    url: str
    s3_endpoint: str
    artifacts_bucket: str


@pytest.fixture(scope="module")
def mlflow_server(postgres_uri, moto_s3, tmp_path_factory):
    import boto3

    bucket = f"mlflow-artifacts-{secrets.token_hex(4)}"
    boto3.client("s3", endpoint_url=moto_s3).create_bucket(Bucket=bucket)
    port, log = free_port(), tmp_path_factory.mktemp("mlflow-server") / "server.log"
    env = {**os.environ, "MLFLOW_S3_ENDPOINT_URL": moto_s3, "AWS_ENDPOINT_URL": moto_s3}
    env.pop("MLFLOW_TRACKING_URI", None)
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [MLFLOW, "server", "--backend-store-uri", postgres_uri,
             "--artifacts-destination", f"s3://{bucket}/mlruns", "--host", "127.0.0.1", "--port", str(port),
             "--workers", "1"],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        wait_for(f"http://127.0.0.1:{port}/health", proc, log, timeout=120)
        yield Server(f"http://127.0.0.1:{port}", moto_s3, bucket)
    finally:
        stop(proc)
