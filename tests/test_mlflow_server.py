"""Registration, promotion and serving against a real `mlflow server` process, as in a cluster.

One `mlflow server` on 127.0.0.1 for the module (`mlflow_server`, tests/mlflow_server.py):
PostgreSQL backend store (a fresh database on 127.0.0.1:5432, dropped afterwards) and artifacts
proxied into S3, a real moto S3 server on 127.0.0.1 (`moto_s3` in conftest). The model is the
session's tiny fairseq LM (`tiny_lm`). Also: two `lmforge register` processes racing against the server, and
`mlflow models serve` answering /invocations as a real process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import TINY_CONFIG, hub_expected_row, nudged_checkpoint
from mlflow_server import model_server, post_invocations

TEXT = "the cat sat on the mat"
IDENTITY = {"scorer": "fairseq-eval-lm", "split": "test", "split_sha256": "d" * 64, "dict_sha256": "b" * 64,
            "tokens_per_sample": 64, "context_window": 0, "sample_break_mode": "none"}


def evaluation(perplexity: float) -> dict:
    from lmforge.models.evaluate import identity_sha256

    return {"split": "test", "perplexity": perplexity, "identity": IDENTITY, "identity_sha256": identity_sha256(IDENTITY)}


@pytest.fixture(scope="module")
def registered(mlflow_server, tiny_lm):
    """The tiny LM registered through the server by lmforge.models.register, in a pipeline run's MLflow run."""
    from lmforge import tracking
    from lmforge.models.register import register_model

    run_id = tracking.pipeline_run(mlflow_server.url, "lmforge-server", "pipeline-1", storage_root="/not/used/with/a/server")
    return register_model(
        checkpoint=tiny_lm.checkpoint, dict_path=tiny_lm.dict_path, model_name="served-lm", tracking_uri=mlflow_server.url,
        run_id=run_id, tags={"pipeline_run_id": "pipeline-1"}, evaluation=evaluation(100.0),
    )


def test_register_stores_artifacts_in_s3_and_loads_by_alias_in_a_fresh_process(mlflow_server, registered, tiny_hub):
    import boto3

    assert registered["model_uri"] == "models:/served-lm@champion" and registered["version"] == "1"
    s3 = boto3.client("s3", endpoint_url=mlflow_server.s3_endpoint)
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=mlflow_server.artifacts_bucket)["Contents"]]
    for name in ("artifacts/model.pt", "artifacts/dict.txt", "artifacts/tokenizer/tokenizer.json", "MLmodel"):
        assert any(key.endswith(name) for key in keys), name

    code = (
        "import json, sys, mlflow\n"
        "m = mlflow.pyfunc.load_model('models:/served-lm@champion')\n"
        "print(json.dumps(m.predict(json.loads(sys.argv[1])).to_dict('records')))\n"
    )
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server.url}
    proc = subprocess.run([sys.executable, "-c", code, json.dumps([TEXT])], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = json.loads(proc.stdout.strip().splitlines()[-1])[0]
    expected = hub_expected_row(tiny_hub, TEXT)
    assert row["log_prob"] == pytest.approx(expected["log_prob"], abs=1e-4) and row["tokens"] == expected["tokens"]


def test_two_registrations_racing_end_with_distinct_versions_and_one_champion(mlflow_server, tiny_lm, tmp_path):
    """Two `lmforge register` processes at once; whichever gets version 1, the better model ends champion."""
    from mlflow import MlflowClient

    procs = []
    for k, perplexity in ((1, 100.0), (2, 90.0)):
        checkpoint = nudged_checkpoint(tiny_lm.checkpoint, tmp_path / f"ckpt{k}", k)
        (tmp_path / f"metrics{k}.json").write_text(json.dumps(evaluation(perplexity)))
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "lmforge.cli", "register", "--config", TINY_CONFIG,
             "--set", f"tracking.uri={mlflow_server.url}", "--set", "registry.model_name=race-lm",
             "--set", f"storage.root={tmp_path / 'runs'}", "--data-bin", tiny_lm.data_bin,
             "--checkpoint", checkpoint, "--metrics", tmp_path / f"metrics{k}.json"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        ))
    outputs = [proc.communicate(timeout=300) for proc in procs]
    for proc, (out, err) in zip(procs, outputs):
        assert proc.returncode == 0, err[-3000:]
    results = [json.loads(out[out.index("{"):]) for out, _ in outputs]
    assert sorted(r["version"] for r in results) == ["1", "2"]

    client = MlflowClient(mlflow_server.url)
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


def test_mlflow_models_serve_answers_invocations(mlflow_server, registered, tiny_hub, tmp_path):
    with model_server("models:/served-lm@champion", mlflow_server.url, tmp_path) as url:

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
