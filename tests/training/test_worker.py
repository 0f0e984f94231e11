"""The training worker: the distributed environment it accepts, the node's processes it starts in
an operator pod, its exit codes, and what it does when killed: real fairseq on CPU in real
processes (SIGKILL and SIGTERM are sent to them)."""

import argparse
import os
import signal
import subprocess
import sys
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
    combine_exit_codes,
    exit_code_for,
    add_arguments,
    local_process_env,
    placement_from_env,
    read_environment,
    run_from_args,
    run_local_processes,
)

MASTER = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}


def operator(nnodes, nproc, index):
    """What the Training Operator sets in pod `index` (see lmforge.training.launchers.local.operator_env)."""
    return {**MASTER, "WORLD_SIZE": str(nnodes * nproc), "RANK": str(index), "PET_NNODES": str(nnodes),
            "PET_NPROC_PER_NODE": str(nproc), "PET_NODE_RANK": str(index)}


def test_no_environment_is_a_single_process():
    placement = placement_from_env({}, cuda=False)
    assert (placement.world_size, placement.rank, placement.device_id) == (1, 0, 0)


def test_torchrun_environment():
    env = {"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", **MASTER}
    placement = placement_from_env(env, cuda=True)
    assert (placement.world_size, placement.rank, placement.device_id, placement.cuda) == (4, 3, 1, True)


def test_operator_pod_with_one_process_is_that_process():
    env = read_environment(operator(nnodes=3, nproc=1, index=2))
    assert (env.world_size, env.rank, env.local_rank, env.spawn_local) == (3, 2, 0, False)


def test_operator_pod_with_several_processes_starts_them_with_consistent_ranks():
    # WORLD_SIZE = replicas x nprocPerNode, RANK = the pod's index: not a process rank yet
    pod = operator(nnodes=2, nproc=4, index=1)
    env = read_environment(pod)
    assert env.spawn_local and env.world_size == 8 and env.node_rank == 1
    children = [read_environment(local_process_env(pod, env, i)) for i in range(4)]
    assert [(c.rank, c.local_rank, c.spawn_local) for c in children] == [(4 + i, i, False) for i in range(4)]
    assert children[3].placement(cuda=True).device_id == 3  # fairseq --device-id from LOCAL_RANK


@pytest.mark.parametrize(
    "env, message",
    [
        ({"WORLD_SIZE": "2", "RANK": "2", **MASTER}, "outside WORLD_SIZE"),
        ({"WORLD_SIZE": "two"}, "not an integer"),
        ({"WORLD_SIZE": "2", "RANK": "0"}, "MASTER_ADDR"),
        ({"WORLD_SIZE": "0"}, ">= 1"),
        ({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "1", **MASTER}, "LOCAL_RANK"),
        ({**operator(2, 2, 1), "WORLD_SIZE": "2"}, "PET_NNODES x PET_NPROC_PER_NODE"),
        ({**operator(2, 1, 1), "RANK": "0"}, "differs from PET_NODE_RANK"),
        ({**operator(2, 1, 0), "PET_NODE_RANK": "2", "RANK": "2"}, "outside PET_NNODES"),
        ({**operator(2, 2, 1), "RANK": "1", "LOCAL_RANK": "1"}, "do not match"),
        ({**MASTER, "WORLD_SIZE": "2", "PET_NNODES": "2"}, "set together"),
    ],
)
def test_inconsistent_environment_is_refused(env, message):
    with pytest.raises(LmforgeError, match=message):
        read_environment(env)


def test_more_processes_than_gpus_is_refused():
    with pytest.raises(LmforgeError, match="GPU"):
        read_environment(operator(nnodes=1, nproc=4, index=0), gpus=2)


def test_exit_codes_tell_the_restart_policy_what_to_retry():
    assert exit_code_for(LmforgeError("bad data")) == 1
    assert exit_code_for(config.ConfigError(["x"])) == 2
    assert exit_code_for(TransientError("S3 hiccup")) == EXIT_TRANSIENT
    assert exit_code_for(ConnectionResetError()) == EXIT_TRANSIENT
    assert exit_code_for(RuntimeError("[gloo/transport/tcp/pair.cc:534] Connection closed by peer")) == EXIT_TRANSIENT
    assert exit_code_for(RuntimeError("CUDA out of memory. Tried to allocate")) == 1
    assert exit_code_for(ValueError("a bug")) == 1
    # a permanent failure wins over its peers' transient ones; a signal counts as transient
    assert combine_exit_codes([0, 1, EXIT_TRANSIENT]) == 1
    assert combine_exit_codes([0, -9, EXIT_TRANSIENT]) == 137
    assert combine_exit_codes([0, 0]) == 0


CHILD = """
import os, signal, sys, time
rank = int(os.environ["RANK"])
with open(os.path.join(os.environ["OUT"], f"rank-{rank}"), "w") as f:
    f.write(f"local {os.environ['LOCAL_RANK']} world {os.environ['WORLD_SIZE']}")
mode = os.environ["MODE"]
if mode == "fail" and rank == 5:
    sys.exit(2)
if mode in ("fail", "term"):
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(143))
    time.sleep(60)
"""


def test_pod_processes_get_their_ranks_and_statuses_combine(tmp_path):
    """The node agent with trivial child processes (no training): ranks, and a failing child stopping its peers."""
    pod = operator(nnodes=2, nproc=3, index=1)
    env = read_environment(pod)
    envs = [{**local_process_env(os.environ, env, i), "MODE": "ok", "OUT": str(tmp_path)} for i in range(3)]
    assert run_local_processes([sys.executable, "-c", CHILD], envs) == 0
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == {
        "rank-3": "local 0 world 6", "rank-4": "local 1 world 6", "rank-5": "local 2 world 6",
    }
    started = time.monotonic()
    envs = [{**e, "MODE": "fail"} for e in envs]
    assert run_local_processes([sys.executable, "-c", CHILD], envs, grace_s=20) == 2, "the config error, not 143"
    assert time.monotonic() - started < 20, "the surviving processes were stopped, not waited for"


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
