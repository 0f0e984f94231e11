"""The train stage: fairseq training of the configured model, launched as configured.

In: the run config, a data-bin directory (dict.txt and mmap splits) and a
checkpoint directory. Out: checkpoint_best.pt and checkpoint_last.pt in the
checkpoint directory and a summary (epochs, updates, best validation loss).
Re-running with the same checkpoint directory resumes from checkpoint_last.pt.

    lmforge train --config tiny.yaml --data-bin DIR --checkpoints DIR
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from lmforge.config import RunConfig
from lmforge.errors import LmforgeError
from lmforge.launchers import local

log = logging.getLogger(__name__)

CONFIG_FILE = "run-config.json"


def worker_args(config_file: Path, data_dir: Path, save_dir: Path, tracking_uri: str, mlflow_run_id: str) -> list[str]:
    return [
        "--config", str(config_file), "--data", str(data_dir), "--save-dir", str(save_dir),
        "--tracking-uri", tracking_uri, "--mlflow-run-id", mlflow_run_id,
    ]


def train(
    cfg: RunConfig, data_dir: str | Path, save_dir: str | Path, *, tracking_uri: str = "", mlflow_run_id: str = ""
) -> dict[str, Any]:
    data_dir, save_dir = Path(data_dir).resolve(), Path(save_dir).resolve()
    if not (data_dir / "dict.txt").is_file():
        raise LmforgeError(f"{data_dir} has no dict.txt; point --data-bin at the preprocess step's output")
    save_dir.mkdir(parents=True, exist_ok=True)
    if (save_dir / "checkpoint_last.pt").is_file():
        log.info("resuming from %s", save_dir / "checkpoint_last.pt")
    # The workers read the config from a file: a JSON argument would be mangled by shells and log lines.
    config_file = save_dir / CONFIG_FILE
    config_file.write_text(cfg.to_json())
    local.launch(cfg.train.nproc, worker_args(config_file, data_dir, save_dir, tracking_uri, mlflow_run_id))
    return summarize(save_dir)


def summarize(save_dir: Path) -> dict[str, Any]:
    """What training reached, read back from fairseq's own checkpoint state."""
    import torch

    best, last = save_dir / "checkpoint_best.pt", save_dir / "checkpoint_last.pt"
    if not best.is_file() or not last.is_file():
        raise LmforgeError(f"training ended without checkpoints in {save_dir}; check max_epoch/max_update")
    state = torch.load(last, map_location="cpu", weights_only=False)
    extra = state.get("extra_state", {})
    return {
        "checkpoint_best": str(best),
        "checkpoint_last": str(last),
        # fairseq stores the epoch to run next (or the one in progress), so completed = epoch - 1
        "epochs": max(int(extra.get("train_iterator", {}).get("epoch", 1)) - 1, 0),
        "num_updates": int(state["optimizer_history"][-1]["num_updates"]),
        "best_valid_loss": float(extra["best"]) if extra.get("best") is not None else None,
    }
