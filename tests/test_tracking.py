import json
import logging

from mlflow import MlflowClient

from lmforge import tracking
from lmforge.tracking import FairseqMetricsHandler


def test_train_inner_line_maps_to_metrics_at_update_step():
    line = json.dumps({"epoch": 1, "update": 0.5, "loss": "9.1", "ppl": "549.2", "wps": "4000", "lr": "0.0005",
                       "num_updates": "10", "gnorm": "1.2"})
    step, values = FairseqMetricsHandler.metrics("train_inner", line)
    assert step == 10
    assert values == {"train_loss": 9.1, "train_ppl": 549.2, "train_wps": 4000.0, "lr": 0.0005}


def test_valid_line_uses_valid_num_updates():
    line = json.dumps({"epoch": 2, "valid_loss": "7.8", "valid_ppl": "222.9", "valid_num_updates": "38"})
    assert FairseqMetricsHandler.metrics("valid", line) == (38, {"valid_loss": 7.8, "valid_ppl": 222.9})


def test_other_lines_are_ignored():
    assert FairseqMetricsHandler.metrics("fairseq.trainer", '{"loss": 1}') is None
    assert FairseqMetricsHandler.metrics("train_inner", "not json") is None


def test_pipeline_run_is_found_again_and_handler_logs(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = tracking.pipeline_run(uri, "exp", "kfp-run-1", storage_root=tmp_path)
    again = tracking.pipeline_run(uri, "exp", "kfp-run-1", storage_root=tmp_path)
    other = tracking.pipeline_run(uri, "exp", "kfp-run-2", storage_root=tmp_path)
    assert first == again != other
    client = MlflowClient(uri)
    assert client.get_experiment_by_name("exp").artifact_location.startswith((tmp_path / "mlartifacts").as_uri())

    # fairseq renames its progress logger to the tag while it logs a line
    logger = logging.getLogger("test.progress")
    handler = FairseqMetricsHandler(client, first)
    logger.addHandler(handler)
    try:
        logger.name = "valid"
        logger.warning(json.dumps({"valid_loss": "7.5", "valid_ppl": "181", "valid_num_updates": "20"}))
    finally:
        logger.name = "test.progress"
        logger.removeHandler(handler)
    history = client.get_metric_history(first, "valid_loss")
    assert [(m.step, m.value) for m in history] == [(20, 7.5)]


def test_corpus_splits_become_dataset_inputs(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = tracking.pipeline_run(uri, "exp", "kfp-run-1", storage_root=tmp_path)
    manifest = {"splits": {s: {"sha256": f"{i}" * 64} for i, s in enumerate(("train", "valid", "test"))}}
    with tracking.active_run(uri, run_id):
        tracking.log_corpus_inputs(str(tmp_path), manifest, "tiny")
    inputs = MlflowClient(uri).get_run(run_id).inputs.dataset_inputs
    assert {(d.dataset.name, d.dataset.digest, d.tags[0].value) for d in inputs} == {
        ("tiny-train", "0" * 36, "train"), ("tiny-valid", "1" * 36, "valid"), ("tiny-test", "2" * 36, "test"),
    }
