"""The `lmforge` command as a user meets it: real processes, one-line errors, exit statuses."""

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, write_corpus

LMFORGE = [sys.executable, "-m", "lmforge.cli"]
TINY = REPO / "pipelines" / "configs" / "tiny.yaml"


def lmforge(*args, cwd=REPO, timeout=300):
    return subprocess.run([*LMFORGE, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(result, status, *needles):
    assert result.returncode == status, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("lmforge: error: "), result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in last, last


def assert_nothing_registered(root: Path):
    db = root / "mlflow.db"
    if not db.exists():
        return
    from mlflow import MlflowClient

    assert MlflowClient(f"sqlite:///{db}").search_registered_models() == []


def test_version():
    result = lmforge("--version")
    assert result.returncode == 0 and result.stdout.startswith("lmforge ")


def test_missing_corpus(tmp_path):
    result = lmforge("run", "--config", str(TINY), "--corpus", str(tmp_path / "nope"), "--set", f"storage.root={tmp_path}")
    assert_one_line_error(result, 1, "does not exist", "--corpus")
    assert_nothing_registered(tmp_path)
    assert not (tmp_path / "tiny").exists()


def test_malformed_yaml(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  max_epoch: [3\n")
    assert_one_line_error(lmforge("run", "--config", str(bad)), 2, "malformed YAML", str(bad))


def test_unknown_config_key(tmp_path):
    result = lmforge("run", "--config", str(TINY), "--set", "train.max_epochs=3", "--set", "oops.x=1")
    assert_one_line_error(result, 2, "train.max_epochs: unknown key", "oops: unknown key")


def test_unknown_architecture(tmp_path):
    corpus = write_corpus(tmp_path / "corpus", train_lines=50)  # the tiny config's own source may be absent
    result = lmforge("run", "--config", str(TINY), "--corpus", str(corpus), "--set", "model.arch=transformer_llm",
                     "--set", f"storage.root={tmp_path}")
    assert_one_line_error(result, 2, "model.arch", "transformer_llm")
    assert_nothing_registered(tmp_path)


def test_sha256_mismatch_stops_the_pipeline_with_nothing_registered(tmp_path):
    """The pin is checked inside the download step, so this runs the real DAG on KFP's local runner."""
    import zipfile

    corpus = write_corpus(tmp_path / "corpus", train_lines=50)
    archive = tmp_path / "corpus.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for split in ("train", "valid", "test"):
            zf.write(corpus / f"{split}.txt", f"{split}.txt")
    root = tmp_path / "runs"
    result = lmforge(
        "run", "--config", str(TINY), "--set", f"corpus.source={archive}", "--set", "corpus.members={}",
        "--set", "corpus.sha256=" + "0" * 64, "--set", f"storage.root={root}",
    )
    assert_one_line_error(result, 1, "sha256", "0" * 64)
    assert_nothing_registered(root)
    assert not list(root.glob("tiny/*/corpus")), "a corpus was left behind"


def test_config_show_applies_overrides():
    result = lmforge("config", "show", "--config", str(TINY), "--set", "train.max_epoch=9")
    assert result.returncode == 0
    assert '"max_epoch": 9' in result.stdout


def test_config_docs_lists_every_section():
    result = lmforge("config", "docs")
    assert result.returncode == 0
    for section in ("corpus.source", "preprocess.threshold", "model.arch", "train.nproc", "evaluate.context_window",
                    "registry.model_name", "tracking.uri", "storage.root"):
        assert section in result.stdout


def test_default_config_offline_names_the_unreachable_source(tmp_path):
    """The default config downloads WikiText-2; without internet (as here and in CI) it must
    fail in one line that says so and how to use a local corpus instead."""
    result = lmforge("run", "--set", f"storage.root={tmp_path}", timeout=600)
    assert_one_line_error(result, 1, "could not reach wikitext-2", "--corpus DIR")
    assert_nothing_registered(tmp_path)


def test_corpora_lists_the_catalog():
    result = lmforge("corpora")
    assert result.returncode == 0
    for name in ("wikitext-2", "wikitext-2-raw", "wikitext-103", "wikitext-103-raw"):
        assert name in result.stdout
