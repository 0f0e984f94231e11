"""The evaluate stage against the real fairseq-eval-lm CLI on the same checkpoint and settings."""

import math
import re
import subprocess

import pytest

from conftest import TINY_CONFIG, VENV_BIN
from lmforge import config
from lmforge.errors import LmforgeError
from lmforge.evaluate import evaluate
from lmforge.fairseq_args import eval_lm_args


def fairseq_eval_lm(args: list[str]) -> tuple[float, float]:
    out = subprocess.run([str(VENV_BIN / "fairseq-eval-lm"), *args], capture_output=True, text=True, check=True)
    match = re.search(r"Loss \(base 2\): ([0-9.]+), Perplexity: ([0-9.]+)", out.stdout + out.stderr)
    return float(match.group(1)), float(match.group(2))


@pytest.mark.parametrize("overrides", [[], ["evaluate.context_window=64"]], ids=["blocks", "context-window"])
def test_numbers_equal_fairseq_eval_lm(trained_checkpoints, small_data_bin, overrides):
    save_dir, _ = trained_checkpoints
    cfg = config.load(TINY_CONFIG, overrides)
    checkpoint = save_dir / "checkpoint_best.pt"
    ours = evaluate(cfg, small_data_bin, checkpoint)
    loss, ppl = fairseq_eval_lm(eval_lm_args(cfg, str(small_data_bin), str(checkpoint)))
    assert ours["loss_base2"] == pytest.approx(loss, abs=1e-4)  # the CLI prints 4 decimals
    assert ours["perplexity"] == pytest.approx(ppl, abs=0.01)
    assert ours["loss"] == pytest.approx(ours["loss_base2"] * math.log(2))
    assert ours["tokens"] > 1000 and ours["tokens_per_second"] > 0


def test_context_window_changes_the_result(trained_checkpoints, small_data_bin):
    save_dir, _ = trained_checkpoints
    checkpoint = save_dir / "checkpoint_best.pt"
    plain = evaluate(config.load(TINY_CONFIG), small_data_bin, checkpoint)
    windowed = evaluate(config.load(TINY_CONFIG, ["evaluate.context_window=64"]), small_data_bin, checkpoint)
    assert plain["tokens"] == windowed["tokens"]  # every token scored once either way
    assert windowed["loss_base2"] != pytest.approx(plain["loss_base2"], abs=1e-6)


def test_missing_checkpoint_is_a_user_error(small_data_bin, tmp_path):
    with pytest.raises(LmforgeError, match="does not exist"):
        evaluate(config.load(TINY_CONFIG), small_data_bin, tmp_path / "nope.pt")
