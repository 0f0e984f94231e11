"""A real `mlflow server` for tests, as in a cluster: PostgreSQL backend store, artifacts proxied into S3.

Fixtures (conftest imports them), one server per test module that asks:

- `postgres_uri`: a fresh database on 127.0.0.1:5432, dropped afterwards (skips without PostgreSQL);
- `mlflow_server`: `mlflow server` on a free port of 127.0.0.1 over that database, its artifacts in a
  bucket of its own on the session's moto S3 server (`moto_s3`); a `Server` with the URL, the S3
  endpoint and the bucket.

And the helpers tests use for the processes they start themselves: `free_port`, `wait_for`, `stop`.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

# This venv's bin (mlflow, uvicorn): the scoring server execs `uvicorn` from PATH.
VENV_BIN = Path(sys.executable).parent

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


@contextlib.contextmanager
def model_server(model_uri: str, tracking_uri: str, workdir: Path) -> Iterator[str]:
    """`mlflow models serve` of `model_uri` on a free port of 127.0.0.1, with this venv (--env-manager local),
    one worker, its log in `workdir`; its base URL once /ping answers. Stopped afterwards."""
    port, log = free_port(), workdir / "serve.log"
    # As from an activated venv: the scoring server execs `uvicorn` from PATH.
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}"}
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [VENV_BIN / "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local",
             "-h", "127.0.0.1", "-p", str(port), "--workers", "1"],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=workdir,
        )
    try:
        wait_for(f"http://127.0.0.1:{port}/ping", proc, log, timeout=180)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(proc)


def post_invocations(url: str, payload: dict) -> tuple[int, str]:
    """POST `payload` as JSON to the model server's /invocations: (status, body), errors included."""
    request = urllib.request.Request(f"{url}/invocations", data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()
