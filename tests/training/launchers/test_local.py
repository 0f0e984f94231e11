"""The local launcher: its command lines, and the node agent (`run_local_processes`) that starts
a node's processes, passes signals on and combines their statuses, run with trivial child
processes. The operator environment it emulates is tested in tests/training/test_distributed.py;
training through it in tests/training/test_train.py."""

import os
import signal
import sys
import threading
import time

from lmforge.training.distributed import local_process_env, read_environment
from lmforge.training.launchers.local import combine_exit_codes, run_local_processes, torchrun_command, worker_command
from lmforge.training.worker import EXIT_TERMINATED, EXIT_TRANSIENT


def test_torchrun_command_runs_the_worker_module_with_nproc():
    command = torchrun_command(2, ["--config", "c.json"])
    assert command[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert command[command.index("--nproc-per-node") + 1] == "2"
    assert "--standalone" in command
    assert command[-4:] == ["-m", "lmforge.worker", "--config", "c.json"]


def test_worker_command_is_what_a_replica_runs():
    assert worker_command(["--data", "d"]) == [sys.executable, "-m", "lmforge.worker", "--data", "d"]


def test_statuses_combine_with_the_cause_first():
    # a permanent failure wins over its peers' transient ones; a signal counts as transient
    assert combine_exit_codes([0, 1, EXIT_TRANSIENT]) == 1
    assert combine_exit_codes([0, -9, EXIT_TRANSIENT]) == 137
    assert combine_exit_codes([0, EXIT_TRANSIENT]) == EXIT_TRANSIENT
    assert combine_exit_codes([0, 0]) == 0


CHILD = """
import os, signal, sys, time
rank = int(os.environ["RANK"])
mode = os.environ["MODE"]
if mode in ("fail", "term"):
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(143))
with open(os.path.join(os.environ["OUT"], f"rank-{rank}"), "w") as f:
    f.write(f"local {os.environ['LOCAL_RANK']} world {os.environ['WORLD_SIZE']}")
if mode == "fail" and rank == 5:
    sys.exit(2)
if mode in ("fail", "term"):
    time.sleep(60)
"""

POD = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500", "WORLD_SIZE": "6", "RANK": "1", "PET_NNODES": "2",
       "PET_NPROC_PER_NODE": "3", "PET_NODE_RANK": "1"}


def pod_process_envs(out, mode):
    """The environments pod 1 of 2 nodes x 3 processes gives its processes, as the worker builds them."""
    env = read_environment(POD)
    return [{**local_process_env({**os.environ, **POD}, env, i), "MODE": mode, "OUT": str(out)} for i in range(3)]


def test_pod_processes_get_their_ranks_and_statuses_combine(tmp_path):
    """Ranks, and a failing child stopping its peers."""
    assert run_local_processes([sys.executable, "-c", CHILD], pod_process_envs(tmp_path, "ok")) == 0
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == {
        "rank-3": "local 0 world 6", "rank-4": "local 1 world 6", "rank-5": "local 2 world 6",
    }
    started = time.monotonic()
    envs = pod_process_envs(tmp_path, "fail")
    assert run_local_processes([sys.executable, "-c", CHILD], envs, grace_s=20) == 2, "the config error, not 143"
    assert time.monotonic() - started < 20, "the surviving processes were stopped, not waited for"


def test_sigterm_reaches_every_process_and_the_node_exits_143(tmp_path):
    """The pod is stopped (preemption, a deleted job): each process gets SIGTERM (to save a checkpoint)."""

    def terminate_once_all_started():
        deadline = time.monotonic() + 60
        while len(list(tmp_path.iterdir())) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)  # run_local_processes forwards it, this process survives

    killer = threading.Thread(target=terminate_once_all_started)
    killer.start()
    started = time.monotonic()
    status = run_local_processes([sys.executable, "-c", CHILD], pod_process_envs(tmp_path, "term"), grace_s=20)
    killer.join()
    assert status == EXIT_TERMINATED
    assert time.monotonic() - started < 20, "the processes stopped on SIGTERM, not after their 60 s sleep"
