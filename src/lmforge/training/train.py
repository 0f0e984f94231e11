"""The train stage: fairseq training of the configured model, launched as configured.

In: the run config, the data-bin location (dict.txt and mmap splits) and the checkpoint
location (a directory or s3:// URI). Out: checkpoints there (checkpoint_best.pt,
checkpoint_last.pt, interval/epoch ones as configured, and checkpoints.json describing them)
and a summary (epochs, updates, best validation loss, the two checkpoints' locations).
Running again with the same checkpoint location resumes from the newest checkpoint that loads.

Before anything starts, `preflight` checks what the config cannot check alone: the data-bin
(splits present and readable by fairseq: lmforge.data.integrity; vocabulary size against
adaptive softmax and input cutoffs) and the machine or cluster the launcher will use. `dry_run` adds
fairseq's own view of one epoch, the model as built (parameter count, embedding, layers and
widths), one real batch, and the checkpoint training would resume from (and those it would
pass over, with the reason).

    lmforge train --config tiny.yaml --data-bin DIR --checkpoints DIR [--dry-run]
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from lmforge import fairseq_api, tracking
from lmforge.config import RunConfig
from lmforge.data import integrity
from lmforge.errors import LmforgeError
from lmforge.fairseq_api.arguments import train_args
from lmforge.io import storage
from lmforge.training import checkpoints
from lmforge.training.distributed import Placement
from lmforge.training.worker import cache_root, stage_data, worker_args

log = logging.getLogger(__name__)

CONFIG_FILE = "run-config.json"
SPECIAL_SYMBOLS = 4  # <s>, <pad>, </s>, <unk>: in fairseq's Dictionary, not in dict.txt
TRAINING_SPLITS = ("train", "valid")  # what fairseq-train reads


def _absolute(location: str | Path) -> str:
    """Local locations made absolute (the workers run elsewhere); URIs as given."""
    path = storage.local_path(str(location))
    return str(path.resolve()) if path is not None else str(location)


# ------------------------------------------------------------------ checks before launch


def data_problems(cfg: RunConfig, data_bin: str) -> list[str]:
    """What the data-bin lacks for this config, and what in it fairseq could not read: the dictionary
    and the train and valid splits checked (lmforge.data.integrity: reads dict.txt and the .idx files,
    and the .bin files' sizes)."""
    from lmforge import tasks

    names = storage.list_files(data_bin)
    task = tasks.get(cfg.task)
    problems = task.data_problems(str(data_bin), names, TRAINING_SPLITS)
    if task.dictionary not in names:
        return problems
    present = [name for split in TRAINING_SPLITS for name in task.split_files(split) if name in names]
    problems += integrity.data_bin_problems(data_bin, present, task.dictionary)
    softmax, inputs = cfg.model.adaptive_softmax_cutoff(), cfg.model.adaptive_input_cutoff()
    # a tied adaptive input follows the softmax's cutoffs: one problem, named where to change it
    cutoffs = {"adaptive_softmax_cutoff": softmax, "adaptive_input_cutoff": inputs if inputs != softmax else None}
    if any(cutoffs.values()):
        vocab = SPECIAL_SYMBOLS + sum(1 for line in storage.read_text(storage.join(data_bin, "dict.txt")).splitlines() if line.strip())
        for name, cutoff in cutoffs.items():
            if cutoff and cutoff[-1] > vocab:
                problems.append(
                    f"model.options.{name}: {','.join(map(str, cutoff))} exceeds the vocabulary of "
                    f"{vocab} symbols; lower the cutoffs (e.g. {vocab // 3},{2 * vocab // 3})"
                )
    return problems


def environment_problems(
    cfg: RunConfig, data_bin: str, checkpoint_uri: str, tracking_uri: str | None = None,
) -> list[str]:
    """What the launcher's target lacks: GPUs for the precision locally; a Docker engine, the trainer image
    and locations the replica containers reach; reachable locations and credentials on a cluster.
    `tracking_uri` is where the workers log metrics (None: they log none)."""
    t, problems = cfg.train, []
    if t.launcher == "local" and t.local_replicas == "containers":
        from lmforge.training.launchers import containers

        problems += containers.sharing_problems(data_bin, checkpoint_uri, tracking_uri)
        problems += containers.engine_problems(t.pytorchjob.image)
    elif t.launcher == "local":
        import torch

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if t.precision != "fp32" and not gpus:
            problems.append(f"train.precision: {t.precision} needs a GPU and this machine has none; use fp32")
        elif "bf16" in t.precision and not torch.cuda.is_bf16_supported():
            problems.append(f"train.precision: {t.precision} needs a GPU with bfloat16 (Ampere or newer)")
        if gpus and t.nnodes * t.nproc > gpus:
            problems.append(f"train.nproc: {t.nnodes} x {t.nproc} processes but {gpus} GPU(s): one process per GPU")
    else:
        c = cfg.cluster
        shared = c.pvc_mount_path.rstrip("/") + "/" if c.pvc_name else None
        for what, location in (("data-bin", data_bin), ("checkpoint location", checkpoint_uri)):
            path = storage.local_path(location)
            if path is not None and not (shared and str(path).startswith(shared)):
                problems.append(
                    f"train.launcher: pytorchjob pods cannot read the local {what} {location}; set storage.root "
                    "to s3://... (or to a path under cluster.pvc_mount_path with cluster.pvc_name)"
                )
        from lmforge.training.launchers import pytorchjob

        problem = pytorchjob.credentials_problem()
        if problem:
            problems.append(problem)
    return problems


def preflight(cfg: RunConfig, data_bin: str, checkpoint_uri: str, *, tracking_uri: str | None = None) -> None:
    """Raise one error naming every problem found before launch."""
    cfg = cfg.resolve_launcher(os.environ)
    problems = data_problems(cfg, data_bin)
    problems += environment_problems(cfg, data_bin, checkpoint_uri, tracking_uri)
    if problems:
        raise LmforgeError("cannot train: " + "; ".join(problems))
    # fairseq's own parser on the options as a worker will pass them (extra_args included)
    placement = Placement(world_size=cfg.train.world_size(), cuda=cfg.train.precision != "fp32")
    fairseq_api.check_train_args(train_args(cfg, data_bin, checkpoint_uri, placement))


# ------------------------------------------------------------------ training


def write_config(cfg: RunConfig, checkpoint_uri: str) -> str:
    """The run config next to the checkpoints, where every worker reads it (and a person later)."""
    uri = storage.join(checkpoint_uri, CONFIG_FILE)
    storage.put_text(cfg.to_json(), uri)
    return uri


def cache_dir(cfg: RunConfig) -> Path:
    return cache_root(cfg.train.cache_dir)


def train(
    cfg: RunConfig, data_bin: str | Path, checkpoint_uri: str | Path, *, tracking_uri: str = "", mlflow_run_id: str = "",
    pipeline_run_id: str = "",
) -> dict[str, Any]:
    """Train to the end of the config's schedule (resuming what the checkpoint location holds); the summary."""
    cfg = cfg.resolve_launcher(os.environ)
    data_bin, checkpoint_uri = _absolute(data_bin), _absolute(checkpoint_uri)
    preflight(cfg, data_bin, checkpoint_uri, tracking_uri=tracking_uri if mlflow_run_id else None)
    resumable = checkpoints.read_manifest(checkpoint_uri)["checkpoints"]
    if resumable:
        log.info("resuming: %s holds %s", checkpoint_uri, ", ".join(sorted(resumable)))
    config_uri = write_config(cfg, checkpoint_uri)
    from lmforge.training.launchers import pytorchjob

    run = pipeline_run_id or checkpoint_uri  # the job's name: the same for every attempt of the step
    if cfg.train.launcher == "pytorchjob":
        if tracking.is_local_store(tracking_uri):
            # a file on this pod's disk: the training pods log to MLFLOW_TRACKING_URI of cluster.mlflow_secret
            tracking_uri = ""
        args = worker_args(config_uri, data_bin, checkpoint_uri, tracking_uri=tracking_uri, mlflow_run_id=mlflow_run_id)
        pytorchjob.launch(cfg, args, job_name=pytorchjob.job_name(run), run=run)
    else:
        from lmforge.training.launchers import local

        args = worker_args(config_uri, data_bin, checkpoint_uri, tracking_uri=tracking_uri, mlflow_run_id=mlflow_run_id)
        local.launch(cfg, args, cache_dir=cache_dir(cfg), job_name=pytorchjob.job_name(run))
    return checkpoints.summary(checkpoint_uri)


def dry_run(cfg: RunConfig, data_bin: str | Path, checkpoint_uri: str | Path) -> dict[str, Any]:
    """Preflight (the data-bin's files checked), then fairseq's batching of one epoch, the model as
    built (parameters, shapes) and one forward/backward pass here; nothing is saved. The report's
    "resume" says which checkpoint training would resume from and which it would pass over, and why."""
    cfg = cfg.resolve_launcher(os.environ)
    data_bin, checkpoint_uri = _absolute(data_bin), _absolute(checkpoint_uri)
    preflight(cfg, data_bin, checkpoint_uri)
    import torch

    cuda = torch.cuda.is_available()
    world = cfg.train.world_size()
    local_data = stage_data(data_bin, cache_dir(cfg))
    with tempfile.TemporaryDirectory(prefix="lmforge-dry-run-") as tmp:
        # placed as rank 0 of the job, but single-process: the batching below shards for `world`
        argv = train_args(cfg, str(local_data), tmp, Placement(cuda=cuda))
        report = fairseq_api.dry_run(argv, world_size=world, update_freq=cfg.train.update_freq)
    resume = checkpoints.resume_plan(checkpoint_uri)
    report.update({
        "launcher": cfg.train.launcher, "processes": world, "data_bin": data_bin, "checkpoints": checkpoint_uri,
        "resume": resume,
    })
    if cfg.train.max_update:
        report["epochs_for_max_update"] = round(cfg.train.max_update / max(report["updates_per_epoch"], 1), 2)
    for skipped in resume["passed_over"]:
        log.warning("dry run: training would pass over %s: %s", storage.join(checkpoint_uri, skipped["name"]),
                    skipped["reason"])
    if resume["from"]:
        log.info("dry run: training would resume from %s (%d updates)", storage.join(checkpoint_uri, resume["from"]),
                 resume["num_updates"])
    else:
        log.info("dry run: training would start from scratch (no checkpoint at %s loads)", checkpoint_uri)
    model = report["model"]
    log.info("dry run: model of %s parameters: embed_tokens %s, %d layers, widths %s, projections %s",
             f"{report['parameters']:,}", model["embed_tokens"], model["layers"], model["widths"],
             model["projections"] or "none")
    log.info("dry run: %s", json.dumps(report))
    return report
