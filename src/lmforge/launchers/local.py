"""Local launcher: torchrun on this machine, `nproc` worker processes.

In: the worker's arguments. Out: the workers' exit status; checkpoints land in
the checkpoint directory the arguments name. CPU processes talk over gloo,
GPU processes over NCCL (the worker decides from what it sees).
"""

from __future__ import annotations

import logging
import subprocess
import sys

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


def launch(nproc: int, worker_args: list[str]) -> None:
    command = torchrun_command(nproc, worker_args)
    log.info("starting %d training process(es): %s", nproc, " ".join(command))
    result = subprocess.run(command, check=False)
    if result.returncode != 0:
        raise LmforgeError(f"training failed: torchrun exited with status {result.returncode} (the worker log above says why)")
