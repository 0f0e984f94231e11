"""Whether a corpus can train: each split's counts against the `preprocess.checks` limits.

In:  the per-split counts preprocessing makes anyway (lines, tokens with one end of line each,
     blank lines, one-token lines, tokens that are <unk> under the dictionary), the limits
     (`config.CorpusChecksConfig`), the tokenizer kind and, where the training settings are
     known, the training shape. Out: `Review`: refusals (raised by `enforce` as one
     `CorpusError` line naming each split and its numbers) and warnings (logged).

No text is read here. The callers, each once per path:
- `stages.prepare`: an empty split (from its size), and a blank-only train split when a
  tokenizer is trained on it (from the lines the trainer reads), before the tokenizer trains;
- `stages.build_dictionary` (the reduce of the pipeline and of `lmforge preprocess`): every
  check, after the dictionary is known and before `dict.txt` is written, so a refused corpus
  leaves no data-bin; `lmforge preprocess` passes the training shape of its config;
- `steps.train`: the train split's size against the run's training shape (the pipeline's data
  stages see only the preprocess settings, so that their cache does not depend on training).

    lmforge preprocess --corpus DIR --out DIR    # refused: "lmforge: error: train.txt is empty (0 lines) ..."
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

from lmforge.config import CorpusChecksConfig, TrainConfig
from lmforge.errors import LmforgeError

logger = logging.getLogger(__name__)

SETTINGS = "preprocess.checks"
NEEDS_TEXT = "every split needs text, one sentence per line; fill the file or point the corpus at one that has text"


class CorpusError(LmforgeError):
    """The corpus cannot train; the message names each split and its numbers."""


@dataclass(frozen=True)
class SplitCounts:
    """One split as preprocessing counted it."""

    lines: int
    tokens: int  # with one end of line per line, as fairseq counts them
    blank: int = 0  # lines without text (whitespace at most), before any tokenizer
    one_token: int = 0  # lines of exactly one token
    unk: int = 0  # tokens that are <unk> under the dictionary, a literal "<unk>" included

    @property
    def words(self) -> int:
        """Tokens without the ends of line."""
        return self.tokens - self.lines

    @property
    def text_lines(self) -> int:
        return self.lines - self.blank


@dataclass(frozen=True)
class TrainingShape:
    """What training takes from the train split in one sample and in one update."""

    tokens_per_sample: int
    max_tokens: int  # per process
    processes: int

    @classmethod
    def from_config(cls, t: TrainConfig) -> TrainingShape:
        return cls(t.tokens_per_sample, t.max_tokens, t.world_size())


@dataclass
class Review:
    refusals: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def extend(self, other: Review) -> None:
        self.refusals += other.refusals
        self.warnings += other.warnings


def _share(part: int, whole: int, what: str) -> str:
    return f"{part:,} of {whole:,} {what} ({100 * part / whole:.1f}%)"


def _grouped(findings: list[str], tail: str) -> str:
    """Findings of one kind in several splits, then what they exceed and what to do, once."""
    return f"{'; '.join(findings)}: {tail}"


def _limit(kind: str, limits: CorpusChecksConfig, refused: bool) -> str:
    if refused:
        return f"above {SETTINGS}.max_{kind}={getattr(limits, f'max_{kind}')}"
    return f"above {SETTINGS}.warn_{kind}={getattr(limits, f'warn_{kind}')}"


def _one_token_advice(tokenizer: str) -> str:
    if tokenizer == "none":
        return ("text without spaces between words (Chinese, Japanese, Thai) needs preprocess.tokenizer: "
                "sentencepiece, which cuts it into pieces")
    return "a language model learns from lines of several tokens; check the text"


UNK_ADVICE = ("lower preprocess.threshold or raise preprocess.nwords, check that every split is the same language "
              "as train.txt, or use preprocess.tokenizer: sentencepiece (subwords leave few words unknown)")


def review(counts: Mapping[str, SplitCounts], limits: CorpusChecksConfig, tokenizer: str = "none",
           shape: TrainingShape | None = None) -> Review:
    """What is refused and what is warned about in `counts` (split -> SplitCounts)."""
    found: dict[tuple[str, bool], list[str]] = {}  # (kind, refused) -> findings, splits in order

    def note(kind: str, refused: bool, finding: str) -> None:
        found.setdefault((kind, refused), []).append(finding)

    usable = []
    for split, c in counts.items():
        if c.lines == 0:
            note("empty", True, f"{split}.txt is empty (0 lines)")
        elif c.words == 0 or c.text_lines == 0:
            note("blank", True, f"{split}.txt holds only blank lines ({c.lines:,} line{'s' * (c.lines != 1)})")
        else:
            usable.append(split)
    for split in usable:
        c = counts[split]
        one = c.one_token / c.text_lines
        if one > limits.warn_one_token_lines:
            refused = one > limits.max_one_token_lines
            note("one_token_lines", refused,
                 f"{split}.txt: {_share(c.one_token, c.text_lines, 'lines with text')} are a single token")
            if refused:  # its unknown words follow from that: one line, one cause
                continue
        unk = c.unk / c.words
        if unk > limits.warn_unk_fraction:
            note("unk_fraction", unk > limits.max_unk_fraction,
                 f"{split}.txt: {_share(c.unk, c.words, 'tokens')} are <unk> under the dictionary")
    result = Review()
    for (kind, refused), findings in found.items():
        if kind in ("empty", "blank"):
            result.refusals.append(_grouped(findings, NEEDS_TEXT))
            continue
        advice = _one_token_advice(tokenizer) if kind == "one_token_lines" else UNK_ADVICE
        (result.refusals if refused else result.warnings).append(
            _grouped(findings, f"{_limit(kind, limits, refused)}; {advice}"))
    if shape is not None and "train" in usable:
        result.extend(review_training(counts["train"].tokens, limits, shape))
    return result


def review_training(train_tokens: int, limits: CorpusChecksConfig, shape: TrainingShape) -> Review:
    """The train split's size (tokens, with ends of line) against what training takes in a sample and an update."""
    result = Review()
    need = limits.min_train_samples * shape.tokens_per_sample
    batch = shape.max_tokens * shape.processes
    if train_tokens < need:
        result.refusals.append(
            f"train.txt: {train_tokens:,} tokens, fewer than {SETTINGS}.min_train_samples={limits.min_train_samples} "
            f"sample(s) of train.tokens_per_sample={shape.tokens_per_sample:,}; add training text or lower "
            "train.tokens_per_sample"
        )
    elif train_tokens < batch:
        result.warnings.append(
            f"train.txt: {train_tokens:,} tokens, less than one update takes (train.max_tokens={shape.max_tokens:,} "
            f"x {shape.processes} processes = {batch:,}): every epoch is a single update"
        )
    return result


def vocabulary_review(requested: int, kind: str, trained: int | None) -> Review:
    """A trained tokenizer smaller than `preprocess.vocab_size`: the training text could not fill the
    vocabulary, so the trainer capped it (sentencepiece and BPE stop where the text runs out)."""
    result = Review()
    if trained is not None and trained < requested:
        result.warnings.append(
            f"preprocess.vocab_size={requested:,} is more than the training text supports: the {kind} tokenizer "
            f"has {trained:,} tokens (capped); set preprocess.vocab_size <= {trained} to ask for what it can hold"
        )
    return result


def enforce(result: Review) -> None:
    """Log the warnings; raise the refusals as one CorpusError line."""
    for warning in result.warnings:
        logger.warning("%s", warning)
    if result.refusals:
        raise CorpusError("; ".join(result.refusals))


def check(counts: Mapping[str, SplitCounts], limits: CorpusChecksConfig, tokenizer: str = "none",
          shape: TrainingShape | None = None) -> None:
    """`review` then `enforce`."""
    enforce(review(counts, limits, tokenizer, shape))
