"""The training modes that change how 2 processes update one model, run for real on CPU: BMUF
(replicas train apart and meet every few updates) and gradient accumulation (update_freq 4).
`lmforge train` must log, update by update, the very losses bare fairseq-train logs when torchrun
starts it with the argument list lmforge's own builder makes (`fairseq_api.arguments.train_args`),
on the same data-bin with the same seed."""

import re
import subprocess
import sys

import pytest

from conftest import bare_config_file, lmforge_cli, train_inner_losses
from lmforge import config
from lmforge.fairseq_api.arguments import Placement, train_args
from lmforge.training.train import CONFIG_FILE

#: The tiny preset, 2 processes, 64-token samples, a loss logged at every update.
TWO_PROCESSES = ["model.preset=tiny", "train.nproc=2", "train.tokens_per_sample=64", "train.max_epoch=0",
                 "train.log_interval=1", "train.warmup_updates=5"]
MODES = {
    # fairseq's defaults (a 500-update warm-up, a sync every 50) would never sync in a short run:
    # the replicas take rank 0's model at update 10 (the warm-up's end), then meet every 5 updates
    "bmuf": ["train.bmuf=true", "train.extra_args.global_sync_iter=5", "train.extra_args.warmup_iterations=10",
             "train.max_tokens=256", "train.max_update=30"],
    # 4 batches of 128 tokens on each process per update: 1,024 tokens an update
    "update_freq_4": ["train.update_freq=4", "train.max_tokens=128", "train.max_update=16"],
}
#: What each mode puts on fairseq's command line.
MODE_FLAGS = {"bmuf": "--use-bmuf", "update_freq_4": "--update-freq 4"}


def lmforge_train(capfd, data_bin, base, checkpoints, overrides):
    settings = [x for o in (*TWO_PROCESSES, *overrides, f"train.cache_dir={base / 'cache'}") for x in ("--set", o)]
    return lmforge_cli(capfd, "train", "--config", str(bare_config_file(base)), "--data-bin", str(data_bin),
                       "--checkpoints", str(checkpoints), *settings)


def bare_fairseq_train(argv: list[str]) -> str:
    """python -m fairseq_cli.train under torchrun with 2 processes: `argv` is rank 0's, each process
    appends its own --distributed-rank from torchrun's RANK (argparse keeps the last). Its log (fairseq
    logs to stdout)."""
    rank_from_torchrun = 'exec "$0" -m fairseq_cli.train "$@" --distributed-rank "$RANK"'
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc-per-node", "2",
               "--no-python", "sh", "-c", rank_from_torchrun, sys.executable, *argv]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("mode", sorted(MODES))
def test_two_process_mode_logs_what_bare_fairseq_train_logs(mode, fast_data_bin, tmp_path, capfd):
    summary, log = lmforge_train(capfd, fast_data_bin, tmp_path, tmp_path / "ckpt", MODES[mode])
    ours = train_inner_losses(log)
    updates = config.load(bare_config_file(tmp_path), [*TWO_PROCESSES, *MODES[mode]]).train.max_update
    assert summary["num_updates"] == updates and sorted(ours) == list(range(1, updates + 1))

    # the argument list from lmforge's builder, for the config the workers read; the worker logged it
    cfg = config.from_json((tmp_path / "ckpt" / CONFIG_FILE).read_text())
    logged = re.search(r"rank 0/2: fairseq-train (.*)", log).group(1)
    worker_save_dir = re.search(r"--save-dir (\S+)", logged).group(1)
    assert logged == " ".join(train_args(cfg, str(fast_data_bin), worker_save_dir, Placement(world_size=2, rank=0)))
    assert MODE_FLAGS[mode] in logged
    bare = bare_fairseq_train(train_args(cfg, str(fast_data_bin), str(tmp_path / "bare"), Placement(world_size=2, rank=0)))
    theirs = train_inner_losses(bare)

    assert ours == theirs, "the same losses, to the precision fairseq prints"
    assert float(ours[updates]) < float(ours[1])
    if mode == "bmuf":
        # fairseq sums the replicas' statistics only at the block syncs after the warm-up (every 5th
        # update past the 10th); elsewhere rank 0 logs its own 256 tokens: BMUF was in effect
        words = train_inner_losses(log, key="wpb")
        assert [n for n in ours if words[n] == "512"] == [15, 20, 25, 30], words
    print(f"\n{mode}: {updates} updates, loss {ours[1]} -> {ours[updates]} in both; lmforge {ours}")

