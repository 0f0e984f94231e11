"""Tests for lmforge.steps: the pipeline's step functions called directly, as a pod would run them."""

from __future__ import annotations

import json
import uuid

import boto3

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
