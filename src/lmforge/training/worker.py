"""The training worker: the command every training process (or PyTorchJob replica) runs.

In: the run config (a JSON file, local or s3://), the data-bin location, the checkpoint
location, and the distributed environment that torchrun or the Kubeflow PyTorchJob operator
injects. Out: fairseq checkpoints uploaded to the checkpoint location as each one completes,
training metrics in the pipeline run's MLflow run (rank 0 only), and an exit status that tells
a restart policy what to do:

    0        training finished
    1, 2     a mistake no restart can fix (config, data, arguments, environment)
    138      a transient failure (storage or network hiccup, a peer that went away): retry
    143      stopped by SIGTERM after saving and uploading a checkpoint: retry resumes there

The PyTorchJob's `restartPolicy: ExitCode` restarts exactly the codes >= 128.

    torchrun --nproc-per-node 2 -m lmforge.worker --config run.json --data DIR --save-dir URI
    lmforge worker --config s3://.../run-config.json --data s3://.../data-bin --save-dir s3://.../checkpoints
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge import config as config_mod
from lmforge.errors import LmforgeError
from lmforge.fairseq_api.arguments import Placement, train_args

log = logging.getLogger(__name__)

EXIT_TRANSIENT = 138  # the Training Operator's documented user-defined retryable code (128 + SIGUSR1)
EXIT_TERMINATED = 143  # 128 + SIGTERM
CACHE_ENV = "LMFORGE_CACHE_DIR"


class TransientError(LmforgeError):
    """A failure a restart may not meet again (storage, network, a peer process that died)."""

    exit_code = EXIT_TRANSIENT


class Terminated(BaseException):
    """SIGTERM arrived before training started: nothing to save. A BaseException, so no
    `except Exception` on the way swallows it."""


# ------------------------------------------------------------------ the distributed environment


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


def read_environment(environ: Mapping[str, str], *, gpus: int = 0) -> Environment:
    """Parse and cross-check the distributed variables; an inconsistent set is refused (exit 1).

    Three shapes are accepted:
    - none of them: a single process;
    - torchrun's (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR/PORT), which is
      also what this worker gives the processes it starts in an operator pod;
    - the operator's (MASTER_ADDR/PORT, WORLD_SIZE = replicas x nprocPerNode, RANK = the pod's
      index, PET_NNODES, PET_NPROC_PER_NODE, PET_NODE_RANK), without LOCAL_RANK.
    A worker started with a wrong rank would hang its peers at the rendezvous, so every
    relation between the variables is checked before anything else happens.
    """

    def integer(name: str, default: int | None) -> int | None:
        raw = environ.get(name)
        if raw is None or raw == "":
            return default
        try:
            return int(raw)
        except ValueError:
            raise LmforgeError(f"environment variable {name}={raw!r} is not an integer") from None

    world_size = integer("WORLD_SIZE", 1)
    rank = integer("RANK", 0)
    local_rank = integer("LOCAL_RANK", None)
    nproc = integer("PET_NPROC_PER_NODE", None)
    nnodes = integer("PET_NNODES", None)
    node_rank = integer("PET_NODE_RANK", None)
    assert world_size is not None and rank is not None
    if world_size < 1:
        raise LmforgeError(f"WORLD_SIZE={world_size} must be >= 1")
    if world_size > 1 and not (environ.get("MASTER_ADDR") and environ.get("MASTER_PORT")):
        raise LmforgeError("WORLD_SIZE > 1 needs MASTER_ADDR and MASTER_PORT; start workers with torchrun or a PyTorchJob")

    if nproc is None and nnodes is None and node_rank is None:  # torchrun, or nothing at all
        local = local_rank or 0
        local_world = integer("LOCAL_WORLD_SIZE", None)
        if not 0 <= rank < world_size:
            raise LmforgeError(f"RANK={rank} is outside WORLD_SIZE={world_size}; check the launcher's environment")
        if local < 0 or local > rank or (local_world is not None and local >= local_world):
            raise LmforgeError(f"LOCAL_RANK={local} is inconsistent with RANK={rank} and LOCAL_WORLD_SIZE={local_world}")
        env = Environment(world_size=world_size, rank=rank, local_rank=local,
                          nproc_per_node=local_world or 1, node_rank=integer("GROUP_RANK", 0) or 0,
                          nnodes=max(world_size // (local_world or 1), 1))
    else:
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
            env = Environment(world_size=world_size, rank=node_rank * nproc, local_rank=0, nproc_per_node=nproc,
                              node_rank=node_rank, nnodes=nnodes, spawn_local=nproc > 1)
        else:  # one of the processes the pod's worker started
            if not 0 <= local_rank < nproc or rank != node_rank * nproc + local_rank:
                raise LmforgeError(
                    f"RANK={rank}, LOCAL_RANK={local_rank} do not match PET_NODE_RANK={node_rank} x "
                    f"PET_NPROC_PER_NODE={nproc}"
                )
            env = Environment(world_size=world_size, rank=rank, local_rank=local_rank, nproc_per_node=nproc,
                              node_rank=node_rank, nnodes=nnodes)
    if gpus and env.local_rank >= gpus:
        raise LmforgeError(f"LOCAL_RANK={env.local_rank} but only {gpus} GPU(s) are visible; one process per GPU")
    if gpus and env.spawn_local and env.nproc_per_node > gpus:
        raise LmforgeError(f"PET_NPROC_PER_NODE={env.nproc_per_node} but only {gpus} GPU(s) are visible")
    return env


def placement_from_env(environ: Mapping[str, str], *, cuda: bool) -> Placement:
    """Where this process sits (see `read_environment`)."""
    return read_environment(environ).placement(cuda=cuda)


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


# ------------------------------------------------------------------ exit codes


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


_TRANSIENT_MESSAGES = (
    "connection closed by peer", "connection reset", "connection refused", "broken pipe", "timed out",
    "timeout", "nccl", "gloo", "socket", "address already in use",
)


def exit_code_for(exc: BaseException) -> int:
    """The exit status for an exception that ended a worker (see the module docstring)."""
    if isinstance(exc, Terminated):
        return EXIT_TERMINATED
    if isinstance(exc, KeyboardInterrupt):
        return 130
    if isinstance(exc, LmforgeError):
        return exc.exit_code
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return EXIT_TRANSIENT
    try:
        import torch.distributed as dist

        if isinstance(exc, dist.DistError):
            return EXIT_TRANSIENT
    except (ImportError, AttributeError):
        pass
    if isinstance(exc, RuntimeError) and "out of memory" not in str(exc).lower():
        if any(text in str(exc).lower() for text in _TRANSIENT_MESSAGES):
            return EXIT_TRANSIENT
    return 1  # a bug: restarting would meet it again


# ------------------------------------------------------------------ an operator pod with several processes


def run_local_processes(command: list[str], envs: list[dict[str, str]], *, grace_s: float = 60.0) -> int:
    """Start one process per environment and wait for all; SIGTERM/SIGINT are passed on.

    What torchrun's agent does for a node, except for the exit status: torchrun reports 1 for
    any failed worker, which a PyTorchJob's ExitCode policy treats as permanent. Here the
    status keeps its meaning (see `combine_exit_codes`). When one process fails, the others are
    stopped: they would otherwise wait for it in a collective until the timeout.
    """
    procs = [subprocess.Popen(command, env=env) for env in envs]
    received: list[int] = []

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


# ------------------------------------------------------------------ staging


def cache_root(cfg_cache_dir: str = "", explicit: str = "") -> Path:
    return Path(explicit or os.environ.get(CACHE_ENV) or cfg_cache_dir or Path.home() / ".cache" / "lmforge")


def _key(uri: str) -> str:
    return hashlib.sha256(uri.encode()).hexdigest()[:16]


def stage_data(data_uri: str, cache: Path) -> Path:
    """A local directory with the data-bin: the location itself when local, else a copy in the
    node's cache made once (the processes of a node take turns; the first one copies)."""
    from lmforge.io import storage
    from lmforge.training.checkpoints import node_lock

    local = storage.local_path(data_uri)
    if local is not None:
        if not (local / "dict.txt").is_file():
            raise LmforgeError(f"{data_uri} has no dict.txt; point --data at the preprocess step's output")
        return local
    dest = cache / "data-bin" / _key(data_uri)
    with node_lock(dest):
        names = storage.list_files(data_uri)
        if "dict.txt" not in names:
            raise LmforgeError(f"{data_uri} has no dict.txt; point --data at the preprocess step's output")
        marker = dest / ".complete.json"
        if marker.is_file() and json.loads(marker.read_text()) == names:
            log.info("data-bin %s already in %s", data_uri, dest)
            return dest
        import shutil

        shutil.rmtree(dest, ignore_errors=True)
        log.info("copying data-bin %s (%d files) to %s", data_uri, len(names), dest)
        try:
            storage.get_dir(data_uri, dest)
        except LmforgeError as exc:
            raise TransientError(f"copying the data-bin failed: {exc}") from None
        marker.write_text(json.dumps(names))
    return dest


def read_config(config_uri: str) -> config_mod.RunConfig:
    from lmforge.io import storage

    if not storage.exists(config_uri):
        raise LmforgeError(f"config {config_uri} does not exist (the train step writes it next to the checkpoints)")
    return config_mod.from_json(storage.read_text(config_uri))


# ------------------------------------------------------------------ training


class _StopFlag:
    """SIGTERM during training asks for a checkpoint and a clean stop; before training it just exits."""

    def __init__(self) -> None:
        self.training = False
        self.requested = False

    def handle(self, signum: int, frame: Any) -> None:
        if not self.training:
            raise Terminated()
        if not self.requested:
            log.warning("SIGTERM: saving a checkpoint after the current update, then stopping")
        self.requested = True

    def agreed(self) -> bool:
        """True on every process as soon as any one of them was asked to stop (a collective)."""
        import torch
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return self.requested
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
        flag = torch.tensor([1 if self.requested else 0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and not self.requested:
            log.warning("a peer process was asked to stop: saving a checkpoint and stopping")
            self.requested = True
        return self.requested


def run(
    config_uri: str, data_uri: str, checkpoint_uri: str, *, tracking_uri: str = "", mlflow_run_id: str = "",
    cache_dir: str = "",
) -> int:
    """Train (or start this node's processes); returns the exit status."""
    import torch

    gpus = torch.cuda.device_count()
    env = read_environment(os.environ, gpus=gpus)
    if env.spawn_local:
        command = [sys.executable, "-m", "lmforge.worker", "--config", config_uri, "--data", data_uri,
                   "--save-dir", checkpoint_uri, "--tracking-uri", tracking_uri, "--mlflow-run-id", mlflow_run_id,
                   "--cache-dir", cache_dir]
        log.info("node %d: starting %d training processes", env.node_rank, env.nproc_per_node)
        return run_local_processes(command, [local_process_env(os.environ, env, i) for i in range(env.nproc_per_node)])

    from lmforge.training import checkpoints
    from lmforge import fairseq_api
    from lmforge.io import storage

    cfg = read_config(config_uri)
    storage.use_endpoint(cfg.storage.s3_endpoint)
    placement = env.placement(cuda=gpus > 0)
    cache = cache_root(cfg.train.cache_dir, cache_dir)
    data_dir = stage_data(data_uri, cache)
    work_dir = cache / "checkpoints" / _key(checkpoint_uri)
    if storage.local_path(checkpoint_uri) is not None and Path(checkpoint_uri).resolve() == work_dir.resolve():
        raise LmforgeError(f"--save-dir {checkpoint_uri} is the worker's own cache; choose another checkpoint location")
    try:
        resumed = checkpoints.stage_newest(checkpoint_uri, work_dir)
    except LmforgeError as exc:
        raise TransientError(f"reading checkpoints from {checkpoint_uri} failed: {exc}") from None
    if resumed is None:
        log.info("no checkpoint at %s: starting from scratch", checkpoint_uri)

    uploader = checkpoints.Uploader(work_dir, checkpoint_uri) if placement.rank == 0 else None

    def on_checkpoint(event: checkpoints.SaveEvent) -> None:
        if uploader is None:
            return
        try:
            uploader.after_save(event)
        except LmforgeError as exc:
            raise TransientError(f"uploading the checkpoint failed: {exc}") from None

    argv = train_args(cfg, str(data_dir), str(work_dir), placement)
    handler = None
    if placement.rank == 0 and mlflow_run_id:
        from mlflow import MlflowClient

        from lmforge.tracking import FairseqMetricsHandler

        handler = FairseqMetricsHandler(MlflowClient(tracking_uri or None), mlflow_run_id)
        logging.getLogger("fairseq.logging.progress_bar").addHandler(handler)
    log.info("rank %d/%d: fairseq-train %s", placement.rank, placement.world_size, " ".join(argv))
    stop = _StopFlag()
    previous = signal.signal(signal.SIGTERM, stop.handle)
    stop.training = True
    try:
        fairseq_api.train(argv, on_checkpoint=on_checkpoint, stop_requested=stop.agreed)
    finally:
        signal.signal(signal.SIGTERM, previous)
        if handler is not None:
            logging.getLogger("fairseq.logging.progress_bar").removeHandler(handler)
    if stop.requested:
        log.warning("stopped on SIGTERM; the checkpoint at %s resumes training", checkpoint_uri)
        return EXIT_TERMINATED
    # Everything is at the checkpoint location: the local copies only take disk space now.
    with checkpoints.node_lock(work_dir):
        import shutil

        shutil.rmtree(work_dir, ignore_errors=True)
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="run config as JSON, a path or URI (written by the train step)")
    parser.add_argument("--data", required=True, help="fairseq data-bin: a directory or s3:// URI")
    parser.add_argument("--save-dir", required=True, help="checkpoint location: a directory or s3:// URI")
    parser.add_argument("--tracking-uri", default="", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI)")
    parser.add_argument("--mlflow-run-id", default="", help="MLflow run of the pipeline run (rank 0 logs metrics)")
    parser.add_argument("--cache-dir", default="", help=f"local cache (default: ${CACHE_ENV}, train.cache_dir, ~/.cache/lmforge)")


def run_from_args(args: argparse.Namespace) -> int:
    """`run` with the exceptions turned into exit statuses: one line for a user's mistake, a
    traceback for anything else (a transient failure or a bug)."""
    previous = signal.signal(signal.SIGTERM, _terminate_before_training)
    try:
        return run(args.config, args.data, args.save_dir, tracking_uri=args.tracking_uri,
                   mlflow_run_id=args.mlflow_run_id, cache_dir=args.cache_dir)
    except LmforgeError as exc:
        print(f"lmforge: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except (Terminated, KeyboardInterrupt) as exc:
        print(f"lmforge: worker stopped by {type(exc).__name__}", file=sys.stderr)
        return exit_code_for(exc)
    except Exception as exc:
        code = exit_code_for(exc)
        log.exception("training failed (%s, exit %d)", "transient" if code >= 128 else "permanent", code)
        return code
    finally:
        signal.signal(signal.SIGTERM, previous)


def _terminate_before_training(signum: int, frame: Any) -> None:
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    from lmforge.logs import setup_logging

    setup_logging()
    parser = argparse.ArgumentParser(prog="lmforge worker", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
