"""The evaluate stage: the config's task scores a checkpoint on held-out splits.

In: the run config (task and evaluation settings), a data-bin directory and a checkpoint
(local paths, file:// or s3:// URIs). Out: for `evaluate.split` (the gate split, "test" by
default) and each of `evaluate.other_splits`: the task's metrics (language modeling: loss
base 2 and nats, perplexity, tokens, tokens/s, computed by fairseq's own eval-lm code, see
`lmforge.tasks.language_modeling`); plus the evaluation's identity (what the number depends
on besides the model) and its digest. Two results are comparable only when their identities
are equal. The result is what the register step and the promotion gate read.

    lmforge evaluate --config tiny.yaml --data-bin DIR --checkpoint FILE [--out metrics.json]
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from lmforge import tasks
from lmforge.config import RunConfig
from lmforge.data import integrity
from lmforge.errors import LmforgeError
from lmforge.io import storage
from lmforge.tasks.base import Task


def identity_sha256(identity: dict[str, Any]) -> str:
    """The identity's digest: sha256 of its canonical JSON."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def check_inputs(task: Task, data_dir: Path, checkpoint: Path, splits: list[str]) -> None:
    """Every file the evaluation reads is there and readable by fairseq (lmforge.data.integrity):
    one error naming each problem, before fairseq starts."""
    if not checkpoint.is_file():
        raise LmforgeError(f"checkpoint {checkpoint} does not exist; pass the train step's checkpoint_best.pt")
    names = [p.relative_to(data_dir).as_posix() for p in data_dir.rglob("*") if p.is_file()]
    problems = task.data_problems(str(data_dir), names, splits)
    if not problems:
        problems = integrity.data_bin_problems(data_dir, [f for s in splits for f in task.split_files(s)],
                                               task.dictionary)
    problem = integrity.checkpoint_problem(checkpoint)
    if problem:
        problems.append(problem)
    if problems:
        raise LmforgeError("cannot evaluate: " + "; ".join(problems))


def evaluate(cfg: RunConfig, data_dir: str | Path, checkpoint: str | Path) -> dict[str, Any]:
    """Score the gate split and the other splits; returns the gate split's numbers at the top
    level, every split's under "splits", and the identity (with its digest)."""
    from lmforge.io.staging import fetched_dir, fetched_file

    task = tasks.get(cfg.task)
    splits = [cfg.evaluate.split] + [s for s in cfg.evaluate.other_splits if s != cfg.evaluate.split]
    with fetched_dir(data_dir) as data, fetched_file(checkpoint) as ckpt:
        check_inputs(task, data, ckpt, splits)
        identity = task.evaluation_identity(cfg, data)
        results = {split: task.evaluate_split(cfg, data, ckpt, split) for split in splits}
    primary = results[cfg.evaluate.split]
    return {
        "split": cfg.evaluate.split,
        **primary,
        "splits": results,
        "identity": identity,
        "identity_sha256": identity_sha256(identity),
    }


def mlflow_metrics(task: Task, result: dict[str, Any]) -> dict[str, float]:
    """`eval_<split>_<metric>` for every split scored and every metric of the task. The prefix keeps
    them apart from training's own `valid_loss`, which is fairseq's base-2 loss per epoch."""
    return {f"eval_{split}_{k}": float(v[k]) for split, v in result["splits"].items() for k in task.metrics}


def write_metrics(result: dict[str, Any], path: str | Path) -> None:
    """metrics.json at a local path or a storage URI, atomically (storage.put_text)."""
    storage.put_text(json.dumps(result, indent=2, sort_keys=True) + "\n", path)


def read_metrics(path: str | Path, task: str = tasks.DEFAULT) -> dict[str, Any]:
    """A metrics.json written by `write_metrics` (what `lmforge register --metrics` reads)."""
    metric = tasks.get(task).gate_metric.name
    path = Path(path)
    try:
        result = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise LmforgeError(f"cannot read evaluation metrics {path} ({exc.__class__.__name__}); "
                           "pass the metrics.json `lmforge evaluate --out` wrote") from None
    if not isinstance(result, dict) or not {metric, "identity", "split"} <= set(result):
        raise LmforgeError(f"{path} is not an lmforge evaluation (no {metric}/identity); run `lmforge evaluate --out`")
    return result
