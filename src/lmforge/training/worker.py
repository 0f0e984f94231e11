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

The PyTorchJob's `restartPolicy: ExitCode` restarts exactly the codes >= 128. What the
distributed variables mean is `lmforge.training.distributed`'s; in an operator pod with
nprocPerNode > 1 this worker first starts the node's processes (the local launcher's
`run_local_processes`), each one a worker again.

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
import sys
from pathlib import Path
from typing import Any

from lmforge import config as config_mod
from lmforge.errors import LmforgeError
from lmforge.fairseq_api.arguments import train_args
from lmforge.training.distributed import local_process_env, read_environment

log = logging.getLogger(__name__)

EXIT_TRANSIENT = 138  # the Training Operator's documented user-defined retryable code (128 + SIGUSR1)
EXIT_TERMINATED = 143  # 128 + SIGTERM
CACHE_ENV = "LMFORGE_CACHE_DIR"


def retryable(exit_code: int) -> bool:
    """Whether `restartPolicy: ExitCode` restarts a pod that exited so: 128-255 (signals and the
    codes above), while 1-127 fail the job (the Training Operator's IsRetryableExitCode)."""
    return 128 <= exit_code <= 255


class TransientError(LmforgeError):
    """A failure a restart may not meet again (storage, network, a peer process that died)."""

    exit_code = EXIT_TRANSIENT


class Terminated(BaseException):
    """SIGTERM arrived before training started: nothing to save. A BaseException, so no
    `except Exception` on the way swallows it."""


# ------------------------------------------------------------------ exit codes


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
        from lmforge.training.launchers import local

        command = local.worker_command(worker_args(config_uri, data_uri, checkpoint_uri, tracking_uri=tracking_uri,
                                                   mlflow_run_id=mlflow_run_id, cache_dir=cache_dir))
        log.info("node %d: starting %d training processes", env.node_rank, env.nproc_per_node)
        return local.run_local_processes(
            command, [local_process_env(os.environ, env, i) for i in range(env.nproc_per_node)])

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


def worker_args(config_uri: str, data_uri: str, checkpoint_uri: str, *, tracking_uri: str = "",
                mlflow_run_id: str = "", cache_dir: str = "") -> list[str]:
    """The worker's command-line arguments (see `add_arguments`); empty options are left out."""
    args = ["--config", config_uri, "--data", data_uri, "--save-dir", checkpoint_uri]
    for flag, value in (("--tracking-uri", tracking_uri), ("--mlflow-run-id", mlflow_run_id), ("--cache-dir", cache_dir)):
        if value:
            args += [flag, value]
    return args


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
        log.exception("training failed (%s, exit %d)", "transient" if retryable(code) else "permanent", code)
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
