"""The training worker: its exit codes, its arguments, and what it does when killed: real fairseq
on CPU in real processes (SIGKILL and SIGTERM are sent to them). The distributed variables it
reads are tested in test_distributed.py, the node agent it uses in an operator pod in
launchers/test_local.py."""

import argparse
import signal
import subprocess
import time

import pytest

from conftest import FAST_TRAINING, TINY_CONFIG, train_inner_losses, worker_command
from lmforge.training import checkpoints
from lmforge import config
from lmforge.errors import LmforgeError
from lmforge.training.worker import (
    EXIT_TERMINATED,
    EXIT_TRANSIENT,
    TransientError,
    add_arguments,
    exit_code_for,
    run_from_args,
    worker_args,
)


def test_exit_codes_tell_the_restart_policy_what_to_retry():
    assert exit_code_for(LmforgeError("bad data")) == 1
    assert exit_code_for(config.ConfigError(["x"])) == 2
    assert exit_code_for(TransientError("S3 hiccup")) == EXIT_TRANSIENT
    assert exit_code_for(ConnectionResetError()) == EXIT_TRANSIENT
    assert exit_code_for(RuntimeError("[gloo/transport/tcp/pair.cc:534] Connection closed by peer")) == EXIT_TRANSIENT
    assert exit_code_for(RuntimeError("CUDA out of memory. Tried to allocate")) == 1
    assert exit_code_for(ValueError("a bug")) == 1


def test_worker_args_round_trip_through_its_parser():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = worker_args("c.json", "data", "s3://b/ckpt", mlflow_run_id="r1", cache_dir="/cache")
    assert args == ["--config", "c.json", "--data", "data", "--save-dir", "s3://b/ckpt", "--mlflow-run-id", "r1",
                    "--cache-dir", "/cache"]
    parsed = parser.parse_args(args)
    assert (parsed.config, parsed.data, parsed.save_dir, parsed.tracking_uri, parsed.mlflow_run_id, parsed.cache_dir) \
        == ("c.json", "data", "s3://b/ckpt", "", "r1", "/cache")


def test_config_error_exits_1_in_one_line(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--config", str(tmp_path / "absent.json"), "--data", str(tmp_path),
                              "--save-dir", str(tmp_path / "c")])
    status = run_from_args(args)
    assert status == 1
    err = capsys.readouterr().err
    assert "absent.json does not exist" in err and "Traceback" not in err


def _start(cmd):
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _read_until(proc, predicate, timeout=240):
    """Lines of proc's stderr up to and including the first that satisfies `predicate`."""
    lines, deadline = [], time.monotonic() + timeout
    for line in proc.stderr:
        lines.append(line)
        if predicate(line):
            return "".join(lines)
        assert time.monotonic() < deadline, "timed out waiting for the worker"
    pytest.fail("the worker ended first:\n" + "".join(lines[-30:]))


def test_kill_and_resume_continues_exactly_like_an_uninterrupted_run(interval_run, fast_data_bin, tmp_path):
    """SIGKILL right after the first checkpoint upload; the restarted worker resumes from it, and
    every loss it logs equals the uninterrupted run's loss at the same update."""
    save_dir = tmp_path / "checkpoints"
    command = worker_command(interval_run["config_file"], fast_data_bin, save_dir, "--cache-dir", str(tmp_path / "cache"))
    proc = _start(command)
    _read_until(proc, lambda line: "checkpoint of update" in line and "saved at" in line)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    uploaded = checkpoints.read_manifest(str(save_dir))["checkpoints"]["checkpoint_last.pt"]["num_updates"]
    assert 4 <= uploaded < 12

    resumed = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {save_dir / 'checkpoint_last.pt'} ({uploaded} updates)" in resumed.stderr
    losses = train_inner_losses(resumed.stderr)
    assert sorted(losses) == list(range(uploaded + 1, 13)), "training went on from the uploaded checkpoint"
    expected = {u: loss for u, loss in interval_run["losses"].items() if u > uploaded}
    assert losses == expected
    assert checkpoints.summary(str(save_dir))["num_updates"] == 12
    print(f"kill-and-resume: killed after the upload at {uploaded} updates; losses of updates "
          f"{uploaded + 1}..12 after the resume equal the uninterrupted run's: {losses}")


def test_sigterm_saves_uploads_and_exits_143(fast_data_bin, tmp_path):
    cfg = config.load(TINY_CONFIG, [*FAST_TRAINING, "train.max_update=200", f"train.cache_dir={tmp_path / 'cache'}"])
    config_file = tmp_path / "run.json"
    config_file.write_text(cfg.to_json())
    proc = _start(worker_command(config_file, fast_data_bin, tmp_path / "checkpoints"))
    log = _read_until(proc, lambda line: '"num_updates": "2"' in line)
    proc.send_signal(signal.SIGTERM)
    log += proc.stderr.read()
    assert proc.wait(timeout=120) == EXIT_TERMINATED, log[-3000:]
    saved = checkpoints.read_manifest(str(tmp_path / "checkpoints"))["checkpoints"]["checkpoint_last.pt"]
    assert 2 <= saved["num_updates"] < 200, "saved where it stopped, no save interval configured"
    assert checkpoints.loadable_state(tmp_path / "checkpoints" / "checkpoint_last.pt") == {
        "num_updates": saved["num_updates"]}
    assert "stop requested: saving a checkpoint" in log
