"""`lmforge run` end to end with storage.root on S3, as the cluster keeps its data: every step
reads its inputs from and writes its outputs to a real S3 endpoint (moto's server on 127.0.0.1);
nothing but KFP's own task files and MLflow's SQLite file touches the local disk."""

import json
import os
import subprocess
import sys
import uuid

import boto3
import pytest

from conftest import REPO, write_corpus
from lmforge.io import storage

pytestmark = pytest.mark.e2e


def test_the_whole_dag_runs_against_s3(tmp_path, moto_s3):
    bucket = f"lmforge-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=moto_s3).create_bucket(Bucket=bucket)
    corpus = write_corpus(tmp_path / "corpus", train_lines=300)
    root = f"s3://{bucket}/runs"
    db = tmp_path / "mlflow.db"
    env = {**os.environ, "LMFORGE_SCRATCH": str(tmp_path / "scratch")}
    result = subprocess.run(
        [sys.executable, "-m", "lmforge.cli", "run", "--config", str(REPO / "pipelines/configs/tiny.yaml"),
         "--corpus", str(corpus), "--set", f"storage.root={root}", "--set", f"storage.s3_endpoint={moto_s3}",
         "--set", f"tracking.uri=sqlite:///{db}", "--set", "train.max_epoch=1", "--set", "train.nproc=1"],
        cwd=tmp_path, capture_output=True, text=True, timeout=900, env=env,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in result.stdout.splitlines() if ":" in line)}
    run_dir = summary["outputs"]
    assert run_dir.startswith(f"{root}/tiny/")

    files = storage.list_files(root, endpoint_url=moto_s3)
    for pattern in ("data/corpus/", "data/data-bin/"):
        assert any(f.startswith(pattern) and f.endswith("manifest.json" if "corpus" in pattern else "dict.txt")
                   for f in files), pattern
    checkpoints = storage.list_files(storage.join(run_dir, "checkpoints"), endpoint_url=moto_s3)
    assert "checkpoint_best.pt" in checkpoints and "checkpoint_last.pt" in checkpoints
    metrics = json.loads(storage.read_text(storage.join(run_dir, "eval", "metrics.json"), endpoint_url=moto_s3))
    assert metrics["perplexity"] == pytest.approx(float(summary["test perplexity"]), rel=1e-3)
    assert not (tmp_path / "runs").exists(), "outputs must go to S3, not the working directory"

    # The registered model loads by alias in a fresh process and scores text.
    code = ("import mlflow; m = mlflow.pyfunc.load_model('models:/tiny-transformer-lm@champion');"
            "print(float(m.predict(['the game was released in 2009 .'])['log_prob'][0]))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env={**env, "MLFLOW_TRACKING_URI": f"sqlite:///{db}"})
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    assert float(loaded.stdout.strip().splitlines()[-1]) < 0
