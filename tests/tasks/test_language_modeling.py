"""lmforge.tasks.language_modeling: the task's pieces on their own (no fairseq run).

The evaluation against the real fairseq-eval-lm CLI is in tests/models/test_evaluate.py; the
registered pyfunc against fairseq's hub in tests/models/test_scoring.py.
"""

from __future__ import annotations

import hashlib
import math

import pytest

from conftest import TINY_CONFIG as TINY
from lmforge import config
from lmforge.tasks.language_modeling import TASK, split_sha256


def value_after(args, flag):
    return args[args.index(flag) + 1]


def test_train_args_are_the_task_and_its_sampling():
    cfg = config.load(TINY, ["train.tokens_per_sample=96", "train.sample_break_mode=eos"])
    assert TASK.train_args(cfg) == ["--task", "language_modeling", "--tokens-per-sample", "96", "--sample-break-mode", "eos"]


def test_the_default_criterion_is_cross_entropy_and_a_named_one_wins():
    assert TASK.default_criterion == "cross_entropy"
    assert TASK.criterion(config.load(TINY, ["model.criterion="])) == "cross_entropy"
    cfg = config.load(TINY, ["model.criterion=adaptive_loss", "model.options.adaptive_softmax_cutoff=1000,3000"])
    assert TASK.criterion(cfg) == "adaptive_loss"


def test_eval_args_follow_the_config():
    cfg = config.load(TINY, ["evaluate.context_window=32", "evaluate.tokens_per_sample=96"])
    args = TASK.eval_args(cfg, "/d", "/c/best.pt")
    assert args[0] == "/d" and value_after(args, "--task") == "language_modeling"
    assert value_after(args, "--path") == "/c/best.pt"
    assert value_after(args, "--gen-subset") == "test"
    assert value_after(args, "--context-window") == "32"
    assert value_after(args, "--tokens-per-sample") == "96"
    assert value_after(args, "--sample-break-mode") == "none" and "--cpu" in args
    plain = TASK.eval_args(config.load(TINY), "/d", "/c/best.pt", split="valid", cuda=True)
    assert value_after(plain, "--tokens-per-sample") == "128"  # falls back to train.tokens_per_sample
    assert value_after(plain, "--gen-subset") == "valid"
    assert "--cpu" not in plain


def test_data_layout_is_dict_and_a_bin_idx_pair_per_split():
    assert TASK.dictionary == "dict.txt"
    assert TASK.split_files("valid") == ("valid.bin", "valid.idx")
    complete = ["dict.txt", "train.bin", "train.idx", "valid.bin", "valid.idx", "summary.json"]
    assert TASK.data_problems("D", complete, ("train", "valid")) == []
    assert TASK.data_problems("D", [n for n in complete if n != "valid.idx"], ("train", "valid")) == [
        "D has no valid.bin/valid.idx; preprocess the valid split"
    ]
    # Without the dictionary nothing else is worth saying.
    (only,) = TASK.data_problems("D", [n for n in complete if n != "dict.txt"] + ["test.bin"], ("train", "test"))
    assert only.startswith("D has no dict.txt (a checkpoint without its dictionary")


def test_the_gate_compares_perplexity_lower_is_better():
    metric = TASK.gate_metric
    assert (metric.name, metric.tag, metric.lower_is_better) == ("perplexity", "eval_perplexity", True)
    assert metric.beats(40.0, 50.0) and not metric.beats(50.0, 50.0) and not metric.beats(60.0, 50.0)
    assert not metric.beats(math.nan, 50.0)  # NaN is never promoted
    assert "perplexity" in TASK.metrics and "loss_base2" in TASK.metrics


def fake_data_bin(root, test_bin: bytes = b"\x01\x02\x03\x04"):
    root.mkdir(parents=True, exist_ok=True)
    (root / "dict.txt").write_text("the 5\ncat 2\n")
    (root / "test.idx").write_bytes(b"MMIDIDX\x00\x00")
    (root / "test.bin").write_bytes(test_bin)
    return root


def test_evaluation_identity_names_scorer_split_dictionary_and_settings(tmp_path):
    data = fake_data_bin(tmp_path / "bin")
    identity = TASK.evaluation_identity(config.load(TINY, ["evaluate.context_window=64"]), data)
    assert identity == {
        "scorer": "fairseq-eval-lm",
        "split": "test",
        "split_sha256": hashlib.sha256((data / "test.idx").read_bytes() + (data / "test.bin").read_bytes()).hexdigest(),
        "dict_sha256": hashlib.sha256((data / "dict.txt").read_bytes()).hexdigest(),
        "tokens_per_sample": 128,
        "context_window": 64,
        "sample_break_mode": "none",
    }
    # Batching does not change eval-lm's numbers: max_tokens is not part of it; the scored ids are.
    assert TASK.evaluation_identity(config.load(TINY, ["evaluate.context_window=64", "evaluate.max_tokens=7"]),
                                    data) == identity
    other = fake_data_bin(tmp_path / "other", test_bin=b"\x01\x02\x03\x05")
    assert split_sha256(other, "test") != identity["split_sha256"]


def test_evaluation_note_says_what_was_measured():
    evaluation = {"perplexity": 123.456, "identity_sha256": "f" * 64,
                  "identity": {"split": "test", "tokens_per_sample": 128, "context_window": 0}}
    assert TASK.evaluation_note(evaluation) == (
        "test perplexity 123.5 (fairseq-eval-lm, tokens_per_sample 128, context_window 0, identity ffffffffffff)."
    )


@pytest.mark.slow
def test_the_pyfunc_is_the_scoring_language_model():
    from lmforge.models.scoring import FairseqLanguageModel, model_signature

    pyfunc = TASK.pyfunc()
    assert type(pyfunc.python_model) is FairseqLanguageModel
    assert pyfunc.signature == model_signature()
    assert pyfunc.input_example == ["the cat sat on the mat", ""]
