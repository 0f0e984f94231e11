"""lmforge.fairseq_api.calls against real fairseq on CPU: its registries, its parser's refusals,
eval-lm on a tiny trained model, the dry run's epoch arithmetic, and the training hooks."""

import math

import pytest

from conftest import FAST_TRAINING, TINY_CONFIG
from lmforge import config, fairseq_api
from lmforge.errors import LmforgeError
from lmforge.fairseq_api.arguments import train_args
from lmforge.fairseq_api.calls import SaveEvent
from lmforge.training.distributed import Placement


def split_tokens(data_bin, split):
    """Tokens (eos included) of a binarized split, as fairseq reads them."""
    from fairseq.data.indexed_dataset import MMapIndexedDataset

    dataset = MMapIndexedDataset(str(data_bin / split))
    return int(dataset.sizes.sum())  # summed while `dataset` holds the mmap that `sizes` views


def test_architectures_and_criteria_are_fairseqs_registries():
    known = {"transformer_lm", "transformer_lm_gpt2_small", "transformer_lm_wiki103", "lstm_lm"}
    assert known <= fairseq_api.architectures()
    assert {"cross_entropy", "adaptive_loss", "label_smoothed_cross_entropy"} <= fairseq_api.criteria()
    assert "no_such_arch" not in fairseq_api.architectures()


def test_check_train_args_accepts_lmforges_arguments():
    fairseq_api.check_train_args(train_args(config.load(TINY_CONFIG), "/data", "/ckpt"))


@pytest.mark.parametrize("extra, named", [
    (["--no-such-option", "3"], "unrecognized arguments: --no-such-option 3"),
    (["--lr", "fast"], "argument --lr: invalid"),
    (["--arch", "no_such_lm"], "argument --arch/-a: invalid choice: 'no_such_lm'"),
])
def test_check_train_args_refuses_a_bad_argument_naming_the_option(extra, named):
    argv = train_args(config.load(TINY_CONFIG), "/data", "/ckpt") + extra
    with pytest.raises(LmforgeError) as info:
        fairseq_api.check_train_args(argv)
    message = str(info.value)
    assert message.startswith("fairseq rejected the arguments: ") and named in message
    assert "\n" not in message and len(message) < 300, "one line, without argparse's usage or list of choices"


def test_eval_lm_scores_every_token_of_the_split(tiny_lm):
    # --tokens-per-sample 64: the tiny model's max positions
    argv = [str(tiny_lm.data_bin), "--task", "language_modeling", "--path", str(tiny_lm.checkpoint),
            "--gen-subset", "valid", "--tokens-per-sample", "64", "--context-window", "32", "--max-tokens", "512",
            "--sample-break-mode", "none", "--cpu"]
    result = fairseq_api.eval_lm(argv)
    assert result["tokens"] == split_tokens(tiny_lm.data_bin, "valid") > 0
    vocab = sum(1 for _ in tiny_lm.dict_path.open()) + 4
    # 5 updates: better than nothing, nowhere near good (uniform over the vocabulary: log2(vocab) bits)
    assert 0 < result["loss"] < 2 * math.log2(vocab)
    assert result["perplexity"] == pytest.approx(2 ** result["loss"], rel=1e-4)
    assert 0 < result["scoring_seconds"] <= result["seconds"]
    # fairseq prints the seconds with 1 decimal ("in 0.3s") and the rate with 2: they agree to that rounding
    assert result["tokens"] / result["tokens_per_second"] == pytest.approx(result["scoring_seconds"], abs=0.051)


def test_dry_run_reports_updates_per_epoch_from_fairseqs_batching(fast_data_bin, tmp_path):
    cfg = config.load(TINY_CONFIG, [*FAST_TRAINING, "train.max_update=12"])
    argv = train_args(cfg, str(fast_data_bin), str(tmp_path), Placement())
    alone = fairseq_api.dry_run(argv, world_size=1, update_freq=1)
    shared = fairseq_api.dry_run(argv, world_size=2, update_freq=2)
    assert alone["train_tokens"] == shared["train_tokens"] == split_tokens(fast_data_bin, "train")
    assert alone["updates_per_epoch"] == alone["batches_per_process"] > 1
    # two processes share the epoch's batches (fairseq pads the shorter shard); two batches per update
    assert shared["batches_per_process"] == math.ceil(alone["batches_per_process"] / 2)
    assert shared["updates_per_epoch"] == math.ceil(shared["batches_per_process"] / 2)
    assert alone["max_tokens_per_update"] == 1024 and shared["max_tokens_per_update"] == 1024 * 2 * 2
    assert 0 < alone["tokens_per_update"] <= 1024
    assert alone["parameters"] == shared["parameters"] > 0
    assert alone["batch"]["device"] == "cpu" and math.isfinite(alone["batch"]["loss_base2"])
    assert not any(tmp_path.iterdir()), "a dry run saves nothing"


def test_train_calls_back_after_each_save_and_stops_when_asked(fast_data_bin, tmp_path):
    """The two hooks fairseq lacks: after a save (every 2 updates here) and a stop after update 3."""
    cfg = config.load(TINY_CONFIG, [*FAST_TRAINING, "train.max_update=50", "train.save_interval_updates=2"])
    argv = train_args(cfg, str(fast_data_bin), str(tmp_path), Placement()) + ["--num-workers", "0"]
    events: list[SaveEvent] = []
    asked = []

    def stop_requested() -> bool:
        asked.append(1)
        return len(asked) >= 3

    fairseq_api.train(argv, on_checkpoint=events.append, stop_requested=stop_requested)
    assert len(asked) == 3, "asked once per update, and training ended at the first yes"
    assert [e.num_updates for e in events] == [2, 3], "the interval save at 2, the stop's save at 3"
    assert (tmp_path / "checkpoint_last.pt").is_file()
