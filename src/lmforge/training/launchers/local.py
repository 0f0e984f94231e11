"""Local launcher: the training workers as processes of this machine.

In: the run config and the worker's arguments. Out: the workers' exit status (an error
naming it when training failed); checkpoints land at the checkpoint location the arguments
name. Two shapes:

- nnodes = 1: torchrun with `nproc` processes (CPU processes talk over gloo, GPU processes
  over NCCL; the worker decides from what it sees);
- nnodes > 1: an emulated PyTorchJob. One `lmforge worker` per node, each given exactly the
  variables the Training Operator injects into a replica (pod index as RANK, WORLD_SIZE =
  replicas x nprocPerNode, PET_*), and its own cache directory as its "node disk", so the
  multi-node contract runs on one machine.

    lmforge train --config tiny.yaml --set train.nnodes=2 --set train.nproc=1 --data-bin DIR --checkpoints DIR
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from collections.abc import Mapping
from pathlib import Path

from lmforge.config import RunConfig
from lmforge.errors import LmforgeError

log = logging.getLogger(__name__)


def torchrun_command(nproc: int, worker_args: list[str]) -> list[str]:
    """The torchrun command line; pure, so tests and docs can show exactly what runs."""
    return [
        sys.executable, "-m", "torch.distributed.run",
        # --standalone: a local rendezvous on a free port, no etcd or fixed port to collide on
        "--standalone", "--nnodes", "1", "--nproc-per-node", str(nproc),
        "-m", "lmforge.worker", *worker_args,
    ]


def worker_command(worker_args: list[str]) -> list[str]:
    """What a PyTorchJob replica's container runs, here with this Python."""
    return [sys.executable, "-m", "lmforge.worker", *worker_args]


def operator_env(nnodes: int, nproc: int, node_rank: int, master_port: int) -> dict[str, str]:
    """The variables the Training Operator (kubeflow.org/v1 PyTorchJob) sets in replica `node_rank`:
    the Master is pod 0, Worker i is pod i + 1; MASTER_ADDR is the Master's service (here this host)."""
    return {
        "PYTHONUNBUFFERED": "0",  # the operator sets "0", which Python reads as "unbuffered" too
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(master_port),
        "WORLD_SIZE": str(nnodes * nproc),
        "RANK": str(node_rank),
        "PET_NPROC_PER_NODE": str(nproc),
        "PET_NODE_RANK": str(node_rank),
        "PET_NNODES": str(nnodes),
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _clean_environ(environ: Mapping[str, str]) -> dict[str, str]:
    """This process's environment without distributed variables a parent launcher may have left."""
    drop = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT"}
    return {k: v for k, v in environ.items() if k not in drop and not k.startswith(("PET_", "TORCHELASTIC_"))}


def launch(cfg: RunConfig, worker_args: list[str], *, cache_dir: Path) -> None:
    """Run the workers to completion; raise LmforgeError with their status when they fail."""
    from lmforge.training.worker import CACHE_ENV, run_local_processes

    t = cfg.train
    base = _clean_environ(os.environ)
    if t.nnodes == 1:
        command = torchrun_command(t.nproc, worker_args)
        envs = [{**base, CACHE_ENV: str(cache_dir)}]
        what = f"torchrun with {t.nproc} process(es)"
    else:
        command = worker_command(worker_args)
        port = free_port()
        envs = [
            {**base, **operator_env(t.nnodes, t.nproc, node, port), CACHE_ENV: str(cache_dir / f"node-{node}")}
            for node in range(t.nnodes)
        ]
        what = f"an emulated PyTorchJob of {t.nnodes} replicas x {t.nproc} process(es)"
    log.info("starting %s: %s", what, " ".join(command))
    status = run_local_processes(command, envs)
    if status != 0:
        raise LmforgeError(f"training failed: {what} exited with status {status} (the worker log above says why)")
