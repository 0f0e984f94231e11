"""The evaluate stage: loss and perplexity of a checkpoint on held-out splits, and what they mean.

In: the run config (evaluation settings), a data-bin directory and a checkpoint (local
paths, file:// or s3:// URIs). Out: for `evaluate.split` (the gate split, "test" by default)
and each of `evaluate.other_splits`: loss (base 2 and nats), perplexity, tokens scored and
tokens/s, computed by fairseq's own eval-lm code (`fairseq_cli.eval_lm.main` in this
process), so the numbers equal `fairseq-eval-lm` with the same settings; plus the
evaluation's identity: the dictionary's and the scored split's sha256 and every setting
that changes the number. Two perplexities are comparable only when their identities are
equal (a different dictionary or context window changes perplexity without the model
changing; see fairseq issue #2124).

    lmforge evaluate --config tiny.yaml --data-bin DIR --checkpoint FILE [--out metrics.json]
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

from lmforge.config import RunConfig
from lmforge.errors import LmforgeError
from lmforge.fairseq_api.arguments import eval_lm_args
from lmforge.io import storage
from lmforge.io.hashing import file_sha256, files_sha256

#: Numbers reported per split, as MLflow metrics and KFP Metrics `eval_<split>_<name>` (the prefix
#: keeps them apart from training's own `valid_loss`, which is fairseq's base-2 loss per epoch).
METRICS = ("loss", "loss_base2", "perplexity", "tokens", "tokens_per_second")


def split_sha256(data_dir: Path, split: str) -> str:
    """sha256 of a binarized split: its `.idx` (sentence boundaries) then its `.bin` (token ids)."""
    return files_sha256([data_dir / f"{split}.idx", data_dir / f"{split}.bin"])


def evaluation_identity(cfg: RunConfig, data_dir: str | Path) -> dict[str, Any]:
    """What a perplexity depends on besides the model: the text scored, its ids, the settings.

    max_tokens is left out on purpose: batching does not change eval-lm's numbers
    (sample_break_mode none; the context window carries over from batch to batch).
    """
    data_dir = Path(data_dir)
    e = cfg.evaluate
    return {
        "scorer": "fairseq-eval-lm",
        "split": e.split,
        "split_sha256": split_sha256(data_dir, e.split),
        "dict_sha256": file_sha256(data_dir / "dict.txt"),
        "tokens_per_sample": e.tokens_per_sample or cfg.train.tokens_per_sample,
        "context_window": e.context_window,
        "sample_break_mode": "none",
    }


def identity_sha256(identity: dict[str, Any]) -> str:
    """The identity's digest: sha256 of its canonical JSON."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def check_inputs(data_dir: Path, checkpoint: Path, splits: list[str]) -> None:
    if not checkpoint.is_file():
        raise LmforgeError(f"checkpoint {checkpoint} does not exist; pass the train step's checkpoint_best.pt")
    if not (data_dir / "dict.txt").is_file():
        raise LmforgeError(
            f"checkpoint without its dictionary: {data_dir / 'dict.txt'} does not exist; "
            "point --data-bin at the preprocess output the model was trained on"
        )
    for split in splits:
        if not (data_dir / f"{split}.bin").is_file() or not (data_dir / f"{split}.idx").is_file():
            raise LmforgeError(f"{data_dir} lacks {split}.bin/.idx; point --data-bin at the preprocess output")


def evaluate(cfg: RunConfig, data_dir: str | Path, checkpoint: str | Path) -> dict[str, Any]:
    """Score the gate split and the other splits; returns the gate split's numbers at the top
    level, every split's under "splits", and the identity (with its digest)."""
    from lmforge.io.staging import fetched_dir, fetched_file

    splits = [cfg.evaluate.split] + [s for s in cfg.evaluate.other_splits if s != cfg.evaluate.split]
    with fetched_dir(data_dir) as data, fetched_file(checkpoint) as ckpt:
        check_inputs(data, ckpt, splits)
        identity = evaluation_identity(cfg, data)
        results = {split: evaluate_split(cfg, data, ckpt, split) for split in splits}
    primary = results[cfg.evaluate.split]
    return {
        "split": cfg.evaluate.split,
        **primary,
        "splits": results,
        "identity": identity,
        "identity_sha256": identity_sha256(identity),
    }


def evaluate_split(cfg: RunConfig, data_dir: Path, checkpoint: Path, split: str) -> dict[str, Any]:
    import torch

    from lmforge import fairseq_api

    args = eval_lm_args(cfg, str(data_dir), str(checkpoint), split=split, cuda=torch.cuda.is_available())
    result = fairseq_api.eval_lm(args)
    return {
        "loss_base2": result["loss"],
        "loss": result["loss"] * math.log(2),
        "perplexity": result["perplexity"],
        "tokens": result["tokens"],
        "tokens_per_second": result["tokens_per_second"],
        "seconds": result["seconds"],
    }


def mlflow_metrics(result: dict[str, Any]) -> dict[str, float]:
    """`eval_<split>_<metric>` for every split scored."""
    return {f"eval_{split}_{k}": float(v[k]) for split, v in result["splits"].items() for k in METRICS}


def write_metrics(result: dict[str, Any], path: str | Path) -> None:
    """metrics.json at a local path or a storage URI, atomically (storage.put_text)."""
    storage.put_text(json.dumps(result, indent=2, sort_keys=True) + "\n", path)


def read_metrics(path: str | Path) -> dict[str, Any]:
    """A metrics.json written by `write_metrics` (what `lmforge register --metrics` reads)."""
    path = Path(path)
    try:
        result = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise LmforgeError(f"cannot read evaluation metrics {path} ({exc.__class__.__name__}); "
                           "pass the metrics.json `lmforge evaluate --out` wrote") from None
    if not isinstance(result, dict) or not {"perplexity", "identity", "split"} <= set(result):
        raise LmforgeError(f"{path} is not an lmforge evaluation (no perplexity/identity); run `lmforge evaluate --out`")
    return result
