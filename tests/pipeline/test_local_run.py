"""lmforge.pipeline.local_run: a pipeline run that fails or is stopped, through `lmforge run` as a user runs it.

Each run gets a fresh TMPDIR, the system temporary directory as `lmforge run` sees it: nothing may be
left in it (KFP's `tmp.*` folders with ephemeral_component.py, torchrun's, multiprocessing's). The
MLflow run is read back from the run's SQLite store. The tiny config, small corpora (conftest).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from conftest import lmforge_run_command, write_corpus
from lmforge import tracking

#: One process and a few updates, wherever training is reached.
QUICK = ("train.nproc=1", "train.max_update=4", "train.max_epoch=0")


def environment(system_tmp: Path) -> dict[str, str]:
    system_tmp.mkdir()
    return {**os.environ, "TMPDIR": str(system_tmp)}


def only_run(root: Path):
    """The one MLflow run in the run's store."""
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    return run


def processes_naming(text: str) -> list[str]:
    """Command lines of the live processes that mention `text` (the run's root: its steps, torchrun, workers)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in args and str(os.getpid()) != cmdline.parent.name:
            found.append(args)
    return found


def assert_nothing_left(root: Path, system_tmp: Path) -> None:
    assert sorted(p.name for p in system_tmp.iterdir()) == []
    assert not list((root / "kfp-local").glob("run-*")), "the run's scratch (reports, TMPDIR) is removed"


@pytest.mark.slow
def test_a_run_failing_in_training_ends_its_mlflow_run_failed_with_the_step_and_its_line(tmp_path, small_corpus):
    """The train step refuses a train split shorter than one sample: the MLflow run the step made is FAILED,
    tagged with the step and the line `lmforge run` prints (it was FINISHED, untagged, in issue 16)."""
    root, system_tmp = tmp_path / "runs", tmp_path / "system-tmp"
    command = lmforge_run_command(small_corpus, root, *QUICK, "train.tokens_per_sample=60000")
    proc = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env=environment(system_tmp))
    assert proc.returncode == 1, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    prefix = "lmforge: error: train step: "
    assert last.startswith(prefix) and "fewer than preprocess.checks.min_train_samples=1 sample(s) of " \
        "train.tokens_per_sample=60,000" in last, last
    run = only_run(root)
    assert run.info.status == "FAILED"
    assert run.data.tags[tracking.FAILED_STEP_TAG] == "train"
    assert run.data.tags[tracking.ERROR_TAG] == last.removeprefix(prefix)
    assert_nothing_left(root, system_tmp)


@pytest.mark.slow
def test_a_run_failing_before_its_mlflow_run_exists_is_recorded_as_a_failed_run(tmp_path, small_corpus):
    """The download step refuses a corpus without a test split, before any step has made the MLflow run:
    `lmforge run` records the attempt as a FAILED run of its own, with the step and the line."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for split in ("train", "valid"):
        (corpus / f"{split}.txt").write_bytes((small_corpus / f"{split}.txt").read_bytes())
    root, system_tmp = tmp_path / "runs", tmp_path / "system-tmp"
    proc = subprocess.run(lmforge_run_command(corpus, root, *QUICK), cwd=tmp_path, capture_output=True, text=True,
                          timeout=600, env=environment(system_tmp))
    assert proc.returncode == 1, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"lmforge: error: download step: {corpus}: no test split"), last
    run = only_run(root)
    assert (run.info.status, run.info.run_name) == ("FAILED", "tiny-failed")
    assert run.data.tags[tracking.FAILED_STEP_TAG] == "download"
    assert run.data.tags[tracking.ERROR_TAG] == last.removeprefix("lmforge: error: download step: ")
    assert_nothing_left(root, system_tmp)


@pytest.mark.slow
def test_sigterm_during_training_ends_the_run_killed_and_leaves_no_process(tmp_path):
    """SIGTERM to `lmforge run` while torchrun's 2 workers train: passed on to the train step, which stops
    its workers (they save a checkpoint) and ends the MLflow run KILLED; `lmforge run` exits 143 once the
    step has ended, and no process of the run is left."""
    corpus = write_corpus(tmp_path / "corpus", train_lines=300)
    root, system_tmp = tmp_path / "runs", tmp_path / "system-tmp"
    command = lmforge_run_command(corpus, root, "train.nproc=2", "train.max_epoch=200")
    proc = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=environment(system_tmp))
    try:
        deadline = time.monotonic() + 300
        while sum("-m lmforge.worker" in p and "torch.distributed.run" not in p
                  for p in processes_naming(str(root))) < 2:
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "torchrun never started 2 workers"
            time.sleep(0.5)
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=180)
        print(f"stopped {time.monotonic() - started:.1f} s after SIGTERM")
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert stderr.strip().splitlines()[-1] == "lmforge: interrupted: stopped by SIGTERM"
    run = only_run(root)
    assert run.info.status == "KILLED"
    assert run.data.tags[tracking.FAILED_STEP_TAG] == "train"
    assert run.data.tags[tracking.ERROR_TAG] == "stopped by SIGTERM"
    assert processes_naming(str(root)) == []
    assert_nothing_left(root, system_tmp)


def test_a_step_that_failed_without_a_report_is_named_from_kfps_message(tmp_path, empty_mlflow_db):
    """KFP glue: a step killed (SIGKILL, the OOM killer) or failing in KFP's code writes no report and
    cannot end its MLflow run. `lmforge run` names the task KFP says failed and ends the run FAILED."""
    import shutil

    from kfp.local.pipeline_orchestrator import log_and_maybe_raise_for_failure

    from conftest import TINY_CONFIG
    from lmforge import config
    from lmforge.errors import LmforgeError
    from lmforge.pipeline import local_run

    shutil.copyfile(empty_mlflow_db, tmp_path / "mlflow.db")
    cfg = config.load(TINY_CONFIG, [f"storage.root={tmp_path}"])
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = tracking.pipeline_run(uri, cfg.tracking.experiment, "kfp-1", storage_root=tmp_path)
    scratch = local_run.RunScratch(tmp_path / "scratch", tmp_path / "tmp")
    scratch.root.mkdir()
    scratch.run_file.write_text(run_id + "\n")
    with pytest.raises(RuntimeError) as kfp_said:  # KFP's own words, terminal colours included
        log_and_maybe_raise_for_failure(pipeline_name="lmforge", raise_on_error=True, fail_stack=["train"])
    raised = local_run._ended_early(cfg, kfp_said.value, None, scratch)
    assert isinstance(raised, LmforgeError)
    assert str(raised) == ("the train task failed without a word from lmforge (it was killed, or KFP's code around "
                           "the step failed); its log above says why")
    run = MlflowClient(uri).get_run(run_id)
    assert run.info.status == "FAILED" and run.data.tags[tracking.FAILED_STEP_TAG] == "train"
    assert run.data.tags[tracking.ERROR_TAG] == str(raised)
