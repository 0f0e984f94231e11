"""Registration, promotion and serving against a real `mlflow server` process, as in a cluster.

One `mlflow server` on 127.0.0.1 for the module: PostgreSQL backend store (a fresh database
on 127.0.0.1:5432, dropped afterwards) and artifacts proxied into S3, a real moto S3 server
on 127.0.0.1 (`moto_s3` in conftest). The model is the session's tiny fairseq LM
(`tiny_lm`). Also: two `lmforge register` processes racing against the server, and
`mlflow models serve` answering /invocations as a real process.
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

from conftest import TINY_CONFIG, VENV_BIN, hub_expected_row, nudged_checkpoint

BUCKET = "mlflow-artifacts"
TEXT = "the cat sat on the mat"
IDENTITY = {"scorer": "fairseq-eval-lm", "split": "test", "split_sha256": "d" * 64, "dict_sha256": "b" * 64,
            "tokens_per_sample": 64, "context_window": 0, "sample_break_mode": "none"}


def evaluation(perplexity: float) -> dict:
    from lmforge.models.evaluate import identity_sha256

    return {"split": "test", "perplexity": perplexity, "identity": IDENTITY, "identity_sha256": identity_sha256(IDENTITY)}


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


@pytest.fixture(scope="module")
def server(postgres_uri, moto_s3, tmp_path_factory):
    import boto3

    boto3.client("s3", endpoint_url=moto_s3).create_bucket(Bucket=BUCKET)
    port, log = free_port(), tmp_path_factory.mktemp("mlflow-server") / "server.log"
    env = {**os.environ, "MLFLOW_S3_ENDPOINT_URL": moto_s3, "AWS_ENDPOINT_URL": moto_s3}
    env.pop("MLFLOW_TRACKING_URI", None)
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [VENV_BIN / "mlflow", "server", "--backend-store-uri", postgres_uri,
             "--artifacts-destination", f"s3://{BUCKET}/mlruns", "--host", "127.0.0.1", "--port", str(port),
             "--workers", "1"],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        wait_for(f"http://127.0.0.1:{port}/health", proc, log, timeout=120)
        yield Server(f"http://127.0.0.1:{port}", moto_s3)
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def registered(server, tiny_lm):
    """The tiny LM registered through the server by lmforge.models.register, in a pipeline run's MLflow run."""
    from lmforge import tracking
    from lmforge.models.register import register_model

    run_id = tracking.pipeline_run(server.url, "lmforge-server", "pipeline-1", storage_root="/not/used/with/a/server")
    return register_model(
        checkpoint=tiny_lm.checkpoint, dict_path=tiny_lm.dict_path, model_name="served-lm", tracking_uri=server.url,
        run_id=run_id, tags={"pipeline_run_id": "pipeline-1"}, evaluation=evaluation(100.0),
    )


def test_register_stores_artifacts_in_s3_and_loads_by_alias_in_a_fresh_process(server, registered, tiny_hub):
    import boto3

    assert registered["model_uri"] == "models:/served-lm@champion" and registered["version"] == "1"
    keys = [o["Key"] for o in boto3.client("s3", endpoint_url=server.s3_endpoint).list_objects_v2(Bucket=BUCKET)["Contents"]]
    for name in ("artifacts/model.pt", "artifacts/dict.txt", "artifacts/tokenizer/tokenizer.json", "MLmodel"):
        assert any(key.endswith(name) for key in keys), name

    code = (
        "import json, sys, mlflow\n"
        "m = mlflow.pyfunc.load_model('models:/served-lm@champion')\n"
        "print(json.dumps(m.predict(json.loads(sys.argv[1])).to_dict('records')))\n"
    )
    env = {**os.environ, "MLFLOW_TRACKING_URI": server.url}
    proc = subprocess.run([sys.executable, "-c", code, json.dumps([TEXT])], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = json.loads(proc.stdout.strip().splitlines()[-1])[0]
    expected = hub_expected_row(tiny_hub, TEXT)
    assert row["log_prob"] == pytest.approx(expected["log_prob"], abs=1e-4) and row["tokens"] == expected["tokens"]


def test_two_registrations_racing_end_with_distinct_versions_and_one_champion(server, tiny_lm, tmp_path):
    """Two `lmforge register` processes at once; whichever gets version 1, the better model ends champion."""
    from mlflow import MlflowClient

    procs = []
    for k, perplexity in ((1, 100.0), (2, 90.0)):
        checkpoint = nudged_checkpoint(tiny_lm.checkpoint, tmp_path / f"ckpt{k}", k)
        (tmp_path / f"metrics{k}.json").write_text(json.dumps(evaluation(perplexity)))
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "lmforge.cli", "register", "--config", TINY_CONFIG,
             "--set", f"tracking.uri={server.url}", "--set", "registry.model_name=race-lm",
             "--set", f"storage.root={tmp_path / 'runs'}", "--data-bin", tiny_lm.data_bin,
             "--checkpoint", checkpoint, "--metrics", tmp_path / f"metrics{k}.json"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        ))
    outputs = [proc.communicate(timeout=300) for proc in procs]
    for proc, (out, err) in zip(procs, outputs):
        assert proc.returncode == 0, err[-3000:]
    results = [json.loads(out[out.index("{"):]) for out, _ in outputs]
    assert sorted(r["version"] for r in results) == ["1", "2"]

    client = MlflowClient(server.url)
    aliases = {a: str(v) for a, v in client.get_registered_model("race-lm").aliases.items()}
    better = results[1]["version"]  # perplexity 90
    assert aliases["champion"] == better
    tags = {v: client.get_model_version("race-lm", v).tags for v in ("1", "2")}
    assert [tags[v]["lmforge.promotion"] for v in ("1", "2")].count("champion") == (2 if better == "2" else 1)
    assert all(t["lmforge.gate"] == "decided" for t in tags.values())
    if better == "2":  # v1 was champion first, then beaten
        assert tags["2"]["lmforge.promotion_reason"] == "better: perplexity 90 beats champion v1's 100"
    else:
        assert aliases["challenger"] == "2"
        assert tags["2"]["lmforge.promotion_reason"] == "worse: perplexity 100 does not beat champion v1's 90"


def test_mlflow_models_serve_answers_invocations(server, registered, tiny_hub, tmp_path):
    with model_server("models:/served-lm@champion", server.url, tmp_path) as url:

        def invoke(payload: dict) -> list[dict]:
            status, body = post_invocations(url, payload)
            assert status == 200, body
            return json.loads(body)["predictions"]

        row = invoke({"inputs": [TEXT]})[0]
        expected = hub_expected_row(tiny_hub, TEXT)
        assert row["log_prob"] == pytest.approx(expected["log_prob"], abs=1e-4)
        assert row["tokens"] == expected["tokens"] and row["perplexity"] > 1
        sampled = invoke({"dataframe_split": {"columns": ["text"], "data": [[TEXT]]},
                          "params": {"continuation_tokens": 3, "seed": 1}})[0]
        assert sampled["log_prob"] == pytest.approx(row["log_prob"], abs=1e-6)
        assert 1 <= len(sampled["continuation"].split()) <= 3
