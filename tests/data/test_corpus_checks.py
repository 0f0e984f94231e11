"""Corpora that cannot train are refused at the data stages, in one line that names the split and its numbers.

`lmforge preprocess` runs in this process (lmforge.cli.main); the pipeline's stages run as its KFP
tasks call them (lmforge.steps); `lmforge run` on an empty corpus runs the real DAG on KFP's local
runner. Every corpus here is generated and small.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lmforge import config, steps
from lmforge.cli import main
from lmforge.data import corpus_checks, stages
from lmforge.data.corpus_checks import CorpusError, SplitCounts, TrainingShape
from lmforge.data.download import download_corpus
from lmforge.data.preprocess import preprocess
from lmforge.data.tokenization import load_tokenizer
from lmforge.errors import LmforgeError

from conftest import REPO, TINY_CONFIG

WORDS = [f"w{i}" for i in range(60)]


def english_like(n_lines: int, seed: int, words: list[str] = WORDS, per_line: int = 10) -> str:
    """Lines of `per_line` words drawn from `words` (with 500 lines, each of 60 words occurs ~80 times)."""
    rng = random.Random(seed)
    return "".join(" ".join(rng.choice(words) for _ in range(per_line)) + "\n" for _ in range(n_lines))


CJK = [chr(0x4E00 + 37 * i) for i in range(400)]  # 400 CJK characters, drawn with weight 1/rank as text's are
CJK_WEIGHTS = [1 / rank for rank in range(1, len(CJK) + 1)]


def chinese(n_lines: int, seed: int) -> str:
    """Lines of 8 to 30 CJK characters and no spaces, as Chinese is written."""
    rng = random.Random(seed)
    return "".join("".join(rng.choices(CJK, CJK_WEIGHTS, k=rng.randint(8, 30))) + "\n" for _ in range(n_lines))


def corpus(root: Path, train: str, valid: str | None = None, test: str | None = None) -> Path:
    root.mkdir(parents=True)
    for split, text in (("train", train), ("valid", valid), ("test", test)):
        default = english_like(60, seed={"valid": 2, "test": 3}.get(split, 1))
        (root / f"{split}.txt").write_text(default if text is None else text, encoding="utf-8")
    return root


def cli_preprocess(tmp_path: Path, *overrides: str) -> list[str]:
    """`lmforge preprocess` with the tiny config (threshold 2; tokens_per_sample 128, 2 x 2048 tokens an
    update) on tmp_path/corpus into tmp_path/out; its arguments."""
    args = ["preprocess", "--config", str(TINY_CONFIG), "--corpus", str(tmp_path / "corpus"),
            "--out", str(tmp_path / "out")]
    for override in overrides:
        args += ["--set", override]
    return args


def files(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*")}


def refused(tmp_path: Path, capsys: pytest.CaptureFixture[str], *overrides: str) -> str:
    """Runs `lmforge preprocess`, expects exit 1 with one error line and nothing written (an earlier
    output left as it was, no scratch files); the line."""
    before = files(tmp_path)
    assert main(cli_preprocess(tmp_path, *overrides)) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("lmforge: error: "), err[-2000:]
    assert files(tmp_path) == before, "something was written or left behind"
    return last


def accepted(tmp_path: Path, capsys: pytest.CaptureFixture[str], *overrides: str) -> tuple[dict, list[str]]:
    """Runs `lmforge preprocess`, expects exit 0 and a data-bin; the summary and the warnings logged."""
    assert main(cli_preprocess(tmp_path, *overrides)) == 0
    captured = capsys.readouterr()
    assert (tmp_path / "out" / "summary.json").is_file()
    return json.loads(captured.out), [line for line in captured.err.splitlines() if "| WARNING |" in line]


# --------------------------------------------------------------------------- refused in one line


def test_empty_train_split_is_refused_before_the_tokenizer_trains(tmp_path: Path, capsys) -> None:
    corpus(tmp_path / "corpus", "")
    line = refused(tmp_path, capsys)
    assert line == ("lmforge: error: train.txt is empty (0 lines): every split needs text, one sentence per line; "
                    "fill the file or point the corpus at one that has text")
    assert "train.txt is empty (0 lines)" in refused(tmp_path, capsys, "preprocess.tokenizer=sentencepiece")


@pytest.mark.parametrize("tokenizer", ["none", "sentencepiece", "bpe"])
def test_blank_only_train_split_is_refused(tokenizer: str, tmp_path: Path, capsys) -> None:
    corpus(tmp_path / "corpus", "\n \n\t\n" * 40)
    line = refused(tmp_path, capsys, f"preprocess.tokenizer={tokenizer}")
    assert "train.txt holds only blank lines (120 lines)" in line


def test_empty_or_blank_valid_and_test_splits_are_refused(tmp_path: Path, capsys) -> None:
    corpus(tmp_path / "corpus", english_like(500, 1), valid="", test="\n\n")
    assert "valid.txt is empty (0 lines)" in refused(tmp_path, capsys)  # seen from its size, at the plan
    (tmp_path / "corpus" / "valid.txt").write_text(" \n", encoding="utf-8")
    line = refused(tmp_path, capsys)  # seen from the counts, at the dictionary
    assert "valid.txt holds only blank lines (1 line); test.txt holds only blank lines (2 lines)" in line


def test_chinese_without_a_tokenizer_is_refused_suggesting_sentencepiece(tmp_path: Path, capsys) -> None:
    corpus(tmp_path / "corpus", chinese(3000, 1), chinese(300, 2), chinese(300, 3))
    for threshold in (2, 0):  # with 2 every line is also <unk>; with 0 none is, but each line is one token
        line = refused(tmp_path, capsys, f"preprocess.threshold={threshold}")
        assert "train.txt: 3,000 of 3,000 lines with text (100.0%) are a single token" in line
        assert "valid.txt: 300 of 300 lines with text (100.0%) are a single token" in line
        assert "preprocess.checks.max_one_token_lines=0.5" in line
        assert "preprocess.tokenizer: sentencepiece" in line
        assert "<unk>" not in line, "one cause, one finding"
    # What the message suggests trains: sentencepiece cuts the text into pieces.
    summary, _ = accepted(tmp_path, capsys, "preprocess.tokenizer=sentencepiece", "preprocess.vocab_size=1000")
    assert summary["tokenizer"]["kind"] == "sentencepiece" and summary["splits"]["train"]["tokens"] > 12_000


def test_a_split_mostly_unknown_to_the_dictionary_is_refused(tmp_path: Path, capsys) -> None:
    other = [f"x{i}" for i in range(60)]  # another language: none of its words is in train's dictionary
    corpus(tmp_path / "corpus", english_like(500, 1), valid=english_like(50, 2, other))
    line = refused(tmp_path, capsys)
    assert "valid.txt: 500 of 500 tokens (100.0%) are <unk> under the dictionary" in line
    assert "preprocess.checks.max_unk_fraction=0.5" in line and "test.txt" not in line


def test_a_train_split_too_small_for_a_sample_is_refused(tmp_path: Path, capsys) -> None:
    corpus(tmp_path / "corpus", english_like(20, 1))  # 220 tokens
    line = refused(tmp_path, capsys, "train.tokens_per_sample=512")
    assert line == ("lmforge: error: train.txt: 220 tokens, fewer than preprocess.checks.min_train_samples=1 "
                    "sample(s) of train.tokens_per_sample=512; add training text or lower train.tokens_per_sample")


# --------------------------------------------------------------------------- suspicious but trainable


def test_suspicious_corpus_gets_warnings_and_is_written(tmp_path: Path, capsys) -> None:
    other = [f"x{i}" for i in range(60)]
    rng = random.Random(5)  # 4 of 10 words per line unknown: 40%, above the warning, below the refusal
    valid = "".join(" ".join(rng.sample(WORDS, 6) + rng.sample(other, 4)) + "\n" for _ in range(50))
    corpus(tmp_path / "corpus", english_like(300, 1), valid=valid)  # 3,300 tokens: less than one update's 4,096
    summary, warnings = accepted(tmp_path, capsys)
    assert summary["splits"]["valid"]["unk"] == 200
    [unk, size] = warnings
    assert ("valid.txt: 200 of 500 tokens (40.0%) are <unk> under the dictionary: above "
            "preprocess.checks.warn_unk_fraction=0.25") in unk
    assert "train.txt: 3,300 tokens, less than one update takes (train.max_tokens=2,048 x 2 processes" in size


def test_thresholds_set_in_the_config_move_the_decision(tmp_path: Path, capsys) -> None:
    other = [f"x{i}" for i in range(60)]
    rng = random.Random(5)
    valid = "".join(" ".join(rng.sample(WORDS, 6) + rng.sample(other, 4)) + "\n" for _ in range(50))
    corpus(tmp_path / "corpus", english_like(500, 1), valid=valid)
    assert "40.0%" in refused(tmp_path, capsys, "preprocess.checks.max_unk_fraction=0.3",
                              "preprocess.checks.warn_unk_fraction=0.1")
    _, warnings = accepted(tmp_path, capsys, "preprocess.checks.warn_unk_fraction=0.5",
                           "preprocess.checks.max_unk_fraction=0.5")
    assert warnings == []

    (tmp_path / "corpus" / "train.txt").write_text(english_like(20, 1), encoding="utf-8")  # 220 tokens
    (tmp_path / "corpus" / "valid.txt").write_text(english_like(60, 2), encoding="utf-8")
    assert "min_train_samples=2" in refused(tmp_path, capsys, "preprocess.checks.min_train_samples=2")
    accepted(tmp_path, capsys, "preprocess.checks.min_train_samples=0")

    (tmp_path / "corpus" / "train.txt").write_text(chinese(300, 1), encoding="utf-8")
    for split in ("valid", "test"):
        (tmp_path / "corpus" / f"{split}.txt").write_text(chinese(30, 2), encoding="utf-8")
    # 1: never. (Each line is a token, so every line of valid and test is <unk>, too.)
    accepted(tmp_path, capsys, "preprocess.threshold=0", "preprocess.checks.max_one_token_lines=1",
             "preprocess.checks.warn_one_token_lines=1", "preprocess.checks.max_unk_fraction=1",
             "preprocess.checks.warn_unk_fraction=1")


def test_bad_thresholds_are_config_errors(tmp_path: Path, capsys) -> None:
    corpus(tmp_path / "corpus", english_like(500, 1))
    assert main(cli_preprocess(tmp_path, "preprocess.checks.max_unk_fraction=1.5",
                               "preprocess.checks.warn_one_token_lines=0.9", "preprocess.checks.min_train_samples=-1")) == 2
    err = capsys.readouterr().err
    for part in ("preprocess.checks.max_unk_fraction: 1.5 must be a fraction in [0, 1]",
                 "preprocess.checks.warn_one_token_lines: 0.9 is above max_one_token_lines (0.5)",
                 "preprocess.checks.min_train_samples: -1 must be >= 0"):
        assert part in err


# --------------------------------------------------------------------------- vocabulary size bound


@pytest.mark.parametrize("tokenizer", ["sentencepiece", "bpe"])
def test_a_vocabulary_larger_than_the_text_supports_is_capped_with_a_warning(tokenizer: str, tmp_path: Path,
                                                                              capsys) -> None:
    corpus(tmp_path / "corpus", english_like(500, 1))
    summary, warnings = accepted(tmp_path, capsys, f"preprocess.tokenizer={tokenizer}",
                                 "preprocess.vocab_size=10000000")
    trained = load_tokenizer(tmp_path / "out").vocabulary_size()
    assert trained < 2000
    [warning] = warnings
    assert (f"preprocess.vocab_size=10,000,000 is more than the training text supports: the {tokenizer} tokenizer "
            f"has {trained:,} tokens (capped); set preprocess.vocab_size <= {trained}") in warning
    assert summary["vocab_size"] <= trained + 8 + 4  # the dictionary holds at most the pieces, padded


# --------------------------------------------------------------------------- one home for "not a directory"


def test_a_plain_file_gets_the_same_line_from_preprocess_and_run(tmp_path: Path, capsys) -> None:
    text = tmp_path / "all.txt"
    text.write_text(english_like(10, 1), encoding="utf-8")
    assert main(["preprocess", "--corpus", str(text), "--out", str(tmp_path / "out")]) == 1
    line = capsys.readouterr().err.strip().splitlines()[-1]
    with pytest.raises(LmforgeError) as err:  # what the download step of `lmforge run --corpus FILE` raises
        download_corpus(str(text), tmp_path / "downloaded")
    assert line == f"lmforge: error: {err.value}"
    assert "a plain file cannot hold three splits" in line and "missing" not in line


# --------------------------------------------------------------------------- the pipeline's stages


def test_pipeline_stages_refuse_at_the_plan_and_at_the_dictionary(tmp_path: Path, monkeypatch) -> None:
    """The tasks of `lmforge run` and of a cluster run: plan, count, dictionary, as the components call them."""
    error_file = tmp_path / "error"
    monkeypatch.setenv(steps.ERROR_FILE_ENV, str(error_file))

    def preprocess_json(root: Path) -> str:
        cfg = config.load(TINY_CONFIG, [f"storage.root={root}"])
        return config.stage_json(cfg, "preprocess")

    empty = corpus(tmp_path / "empty", "")
    with pytest.raises(SystemExit) as exit_:
        steps.preprocess_plan(preprocess_json(tmp_path / "runs1"), str(empty), "sha-empty")
    assert exit_.value.code == 1
    assert error_file.read_text().startswith("preprocess plan step: train.txt is empty (0 lines)")

    zh = corpus(tmp_path / "zh", chinese(300, 1), chinese(30, 2), chinese(30, 3))
    pj = preprocess_json(tmp_path / "runs2")
    counted = [steps.preprocess_count(shard) for shard in steps.preprocess_plan(pj, str(zh), "sha-zh")]
    with pytest.raises(SystemExit):
        steps.preprocess_dictionary(pj, counted)
    message = error_file.read_text()
    assert message.startswith("dictionary step: train.txt: 300 of 300 lines with text (100.0%) are a single token")
    assert "sentencepiece" in message
    assert not list((tmp_path / "runs2").glob("data/preprocess/*/dict")), "a refused corpus leaves no dictionary"


@pytest.mark.parametrize("tokenizer", ["none", "bpe"])
def test_counts_of_blank_and_one_token_lines_do_not_depend_on_shards(tokenizer: str, tmp_path: Path) -> None:
    """Blank is the raw line's: byte-level BPE makes a token (`Ġ`) of a line holding one space."""
    lines = ["a b c", "", "one", "  ", "x y", "single", "\t", "p q r s"] * 25
    root = corpus(tmp_path / "corpus", "\n".join(lines) + "\n")
    settings = stages.Settings(tokenizer=tokenizer, vocab_size=300)
    for n in (1, 3, 7):
        work = tmp_path / f"work{n}"
        plan = stages.prepare(str(root), str(work), settings, n, checks=None)
        stats = [stages.shard_stats(stages.count_shard(str(root), str(work), shard))["train"] for shard in plan]
        assert sum(s["blank"] for s in stats) == 75 and sum(s["one_token"] for s in stats) == 50


def test_train_step_refuses_a_train_split_too_small_for_the_run(tmp_path: Path, small_data_bin: Path) -> None:
    """The pipeline's data stages do not see the training settings; the train step checks them first."""
    tokens = json.loads((small_data_bin / "summary.json").read_text())["splits"]["train"]["tokens"]
    cfg = config.load(TINY_CONFIG, [f"train.tokens_per_sample={tokens + 1}", f"train.max_tokens={tokens + 1}"])
    with pytest.raises(CorpusError, match=rf"train\.txt: {tokens:,} tokens, fewer than .*={tokens + 1:,}"):
        steps.check_train_split(cfg, str(small_data_bin))
    steps.check_train_split(config.load(TINY_CONFIG), str(small_data_bin))


def test_review_groups_each_kind_once() -> None:
    limits = config.CorpusChecksConfig()
    counts = {"train": SplitCounts(lines=100, tokens=1100), "valid": SplitCounts(lines=0, tokens=0),
              "test": SplitCounts(lines=0, tokens=0)}
    result = corpus_checks.review(counts, limits, shape=TrainingShape(128, 2048, 1))
    assert result.refusals == ["valid.txt is empty (0 lines); test.txt is empty (0 lines): " + corpus_checks.NEEDS_TEXT]
    assert result.warnings == ["train.txt: 1,100 tokens, less than one update takes (train.max_tokens=2,048 x 1 "
                               "processes = 2,048): every epoch is a single update"]


# --------------------------------------------------------------------------- lmforge run


def test_run_on_an_empty_corpus_stops_at_the_data_stage(tmp_path: Path) -> None:
    root = corpus(tmp_path / "corpus", "")
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "lmforge.cli", "run", "--config", str(TINY_CONFIG), "--corpus", str(root),
         "--set", f"storage.root={tmp_path / 'runs'}"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    took = time.monotonic() - started
    assert result.returncode == 1, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("lmforge: error: preprocess plan step: train.txt is empty (0 lines)"), result.stderr[-3000:]
    assert "torchrun" not in result.stderr and "Traceback" not in result.stderr
    assert not list((tmp_path / "runs").glob("tiny/*/checkpoints")), "training started"
    assert took < 120, f"took {took:.0f} s to refuse an empty corpus"
