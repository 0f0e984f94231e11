"""Tests for lmforge.steps: the pipeline's step functions called directly, as a pod would run them."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import uuid

import boto3
import pytest

from lmforge import config, steps
from lmforge.io import storage


def test_download_step_publishes_a_content_addressed_corpus_to_s3(moto_s3, small_corpus, tmp_path, monkeypatch):
    """With storage.root on S3 (the cluster), the corpus is uploaded under a key named by its
    settings, manifest.json last; a second run with the same settings finds it and uploads nothing."""
    monkeypatch.setenv("LMFORGE_SCRATCH", str(tmp_path / "scratch"))
    bucket = f"b-{uuid.uuid4().hex[:12]}"
    s3 = boto3.client("s3", endpoint_url=moto_s3)
    s3.create_bucket(Bucket=bucket)
    cfg = config.from_dict({
        "corpus": {"source": str(small_corpus)},
        "storage": {"root": f"s3://{bucket}/lmforge", "s3_endpoint": moto_s3},
    })
    download_json = config.stage_json(cfg, "download")

    corpus_dir, sha = steps.download(download_json)
    assert corpus_dir == f"s3://{bucket}/lmforge/data/corpus/{config.content_key(download_json)}"
    assert storage.list_files(corpus_dir) == ["manifest.json", "test.txt", "train.txt", "valid.txt"]
    manifest = json.loads(storage.read_text(storage.join(corpus_dir, "manifest.json")))
    assert manifest["sha256"] == sha
    assert storage.read_text(storage.join(corpus_dir, "train.txt")) == (small_corpus / "train.txt").read_text()

    s3.delete_object(Bucket=bucket, Key=f"lmforge/data/corpus/{config.content_key(download_json)}/train.txt")
    assert steps.download(download_json) == (corpus_dir, sha)  # found by its manifest, not fetched again
    assert not storage.exists(storage.join(corpus_dir, "train.txt"))


def test_configure_cuts_the_stage_slices(small_corpus):
    cfg = config.from_dict({"corpus": {"source": str(small_corpus)}, "train": {"max_epoch": 3}})
    out = steps.configure(cfg.to_json())
    assert config.from_json(out.config_json) == cfg
    assert json.loads(out.download_json) == {"corpus": cfg.to_dict()["corpus"], "storage": cfg.to_dict()["storage"]}
    assert set(json.loads(out.preprocess_json)) == {"preprocess", "storage"}


#: A step of lmforge's kind, in a process of its own: it logs into the MLflow run, then works until stopped.
WORKING_STEP = """
import sys, time
from lmforge import steps, tracking

@steps.step("demo")
def demo(uri, run_id):
    with tracking.step_run(uri, run_id, "demo"):
        print("working", flush=True)
        time.sleep(120)

demo(sys.argv[1], sys.argv[2])
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stopped_step_ends_its_mlflow_run_killed_and_exits_128_plus_the_signal(tmp_path, empty_mlflow_db, signum):
    """A stop signal to a step (a pod's SIGTERM, Ctrl-C) unwinds it: its MLflow run KILLED with the step and
    "stopped by SIG...", the line reported for `lmforge run`, exit 128 + the signal and no traceback."""
    from mlflow import MlflowClient

    from lmforge import tracking

    shutil.copyfile(empty_mlflow_db, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = tracking.pipeline_run(uri, "lmforge", "kfp-1", storage_root=tmp_path)
    env = {**os.environ, steps.ERROR_FILE_ENV: str(tmp_path / "error")}
    proc = subprocess.Popen([sys.executable, "-c", WORKING_STEP, uri, run_id], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout.readline() == "working\n", proc.communicate()[1][-3000:]
        proc.send_signal(signum)
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    name = signal.Signals(signum).name
    assert proc.returncode == 128 + signum and "Traceback" not in stderr, stderr[-3000:]
    run = MlflowClient(uri).get_run(run_id)
    assert run.info.status == "KILLED"
    assert run.data.tags[tracking.FAILED_STEP_TAG] == "demo" and run.data.tags[tracking.ERROR_TAG] == f"stopped by {name}"
    assert (tmp_path / "error").read_text() == f"demo step: stopped by {name}\n"


def test_a_failure_report_names_the_step_and_reads_back():
    message = steps.failure_message("preprocess plan", "train.txt is empty (0 lines)")
    assert message == "preprocess plan step: train.txt is empty (0 lines)"
    assert steps.parse_failure_message(message) == ("preprocess plan", "train.txt is empty (0 lines)")
    assert steps.parse_failure_message("Pipeline failed") == (None, "Pipeline failed")
