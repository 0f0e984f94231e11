"""Local launcher: training processes on this machine.

In: the run config and the worker's arguments. Out: the workers' exit status (an error
naming it when training failed); checkpoints land at the checkpoint location the arguments
name. Two shapes:

- nnodes = 1: torchrun with `nproc` processes (CPU processes talk over gloo, GPU processes
  over NCCL; the worker decides from what it sees);
- nnodes > 1: an emulated PyTorchJob. One `lmforge worker` per node, each given exactly the
  variables the Training Operator injects into a replica (`distributed.operator_env`: pod index
  as RANK, WORLD_SIZE = replicas x nprocPerNode, PET_*), and its own cache directory as its
  "node disk", so the multi-node contract runs on one machine;
- train.local_replicas: containers (any nnodes): the replicas are containers of the trainer
  image sharing no disk, restarted as restartPolicy ExitCode would (`containers`).

`run_local_processes` is the node agent both shapes and the worker of an operator pod with
nprocPerNode > 1 use: start the processes, pass signals on, combine their exit statuses.

    lmforge train --config tiny.yaml --set train.nnodes=2 --set train.nproc=1 --data-bin DIR --checkpoints DIR
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lmforge.config import RunConfig
from lmforge.errors import LmforgeError
from lmforge.interrupts import Interrupted
from lmforge.training.distributed import operator_env, without_launcher_variables
from lmforge.training.worker import CACHE_ENV, EXIT_TERMINATED

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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(cfg: RunConfig, worker_args: list[str], *, cache_dir: Path, job_name: str = "lmforge-local") -> None:
    """Run the workers to completion; raise LmforgeError with their status when they fail, Interrupted
    when a stop signal ended them. `job_name` names an emulated PyTorchJob's containers
    (train.local_replicas: containers)."""
    t = cfg.train
    base = without_launcher_variables(os.environ)
    if t.local_replicas == "containers":
        from lmforge.training.launchers import containers

        port = free_port()  # on this host: the containers share its network
        envs = [containers.replica_env(base, operator_env(t.nnodes, t.nproc, node, port)) for node in range(t.nnodes)]
        what = f"the emulated PyTorchJob {job_name} ({t.nnodes} replica container(s) x {t.nproc} process(es))"
        log.info("starting %s of %s: lmforge worker %s", what, t.pytorchjob.image, " ".join(worker_args))
        outcome = containers.run_job(t.pytorchjob.image, job_name, worker_args, envs,
                                     backoff_limit=t.pytorchjob.backoff_limit)
        if outcome.stopped_by:
            raise Interrupted(outcome.stopped_by)
        if outcome.status != 0:
            raise LmforgeError(f"training failed: {what}: {outcome.reason}")
        return
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
    received: list[int] = []
    status = run_local_processes(command, envs, received=received)
    if received:  # stopped from outside: however the workers ended after it (their log says), not a failure
        raise Interrupted(received[0])
    if status != 0:
        raise LmforgeError(f"training failed: {what} exited with status {status} (the worker log above says why)")


# ------------------------------------------------------------------ the node agent


def combine_exit_codes(codes: Sequence[int]) -> int:
    """One pod's status from its processes': a permanent failure wins (its peers then fail
    transiently, e.g. 'connection closed by peer'), then a signal or transient code, else 0."""
    permanent = [code for code in codes if 0 < code < 128]
    if permanent:
        return permanent[0]
    signalled = [128 - code for code in codes if code < 0]  # -9 (killed by SIGKILL, e.g. OOM) -> 137: the cause
    if signalled:
        return signalled[0]
    return max(codes, default=0)


def run_local_processes(command: list[str], envs: list[dict[str, str]], *, grace_s: float = 60.0,
                        received: list[int] | None = None) -> int:
    """Start one process per environment and wait for all; SIGTERM/SIGINT are passed on (and
    appended to `received` when given).

    What torchrun's agent does for a node, except for the exit status: torchrun reports 1 for
    any failed worker, which a PyTorchJob's ExitCode policy treats as permanent. Here the
    status keeps its meaning (see `combine_exit_codes`). When one process fails, the others are
    stopped: they would otherwise wait for it in a collective until the timeout.
    """
    procs = [subprocess.Popen(command, env=env) for env in envs]
    received = [] if received is None else received

    def forward(signum: int, frame: Any) -> None:
        received.append(signum)
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        stopping_since: float | None = None
        while None in [proc.poll() for proc in procs]:  # a list: every process polled each time
            failed = any(proc.returncode not in (None, 0) for proc in procs)
            if (failed or received) and stopping_since is None:
                stopping_since = time.monotonic()
                for proc in procs:
                    if proc.poll() is None and not received:
                        proc.terminate()
            if stopping_since is not None and time.monotonic() - stopping_since > grace_s:
                for proc in procs:
                    if proc.poll() is None:
                        proc.kill()
            time.sleep(0.2)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    codes = [proc.returncode for proc in procs]
    if received and all(code in (0, EXIT_TERMINATED, -signal.SIGTERM) for code in codes):
        return EXIT_TERMINATED
    return combine_exit_codes(codes)
