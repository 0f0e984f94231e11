"""The distributed-environment contract (lmforge.training.distributed), function by function:
torchrun's variables, the Training Operator's for each pod, the processes a pod's worker starts,
what a local emulation gives each replica, and what is refused."""

import pytest

from lmforge.errors import LmforgeError
from lmforge.fairseq_api.arguments import train_args
from lmforge.training.distributed import (
    Environment,
    Placement,
    backend,
    local_process_env,
    operator_env,
    read_environment,
    without_launcher_variables,
)

from conftest import TINY_CONFIG

MASTER = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}


def operator(nnodes, nproc, index):
    """What the Training Operator sets in pod `index`, written out by hand (not by operator_env)."""
    return {**MASTER, "WORLD_SIZE": str(nnodes * nproc), "RANK": str(index), "PET_NNODES": str(nnodes),
            "PET_NPROC_PER_NODE": str(nproc), "PET_NODE_RANK": str(index)}


def test_no_environment_is_a_single_process():
    env = read_environment({})
    assert env == Environment(world_size=1, rank=0, local_rank=0, nproc_per_node=1, node_rank=0, nnodes=1)
    placement = env.placement(cuda=False)
    assert (placement.world_size, placement.rank, placement.device_id) == (1, 0, 0)


def test_torchrun_variables():
    env = read_environment({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                            "GROUP_RANK": "1", **MASTER})
    assert env == Environment(world_size=4, rank=3, local_rank=1, nproc_per_node=2, node_rank=1, nnodes=2)
    placement = env.placement(cuda=True)
    assert (placement.world_size, placement.rank, placement.device_id, placement.cuda) == (4, 3, 1, True)


def test_local_rank_becomes_fairseqs_device_id():
    """fairseq ignores LOCAL_RANK: without --device-id every process of a node would use GPU 0."""
    from lmforge import config

    placement = read_environment({"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                                  **MASTER}).placement(cuda=True)
    assert placement.device_id == 1
    args = train_args(config.load(TINY_CONFIG), "/d", "/c", placement)
    assert args[args.index("--device-id") + 1] == "1"
    assert args[args.index("--distributed-rank") + 1] == "1"


def test_backend_is_nccl_on_gpus_and_gloo_on_cpus():
    assert backend(cuda=True) == "nccl" and backend(cuda=False) == "gloo"
    assert Placement(cuda=True).backend == "nccl" and Placement(cuda=False).backend == "gloo"


def test_operator_variables_of_pod_0_and_pod_1_of_2_nodes_x_2_processes():
    # WORLD_SIZE = replicas x nprocPerNode, RANK = the pod's index: not a process rank yet
    master, worker = read_environment(operator(2, 2, 0)), read_environment(operator(2, 2, 1))
    assert master == Environment(world_size=4, rank=0, local_rank=0, nproc_per_node=2, node_rank=0, nnodes=2,
                                 spawn_local=True)
    assert worker == Environment(world_size=4, rank=2, local_rank=0, nproc_per_node=2, node_rank=1, nnodes=2,
                                 spawn_local=True)
    # the processes each pod's worker starts: global ranks 0, 1 on pod 0 and 2, 3 on pod 1
    ranks = {}
    for pod, env in ((0, master), (1, worker)):
        for i in range(2):
            child = read_environment(local_process_env(operator(2, 2, pod), env, i))
            assert not child.spawn_local and child.node_rank == pod
            ranks[(pod, i)] = (child.rank, child.local_rank, child.placement(cuda=True).device_id)
    assert ranks == {(0, 0): (0, 0, 0), (0, 1): (1, 1, 1), (1, 0): (2, 0, 0), (1, 1): (3, 1, 1)}


def test_operator_pod_with_one_process_is_that_process():
    env = read_environment(operator(nnodes=3, nproc=1, index=2))
    assert (env.world_size, env.rank, env.local_rank, env.spawn_local) == (3, 2, 0, False)


def test_local_process_env_is_torchrun_consistent_with_the_operator():
    pod = {**operator(nnodes=2, nproc=4, index=1), "PATH": "/bin"}
    env = read_environment(pod)
    assert env.spawn_local and env.world_size == 8 and env.node_rank == 1
    child = local_process_env(pod, env, 3)
    assert child == {**pod, "RANK": "7", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "4", "GROUP_RANK": "1",
                     "WORLD_SIZE": "8", "PET_NODE_RANK": "1"}
    children = [read_environment(local_process_env(pod, env, i)) for i in range(4)]
    assert [(c.rank, c.local_rank, c.spawn_local) for c in children] == [(4 + i, i, False) for i in range(4)]


@pytest.mark.parametrize(
    "env, message",
    [
        ({"WORLD_SIZE": "2", "RANK": "2", **MASTER}, "RANK=2 is outside WORLD_SIZE=2"),
        ({"WORLD_SIZE": "two"}, "WORLD_SIZE='two' is not an integer"),
        ({"WORLD_SIZE": "2", "RANK": "0"}, "needs MASTER_ADDR and MASTER_PORT"),
        ({"WORLD_SIZE": "0"}, "WORLD_SIZE=0 must be >= 1"),
        ({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "1", **MASTER}, "LOCAL_RANK=1 is inconsistent with RANK=0"),
        ({**operator(2, 2, 1), "WORLD_SIZE": "2"}, r"WORLD_SIZE=2 is not PET_NNODES x PET_NPROC_PER_NODE = 2 x 2"),
        ({**operator(2, 1, 1), "RANK": "0"}, "RANK=0 differs from PET_NODE_RANK=1"),
        ({**operator(2, 1, 0), "PET_NODE_RANK": "2", "RANK": "2"}, "PET_NODE_RANK=2 is outside PET_NNODES=2"),
        ({**operator(2, 2, 1), "RANK": "1", "LOCAL_RANK": "1"}, "RANK=1, LOCAL_RANK=1 do not match"),
        ({**MASTER, "WORLD_SIZE": "2", "PET_NNODES": "2"}, "must be set together"),
        ({**operator(2, 2, 1), "PET_NPROC_PER_NODE": "0"}, "PET_NPROC_PER_NODE=0 and PET_NNODES=2 must be >= 1"),
    ],
)
def test_inconsistent_environment_is_refused_naming_the_variables(env, message):
    with pytest.raises(LmforgeError, match=message):
        read_environment(env)


def test_more_processes_than_gpus_is_refused():
    with pytest.raises(LmforgeError, match="PET_NPROC_PER_NODE=4 but only 2 GPU"):
        read_environment(operator(nnodes=1, nproc=4, index=0), gpus=2)
    with pytest.raises(LmforgeError, match="LOCAL_RANK=2 but only 2 GPU"):
        read_environment({"WORLD_SIZE": "3", "RANK": "2", "LOCAL_RANK": "2", **MASTER}, gpus=2)
    assert read_environment(operator(nnodes=1, nproc=2, index=0), gpus=2).spawn_local


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
    assert operator_env(2, 2, 1, 29511) == {**operator(2, 2, 1), "MASTER_PORT": "29511", "PYTHONUNBUFFERED": "0"}


def test_a_parent_launchers_variables_do_not_leak_into_the_workers():
    parent = {"PATH": "/bin", "RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "h",
              "PET_NNODES": "2", "TORCHELASTIC_RUN_ID": "x"}
    assert without_launcher_variables(parent) == {"PATH": "/bin"}
    assert read_environment(without_launcher_variables({**operator(2, 2, 1), "HOME": "/h"})) == Environment()
