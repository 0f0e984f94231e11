"""The local launcher's command lines and the operator environment it emulates (the training
itself runs in tests/test_train.py)."""

import sys

from lmforge.training.launchers.local import _clean_environ, operator_env, torchrun_command, worker_command
from lmforge.training.worker import read_environment


def test_torchrun_command_runs_the_worker_module_with_nproc():
    command = torchrun_command(2, ["--config", "c.json"])
    assert command[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert command[command.index("--nproc-per-node") + 1] == "2"
    assert "--standalone" in command
    assert command[-4:] == ["-m", "lmforge.worker", "--config", "c.json"]


def test_emulated_replicas_get_exactly_the_operators_variables():
    # kubeflow/training-operator pkg/controller.v1/pytorch/envvar.go: Master is pod 0, WORLD_SIZE
    # counts processes, RANK and PET_NODE_RANK are the pod's index.
    env = operator_env(nnodes=3, nproc=2, node_rank=2, master_port=29511)
    assert env == {
        "PYTHONUNBUFFERED": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29511", "WORLD_SIZE": "6", "RANK": "2",
        "PET_NPROC_PER_NODE": "2", "PET_NODE_RANK": "2", "PET_NNODES": "3",
    }
    placed = read_environment(env)
    assert placed.spawn_local and placed.rank == 4 and placed.nnodes == 3
    assert worker_command(["--data", "d"]) == [sys.executable, "-m", "lmforge.worker", "--data", "d"]


def test_a_parent_launchers_variables_do_not_leak_into_the_workers():
    parent = {"PATH": "/bin", "RANK": "1", "WORLD_SIZE": "2", "PET_NNODES": "2", "TORCHELASTIC_RUN_ID": "x"}
    assert _clean_environ(parent) == {"PATH": "/bin"}
