"""The train stage for real: torchrun with 2 CPU processes over gloo."""

import pytest

from conftest import TINY_CONFIG
from lmforge import config
from lmforge.errors import LmforgeError
from lmforge.train import train


def test_training_writes_best_and_last_checkpoints(trained_checkpoints):
    save_dir, summary = trained_checkpoints
    assert summary["num_updates"] == 12
    assert (save_dir / "checkpoint_best.pt").is_file() and (save_dir / "checkpoint_last.pt").is_file()
    assert summary["best_valid_loss"] is not None and summary["best_valid_loss"] > 0
    assert not list(save_dir.glob("checkpoint[0-9]*.pt")), "only best and last are kept"


def test_two_processes_trained_together(trained_checkpoints):
    import torch

    save_dir, _ = trained_checkpoints
    state = torch.load(save_dir / "checkpoint_last.pt", map_location="cpu", weights_only=False)
    assert state["cfg"]["distributed_training"]["distributed_world_size"] == 2


def test_rerun_resumes_from_last_checkpoint(trained_checkpoints, small_data_bin, tmp_path, capfd):
    import shutil

    save_dir, _ = trained_checkpoints
    resumed_dir = tmp_path / "checkpoints"
    shutil.copytree(save_dir, resumed_dir)
    cfg = config.load(TINY_CONFIG, ["train.max_update=16", "train.max_epoch=0", "train.nproc=1"])
    capfd.readouterr()
    summary = train(cfg, small_data_bin, resumed_dir)
    output = "".join(capfd.readouterr())  # the worker processes' own log lines
    assert summary["num_updates"] == 16
    # fairseq says where it restarted from; a fresh start would say it found no checkpoint
    assert "@ 12 updates)" in output and "Loaded checkpoint" in output


def test_missing_dictionary_is_a_user_error(tmp_path):
    cfg = config.load(TINY_CONFIG)
    with pytest.raises(LmforgeError, match="dict.txt"):
        train(cfg, tmp_path, tmp_path / "ckpt")
