"""The generated stand-in for WikiText-2 (tests/synthetic_text.py): the same bytes everywhere, WikiText's shape.

    PYTHONPATH=src .venv/bin/python -m pytest tests/test_synthetic_text.py
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

import synthetic_text
from conftest import HAVE_WIKITEXT, WIKITEXT_DIR, corpus_text

TESTS = Path(__file__).resolve().parent
# sha256 of the generated splits: a change to the generator (or to Python's random) shows here first.
PINNED = {
    "valid": "9add6de033a8161d4c1b204bb5c8ab8a8b6f93a23d692f32962b4761cf20fc17",
    "test": "d687526b6d63a2e19f8dfd19ff4aaed8cc3c71993ba58f3f1531925db2e1caeb",
}
# WikiText-2's tokens, one end-of-line per line included (shared/data/README.md).
WIKITEXT_TOKENS = {"valid": 217_646, "test": 245_569}


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> dict[str, str]:
    dest = synthetic_text.write_splits(tmp_path_factory.mktemp("generated"))
    return {split: (dest / f"{split}.txt").read_text(encoding="utf-8") for split in synthetic_text.SPLIT_LINES}


def test_the_same_bytes_in_every_process(generated) -> None:
    digests = {split: hashlib.sha256(text.encode()).hexdigest() for split, text in generated.items()}
    assert digests == PINNED
    # Hash randomization must not matter: other processes with other hash seeds write the same bytes.
    script = ("import hashlib, synthetic_text as s; "
              "print(*(hashlib.sha256(s.wikitext_like(s.SPLIT_LINES[k], s.SEEDS[k]).encode()).hexdigest() "
              "for k in ('valid', 'test')))")
    for seed in ("0", "12345"):
        out = subprocess.run([sys.executable, "-c", script], cwd=TESTS, capture_output=True, text=True, check=True,
                             env={**os.environ, "PYTHONHASHSEED": seed}, timeout=60)
        assert out.stdout.split() == [PINNED["valid"], PINNED["test"]], seed


def test_sized_like_wikitext_2(generated) -> None:
    for split, text in generated.items():
        lines = text.split("\n")
        assert lines[-1] == "" and len(lines) - 1 == synthetic_text.SPLIT_LINES[split]
        tokens = len(text.split()) + len(lines) - 1
        assert abs(tokens - WIKITEXT_TOKENS[split]) < 0.03 * WIKITEXT_TOKENS[split], (split, tokens)


def test_laid_out_like_wikitext(generated) -> None:
    lines = generated["valid"].splitlines()
    assert lines[0] == " " and lines[1].startswith(" = ") and lines[1].endswith(" = ")  # an article begins
    headings = [line for line in lines if line.startswith(" = ")]
    sections = [line for line in headings if line.startswith(" = = ")]
    assert 300 < len(headings) < 1200 and 0 < len(sections) < len(headings)
    for i, line in enumerate(lines):
        assert line.startswith(" ") and line.endswith(" "), i
        assert "  " not in line.strip(), i  # single spaces between tokens
        if line in headings:
            assert lines[i - 1] == " " and lines[i + 1] == " ", i  # blank lines around every heading
    tokens = Counter(generated["valid"].split())
    for punctuation in (",", ".", "(", ")", '"', "@-@", "@,@", "@.@", "'s", "–"):
        assert tokens[punctuation] > 0, punctuation
    assert 0.02 < tokens["<unk>"] / sum(tokens.values()) < 0.05
    assert any(not word.isascii() for word in tokens if word != "–")


def test_zipf_like_counts(generated) -> None:
    """Frequency falls roughly as 1/rank, and most types are rare, as in natural text."""
    counts = sorted(Counter(generated["valid"].split()).values(), reverse=True)
    assert 10_000 < len(counts) < 25_000
    for rank in (10, 100, 1000):
        assert 0.2 < counts[rank - 1] * rank / counts[0] < 5, rank
    assert sum(1 for c in counts if c == 1) > len(counts) / 3


def test_corpus_text_is_wikitext_where_present_else_the_generated_text(generated) -> None:
    folder = corpus_text()
    if HAVE_WIKITEXT:
        assert folder == WIKITEXT_DIR
    else:
        assert {s: (folder / f"{s}.txt").read_text(encoding="utf-8") for s in generated} == generated
