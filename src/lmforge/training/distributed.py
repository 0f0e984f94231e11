"""The distributed-environment contract: which variables start a training process, and what they mean.

In: environment mappings (never `os.environ` itself: the callers pass it). Out: plain values.

- `read_environment(environ, gpus=)`: this process's `Environment` (world size, rank, local rank,
  node) from torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, GROUP_RANK,
  MASTER_ADDR/PORT), from the Kubeflow Training Operator's (MASTER_ADDR/PORT, WORLD_SIZE =
  replicas x nprocPerNode, RANK = the pod's index, PET_NNODES, PET_NPROC_PER_NODE,
  PET_NODE_RANK), or from none (one process); an inconsistent set is refused, naming the
  variables that disagree;
- `Environment.placement(cuda=)`: the `Placement` fairseq's arguments are built from: rank,
  world size, `device_id` from LOCAL_RANK (fairseq ignores LOCAL_RANK) and the backend
  (`backend`: NCCL on GPUs, gloo on CPUs);
- `local_process_env`: the variables a node's launcher gives each of its processes (torchrun's,
  consistent with the operator's), used by the worker of an operator pod with nprocPerNode > 1;
- `operator_env` and `without_launcher_variables`: what a local emulation of a PyTorchJob gives
  each replica, and the environment cleared of what a parent launcher left;
- `OPERATOR_PORT_NAME`/`OPERATOR_PORT`: the rendezvous port a PyTorchJob's container declares.

Pure functions; the worker (`lmforge worker`) and both launchers use them, e.g.
`lmforge train --config tiny.yaml --set train.nnodes=2 --set train.nproc=1 --data-bin DIR --checkpoints DIR`
runs every one of them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from lmforge.errors import LmforgeError

__all__ = [
    "Environment", "Placement", "backend", "local_process_env", "operator_env", "read_environment",
    "without_launcher_variables",
]

#: What torchrun (torch.distributed.run) sets in each process it starts.
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR",
                      "MASTER_PORT")
#: What the Training Operator (kubeflow.org/v1 PyTorchJob) sets in each replica's container.
OPERATOR_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "PET_NNODES", "PET_NPROC_PER_NODE",
                      "PET_NODE_RANK")
#: The container port the operator takes MASTER_PORT from (by this name), and its default number.
OPERATOR_PORT_NAME, OPERATOR_PORT = "pytorchjob-port", 23456


def backend(cuda: bool) -> str:
    """The torch.distributed backend: NCCL between GPUs, gloo between CPU processes."""
    return "nccl" if cuda else "gloo"


@dataclass(frozen=True)
class Placement:
    """Where one training process sits in the job, as fairseq's arguments need it."""

    world_size: int = 1
    rank: int = 0
    device_id: int = 0  # fairseq ignores LOCAL_RANK, so the worker passes it as --device-id
    cuda: bool = False

    @property
    def backend(self) -> str:
        return backend(self.cuda)


@dataclass(frozen=True)
class Environment:
    """This process's place in the job, from torchrun's or the PyTorchJob operator's variables."""

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    nproc_per_node: int = 1
    node_rank: int = 0
    nnodes: int = 1
    spawn_local: bool = False  # an operator pod with nprocPerNode > 1: start the node's processes first

    def placement(self, *, cuda: bool) -> Placement:
        return Placement(world_size=self.world_size, rank=self.rank, device_id=self.local_rank, cuda=cuda)


def _integer(environ: Mapping[str, str], name: str) -> int | None:
    raw = environ.get(name)
    if raw is None or raw == "":
        return None
    try:
        return int(raw)
    except ValueError:
        raise LmforgeError(f"environment variable {name}={raw!r} is not an integer") from None


def read_environment(environ: Mapping[str, str], *, gpus: int = 0) -> Environment:
    """Parse and cross-check the distributed variables; an inconsistent set is refused (exit 1).

    Three shapes are accepted:
    - none of them: a single process;
    - torchrun's, which is also what `local_process_env` gives the processes of an operator pod;
    - the operator's, without LOCAL_RANK.
    A worker started with a wrong rank would hang its peers at the rendezvous, so every
    relation between the variables is checked before anything else happens. `gpus` is the
    number of visible GPUs (0 on a CPU machine: nothing to check).
    """
    world_size = _integer(environ, "WORLD_SIZE")
    world_size = 1 if world_size is None else world_size
    if world_size < 1:
        raise LmforgeError(f"WORLD_SIZE={world_size} must be >= 1")
    if world_size > 1 and not (environ.get("MASTER_ADDR") and environ.get("MASTER_PORT")):
        raise LmforgeError(
            "WORLD_SIZE > 1 needs MASTER_ADDR and MASTER_PORT; start workers with torchrun or a PyTorchJob")
    if all(_integer(environ, name) is None for name in ("PET_NPROC_PER_NODE", "PET_NNODES", "PET_NODE_RANK")):
        env = _torchrun_environment(environ, world_size)
    else:
        env = _operator_environment(environ, world_size)
    if gpus and env.local_rank >= gpus:
        raise LmforgeError(f"LOCAL_RANK={env.local_rank} but only {gpus} GPU(s) are visible; one process per GPU")
    if gpus and env.spawn_local and env.nproc_per_node > gpus:
        raise LmforgeError(f"PET_NPROC_PER_NODE={env.nproc_per_node} but only {gpus} GPU(s) are visible")
    return env


def _torchrun_environment(environ: Mapping[str, str], world_size: int) -> Environment:
    """torchrun's variables, or none at all (a single process)."""
    rank = _integer(environ, "RANK") or 0
    local = _integer(environ, "LOCAL_RANK") or 0
    local_world = _integer(environ, "LOCAL_WORLD_SIZE")
    if not 0 <= rank < world_size:
        raise LmforgeError(f"RANK={rank} is outside WORLD_SIZE={world_size}; check the launcher's environment")
    if local < 0 or local > rank or (local_world is not None and local >= local_world):
        raise LmforgeError(f"LOCAL_RANK={local} is inconsistent with RANK={rank} and LOCAL_WORLD_SIZE={local_world}")
    return Environment(world_size=world_size, rank=rank, local_rank=local, nproc_per_node=local_world or 1,
                       node_rank=_integer(environ, "GROUP_RANK") or 0,
                       nnodes=max(world_size // (local_world or 1), 1))


def _operator_environment(environ: Mapping[str, str], world_size: int) -> Environment:
    """The operator's variables in a pod, or `local_process_env`'s in one of the pod's processes."""
    rank = _integer(environ, "RANK") or 0
    local_rank = _integer(environ, "LOCAL_RANK")
    nproc = _integer(environ, "PET_NPROC_PER_NODE")
    nnodes = _integer(environ, "PET_NNODES")
    node_rank = _integer(environ, "PET_NODE_RANK")
    if nproc is None or nnodes is None:
        raise LmforgeError("PET_NPROC_PER_NODE and PET_NNODES must be set together (PyTorchJob operator variables)")
    node_rank = rank if node_rank is None and local_rank is None else node_rank
    if node_rank is None:
        raise LmforgeError("PET_NODE_RANK is not set")
    if nproc < 1 or nnodes < 1:
        raise LmforgeError(f"PET_NPROC_PER_NODE={nproc} and PET_NNODES={nnodes} must be >= 1")
    if world_size != nnodes * nproc:
        raise LmforgeError(
            f"WORLD_SIZE={world_size} is not PET_NNODES x PET_NPROC_PER_NODE = {nnodes} x {nproc}; "
            "check the PyTorchJob's replicas and nprocPerNode"
        )
    if not 0 <= node_rank < nnodes:
        raise LmforgeError(f"PET_NODE_RANK={node_rank} is outside PET_NNODES={nnodes}")
    if local_rank is None:  # the pod's own process, as the operator starts it
        if rank != node_rank:
            raise LmforgeError(f"RANK={rank} differs from PET_NODE_RANK={node_rank}: not the operator's environment")
        return Environment(world_size=world_size, rank=node_rank * nproc, local_rank=0, nproc_per_node=nproc,
                           node_rank=node_rank, nnodes=nnodes, spawn_local=nproc > 1)
    # one of the processes the pod's worker started
    if not 0 <= local_rank < nproc or rank != node_rank * nproc + local_rank:
        raise LmforgeError(
            f"RANK={rank}, LOCAL_RANK={local_rank} do not match PET_NODE_RANK={node_rank} x "
            f"PET_NPROC_PER_NODE={nproc}"
        )
    return Environment(world_size=world_size, rank=rank, local_rank=local_rank, nproc_per_node=nproc,
                       node_rank=node_rank, nnodes=nnodes)


def local_process_env(environ: Mapping[str, str], env: Environment, local_rank: int) -> dict[str, str]:
    """The variables of local process `local_rank` of an operator pod: torchrun's, consistent with the operator's."""
    return {
        **environ,
        "RANK": str(env.node_rank * env.nproc_per_node + local_rank),
        "LOCAL_RANK": str(local_rank),
        "LOCAL_WORLD_SIZE": str(env.nproc_per_node),
        "GROUP_RANK": str(env.node_rank),
        "WORLD_SIZE": str(env.world_size),
        "PET_NODE_RANK": str(env.node_rank),
    }


def operator_env(nnodes: int, nproc: int, node_rank: int, master_port: int,
                 master_addr: str = "127.0.0.1") -> dict[str, str]:
    """The variables the Training Operator sets in replica `node_rank` (kubeflow/training-operator
    pkg/controller.v1/pytorch/envvar.go): the Master is pod 0, Worker i is pod i + 1; MASTER_ADDR
    is the Master's service (for a local emulation, this host)."""
    return {
        "PYTHONUNBUFFERED": "0",  # the operator sets "0", which Python reads as "unbuffered" too
        "MASTER_ADDR": master_addr,
        "MASTER_PORT": str(master_port),
        "WORLD_SIZE": str(nnodes * nproc),
        "RANK": str(node_rank),
        "PET_NPROC_PER_NODE": str(nproc),
        "PET_NODE_RANK": str(node_rank),
        "PET_NNODES": str(nnodes),
    }


def without_launcher_variables(environ: Mapping[str, str]) -> dict[str, str]:
    """`environ` without the distributed variables a parent launcher may have left (torchrun's,
    the operator's PET_*, torchelastic's): a launcher started inside a worker starts afresh."""
    drop = set(TORCHRUN_VARIABLES) | set(OPERATOR_VARIABLES)
    return {k: v for k, v in environ.items() if k not in drop and not k.startswith(("PET_", "TORCHELASTIC_"))}
