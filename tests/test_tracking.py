"""lmforge.tracking: the pipeline's one MLflow run, fairseq's metrics, and the state a step leaves
the run in (RUNNING after a step, FINISHED after the last, FAILED or KILLED and tagged with the step
and the error line after a failing or stopped one), and what `lmforge run` records where no step could."""

import json
import logging
import os
import shutil
import signal
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient
from mlflow.tracking._tracking_service import utils

from lmforge import tracking
from lmforge.errors import LmforgeError
from lmforge.interrupts import Interrupted
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
    with tracking.step_run(uri, run_id, "train"):
        tracking.log_corpus_inputs(str(tmp_path), manifest, "tiny")
    inputs = MlflowClient(uri).get_run(run_id).inputs.dataset_inputs
    assert {(d.dataset.name, d.dataset.digest, d.tags[0].value) for d in inputs} == {
        ("tiny-train", "0" * 36, "train"), ("tiny-valid", "1" * 36, "valid"), ("tiny-test", "2" * 36, "test"),
    }


# --------------------------------------------------------------------------- the state a step leaves


@pytest.fixture
def store(tmp_path, empty_mlflow_db, monkeypatch):
    """A SQLite store holding one pipeline run; the caller's own fluent setting points elsewhere."""
    shutil.copyfile(empty_mlflow_db, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = tracking.pipeline_run(uri, "exp", "kfp-run-1", storage_root=tmp_path)
    caller = f"sqlite:///{tmp_path / 'callers.db'}"
    monkeypatch.setattr(utils, "_tracking_uri", caller)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", caller)
    return uri, run_id, MlflowClient(uri), caller


def assert_caller_state_kept(caller):
    assert mlflow.active_run() is None
    assert utils._tracking_uri == caller and os.environ["MLFLOW_TRACKING_URI"] == caller


def status(client, run_id):
    run = client.get_run(run_id)
    return run.info.status, run.data.tags.get(tracking.FAILED_STEP_TAG)


def error(client, run_id):
    return client.get_run(run_id).data.tags.get(tracking.ERROR_TAG)


def test_a_step_logs_into_the_run_and_leaves_it_running(store):
    uri, run_id, client, caller = store
    for step in ("train", "evaluate"):
        with tracking.step_run(uri, run_id, step) as run:
            assert run.info.run_id == run_id and mlflow.get_tracking_uri() == uri
            mlflow.log_metric(f"{step}_metric", 1.0)
        assert status(client, run_id) == ("RUNNING", None)
        assert_caller_state_kept(caller)
    assert set(client.get_run(run_id).data.metrics) == {"train_metric", "evaluate_metric"}


def test_the_last_step_ends_the_run_finished(store):
    uri, run_id, client, caller = store
    with tracking.step_run(uri, run_id, "train"):
        pass
    with tracking.step_run(uri, run_id, "register", last=True):
        pass
    assert status(client, run_id) == ("FINISHED", None)
    assert_caller_state_kept(caller)


def test_a_failing_step_marks_the_run_failed_and_names_the_step(store):
    uri, run_id, client, caller = store
    with pytest.raises(RuntimeError, match="boom"):
        with tracking.step_run(uri, run_id, "evaluate"):
            raise RuntimeError("boom\nsecond line")
    assert status(client, run_id) == ("FAILED", "evaluate")
    assert error(client, run_id) == "RuntimeError: boom"  # a bug: its type and first line (the log has the rest)
    assert_caller_state_kept(caller)
    # A retry of the step that succeeds: the run is running again and no longer names a failed step.
    with tracking.step_run(uri, run_id, "evaluate"):
        pass
    assert status(client, run_id) == ("RUNNING", None) and error(client, run_id) is None


def test_a_user_error_is_the_runs_error_line(store):
    uri, run_id, client, caller = store
    with pytest.raises(LmforgeError):
        with tracking.step_run(uri, run_id, "train"):
            raise LmforgeError("train.txt: 120 tokens, fewer than 1 sample of train.tokens_per_sample=128")
    assert status(client, run_id) == ("FAILED", "train")
    assert error(client, run_id) == "train.txt: 120 tokens, fewer than 1 sample of train.tokens_per_sample=128"


@pytest.mark.parametrize("stop,line", [(Interrupted(signal.SIGTERM), "stopped by SIGTERM"),
                                       (KeyboardInterrupt(), "stopped by SIGINT")], ids=["SIGTERM", "Ctrl-C"])
def test_a_stopped_step_ends_the_run_killed(store, stop, line):
    uri, run_id, client, caller = store
    with pytest.raises(type(stop)):
        with tracking.step_run(uri, run_id, "train"):
            raise stop
    assert status(client, run_id) == ("KILLED", "train") and error(client, run_id) == line
    assert_caller_state_kept(caller)


def test_what_no_step_could_record_is_recorded_once_for_a_running_run_only(store):
    """end_unfinished_run: `lmforge run` ends a run its (killed) step left RUNNING; a run a step has
    ended keeps the step's status and tags."""
    uri, run_id, client, caller = store
    assert tracking.end_unfinished_run(uri, run_id, status="FAILED", step="train", error="the step was killed")
    assert status(client, run_id) == ("FAILED", "train") and error(client, run_id) == "the step was killed"
    assert not tracking.end_unfinished_run(uri, run_id, status="KILLED", step="lmforge run", error="stopped")
    assert status(client, run_id) == ("FAILED", "train") and error(client, run_id) == "the step was killed"


def test_a_pipeline_that_failed_before_its_mlflow_run_gets_one_ended_with_the_failure(store, tmp_path):
    uri, _, client, _ = store
    run_id = tracking.record_failed_pipeline(uri, "exp", run_name="tiny-failed", storage_root=tmp_path,
                                             status="FAILED", step="dictionary", error="x" * 600)
    run = client.get_run(run_id)
    assert (run.info.status, run.info.run_name) == ("FAILED", "tiny-failed") and run.info.end_time
    assert client.get_experiment(run.info.experiment_id).name == "exp"
    assert run.data.tags[tracking.FAILED_STEP_TAG] == "dictionary"
    assert run.data.tags[tracking.ERROR_TAG] == "x" * tracking.ERROR_CHARS  # cut where MLflow stores it


def test_a_failing_last_step_is_failed_not_finished(store):
    uri, run_id, client, caller = store
    with pytest.raises(ValueError):
        with tracking.step_run(uri, run_id, "register", last=True):
            raise ValueError("no")
    assert status(client, run_id) == ("FAILED", "register")
    assert_caller_state_kept(caller)


def test_an_already_active_run_is_used_as_is(store):
    """Inside the register step, register_model's own step_run finds the run active: it neither ends
    it nor changes its status; the outer (last) step ends it."""
    uri, run_id, client, caller = store
    with tracking.step_run(uri, run_id, "register", last=True) as outer:
        with tracking.step_run(uri, run_id, "register") as inner:
            assert inner.info.run_id == outer.info.run_id
        assert mlflow.active_run().info.run_id == run_id
        assert status(client, run_id) == ("RUNNING", None)
    assert status(client, run_id) == ("FINISHED", None)
    assert_caller_state_kept(caller)


def test_another_active_run_stays_active_underneath(store):
    uri, run_id, client, caller = store
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run() as users:
        with tracking.step_run(uri, run_id, "evaluate") as run:
            assert mlflow.active_run().info.run_id == run.info.run_id == run_id != users.info.run_id
        assert mlflow.active_run().info.run_id == users.info.run_id
        assert status(client, run_id) == ("RUNNING", None)
    assert client.get_run(users.info.run_id).info.status == "FINISHED"


def test_failing_pipeline_steps_leave_the_run_failed(tmp_path, empty_mlflow_db, monkeypatch):
    """The real evaluate and register steps on a missing checkpoint: a one-line exit, the run FAILED
    and tagged with the step, the process's tracking URI as before."""
    from conftest import TINY_CONFIG

    from lmforge import config, steps

    monkeypatch.setattr(utils, "_tracking_uri", None)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    shutil.copyfile(empty_mlflow_db, tmp_path / "mlflow.db")
    cfg = config.load(TINY_CONFIG, [f"storage.root={tmp_path}"])
    (tmp_path / "data-bin").mkdir()
    (tmp_path / "data-bin" / "dict.txt").write_text("the 3\n")
    client = MlflowClient(steps.tracking_uri(cfg))
    with pytest.raises(SystemExit):
        steps.evaluate(cfg.to_json(), "run-1", str(tmp_path / "data-bin"), str(tmp_path / "nope.pt"))
    run_id = steps._mlflow_run(cfg, "run-1")
    assert status(client, run_id) == ("FAILED", "evaluate")
    assert "nope.pt" in error(client, run_id)
    with pytest.raises(SystemExit):
        steps.register(cfg.to_json(), "run-1", str(tmp_path / "data-bin"), str(tmp_path / "nope.pt"), "a" * 64,
                       "b" * 64, json.dumps({"perplexity": 1.0, "identity": {}, "split": "test"}))
    assert status(client, run_id) == ("FAILED", "register")
    assert mlflow.active_run() is None and utils._tracking_uri is None and "MLFLOW_TRACKING_URI" not in os.environ


def test_sqlite_file_reads_the_uri_as_sqlalchemy_does(tmp_path):
    assert tracking.sqlite_file(f"sqlite:///{tmp_path}/m.db") == tmp_path / "m.db"
    assert tracking.sqlite_file("sqlite:///runs/m.db?timeout=5") == Path("runs/m.db")  # relative to the cwd
    assert tracking.sqlite_file("sqlite:///:memory:") is None and tracking.sqlite_file("sqlite://") is None
    assert tracking.sqlite_file("http://127.0.0.1:5000") is None


def test_a_registry_client_for_reading_needs_the_database(tmp_path, empty_mlflow_db):
    from lmforge.errors import LmforgeError

    with pytest.raises(LmforgeError, match=f"no MLflow database at {tmp_path / 'typo.db'}"):
        tracking.existing_registry_client(f"sqlite:///{tmp_path / 'typo.db'}")
    assert not (tmp_path / "typo.db").exists()
    shutil.copy(empty_mlflow_db, tmp_path / "mlflow.db")
    assert tracking.existing_registry_client(f"sqlite:///{tmp_path / 'mlflow.db'}").search_registered_models() == []
