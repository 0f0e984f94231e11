"""The training worker: one fairseq training process of a (possibly distributed) job.

In: the run config (JSON file), the data-bin directory, the checkpoint
directory, and the distributed environment that torchrun or the Kubeflow
PyTorchJob operator injects. Out: fairseq checkpoints in the checkpoint
directory (fairseq resumes from its checkpoint_last.pt there), training metrics
in MLflow from rank 0.

    torchrun --nproc-per-node 2 -m lmforge.worker --config run.json --data DIR --save-dir DIR
    lmforge worker --config run.json --data DIR --save-dir DIR
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Mapping
from pathlib import Path

from lmforge import config as config_mod
from lmforge.errors import LmforgeError
from lmforge.fairseq_args import Placement, train_args

log = logging.getLogger(__name__)


def placement_from_env(environ: Mapping[str, str], *, cuda: bool) -> Placement:
    """Where this process sits, from torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK).

    Absent variables mean a single process. Inconsistent ones are refused: a
    worker started with a wrong rank would hang its peers at the rendezvous.
    """
    def integer(name: str, default: int) -> int:
        raw = environ.get(name)
        if raw is None or raw == "":
            return default
        try:
            return int(raw)
        except ValueError:
            raise LmforgeError(f"environment variable {name}={raw!r} is not an integer") from None

    world_size = integer("WORLD_SIZE", 1)
    rank = integer("RANK", 0)
    local_rank = integer("LOCAL_RANK", 0)
    if world_size < 1:
        raise LmforgeError(f"WORLD_SIZE={world_size} must be >= 1")
    if not 0 <= rank < world_size:
        raise LmforgeError(f"RANK={rank} is outside WORLD_SIZE={world_size}; check the launcher's environment")
    if local_rank < 0 or local_rank > rank:
        raise LmforgeError(f"LOCAL_RANK={local_rank} is inconsistent with RANK={rank}")
    if world_size > 1 and not (environ.get("MASTER_ADDR") and environ.get("MASTER_PORT")):
        raise LmforgeError("WORLD_SIZE > 1 needs MASTER_ADDR and MASTER_PORT; start workers with torchrun")
    return Placement(world_size=world_size, rank=rank, device_id=local_rank, cuda=cuda)


def run(config_path: str | Path, data_dir: str, save_dir: str, *, tracking_uri: str = "", mlflow_run_id: str = "") -> None:
    import torch

    from lmforge import fairseq_api

    cfg = config_mod.from_json(Path(config_path).read_text())
    placement = placement_from_env(os.environ, cuda=torch.cuda.is_available())
    argv = train_args(cfg, data_dir, save_dir, placement)
    handler = None
    if placement.rank == 0 and tracking_uri and mlflow_run_id:
        from mlflow import MlflowClient

        from lmforge.tracking import FairseqMetricsHandler

        handler = FairseqMetricsHandler(MlflowClient(tracking_uri), mlflow_run_id)
        logging.getLogger("fairseq.logging.progress_bar").addHandler(handler)
    log.info("rank %d/%d: fairseq-train %s", placement.rank, placement.world_size, " ".join(argv))
    try:
        fairseq_api.train(argv)
    finally:
        if handler is not None:
            logging.getLogger("fairseq.logging.progress_bar").removeHandler(handler)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="run config as JSON (written by the train step)")
    parser.add_argument("--data", required=True, help="fairseq data-bin directory")
    parser.add_argument("--save-dir", required=True, help="checkpoint directory")
    parser.add_argument("--tracking-uri", default="", help="MLflow tracking URI (rank 0 logs metrics)")
    parser.add_argument("--mlflow-run-id", default="", help="MLflow run of the pipeline run")


def main(argv: list[str] | None = None) -> int:
    from lmforge.cli import run_guarded

    parser = argparse.ArgumentParser(prog="lmforge worker", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    return run_guarded(
        lambda: run(args.config, args.data, args.save_dir, tracking_uri=args.tracking_uri, mlflow_run_id=args.mlflow_run_id)
    )


if __name__ == "__main__":
    raise SystemExit(main())
