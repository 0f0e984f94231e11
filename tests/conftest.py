"""Shared fixtures: real WikiText-2 text from ../shared/data, small corpora built from it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
WIKITEXT_DIR = REPO.parent / "shared" / "data" / "wikitext-2"
VENV_BIN = Path(sys.executable).parent


def wikitext_or_skip() -> Path:
    if not (WIKITEXT_DIR / "valid.txt").is_file() or not (WIKITEXT_DIR / "test.txt").is_file():
        pytest.skip(f"WikiText-2 text not found at {WIKITEXT_DIR} (the shared data folder is absent)")
    return WIKITEXT_DIR


def write_corpus(dest: Path, train_lines: int | None = None) -> Path:
    """train = WikiText-2 valid (optionally its first lines), valid/test = the two halves of WikiText-2 test."""
    source = wikitext_or_skip()
    dest.mkdir(parents=True, exist_ok=True)
    valid = (source / "valid.txt").read_text(encoding="utf-8").splitlines(keepends=True)
    test = (source / "test.txt").read_text(encoding="utf-8").splitlines(keepends=True)
    half = len(test) // 2
    (dest / "train.txt").write_text("".join(valid[:train_lines]), encoding="utf-8")
    (dest / "valid.txt").write_text("".join(test[:half]), encoding="utf-8")
    (dest / "test.txt").write_text("".join(test[half:]), encoding="utf-8")
    return dest


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """About 40k training tokens: enough for a model to learn something in seconds."""
    return write_corpus(tmp_path_factory.mktemp("corpus"), train_lines=600)


TINY_CONFIG = REPO / "pipelines" / "configs" / "tiny.yaml"


@pytest.fixture(scope="session")
def small_data_bin(small_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from lmforge.preprocess import preprocess

    out = tmp_path_factory.mktemp("data") / "data-bin"
    preprocess(small_corpus, out, threshold=2)
    return out


@pytest.fixture(scope="session")
def trained_checkpoints(small_data_bin: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """A tiny model trained for real by the train stage: torchrun, 2 CPU processes, 12 updates."""
    from lmforge import config
    from lmforge.train import train

    cfg = config.load(TINY_CONFIG, ["train.max_update=12", "train.max_epoch=0", "train.log_interval=2"])
    save_dir = tmp_path_factory.mktemp("train") / "checkpoints"
    return save_dir, train(cfg, small_data_bin, save_dir)
