"""The evaluate stage: loss and perplexity of a checkpoint on a held-out split.

In: the run config (evaluation settings), a data-bin directory and a
checkpoint. Out: loss (base 2 and nats), perplexity, tokens scored and
tokens/s, computed by fairseq's own eval-lm logic, so the numbers equal
`fairseq-eval-lm` with the same settings.

    lmforge evaluate --config tiny.yaml --data-bin DIR --checkpoint FILE
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from lmforge.config import RunConfig
from lmforge.errors import LmforgeError
from lmforge.fairseq_args import eval_lm_args


def evaluate(cfg: RunConfig, data_dir: str | Path, checkpoint: str | Path) -> dict[str, Any]:
    import torch

    from lmforge import fairseq_api

    data_dir, checkpoint = Path(data_dir), Path(checkpoint)
    if not checkpoint.is_file():
        raise LmforgeError(f"checkpoint {checkpoint} does not exist; pass the train step's checkpoint_best.pt")
    split = cfg.evaluate.split
    if not (data_dir / f"{split}.bin").is_file() or not (data_dir / "dict.txt").is_file():
        raise LmforgeError(f"{data_dir} lacks dict.txt or {split}.bin; point --data-bin at the preprocess output")
    result = fairseq_api.eval_lm(eval_lm_args(cfg, str(data_dir), str(checkpoint), cuda=torch.cuda.is_available()))
    return {
        "split": split,
        "loss_base2": result["loss"],
        "loss": result["loss"] * math.log(2),
        "perplexity": result["perplexity"],
        "tokens": result["tokens"],
        "tokens_per_second": result["tokens"] / result["seconds"] if result["seconds"] > 0 else 0.0,
        "context_window": cfg.evaluate.context_window,
        "tokens_per_sample": cfg.evaluate.tokens_per_sample or cfg.train.tokens_per_sample,
    }
