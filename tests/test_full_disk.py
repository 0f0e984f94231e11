"""`lmforge preprocess` and `lmforge download` onto a disk that really fills up, or is really
read-only (a small tmpfs: tests/full_disk.py): one line naming the destination and the space
left, exit 1, nothing half-written or left in scratch, and an earlier output there intact.
Run in-process through `lmforge.cli.main`."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import TINY_CONFIG, corpus_text
from download_fixtures import server, splits, wikitext_zip  # noqa: F401 (fixtures)
from full_disk import contents, listing, small_disk  # noqa: F401 (small_disk: a fixture)
from lmforge.cli import main

FULL = "no space left on the device ("
ADVICE = "free space there or choose another destination"
# threshold 1: the 60-line corpus keeps its words (at 2, half its test split is <unk> and the corpus checks refuse it)
PREPROCESS = ["preprocess", "--config", TINY_CONFIG, "--set", "preprocess.threshold=1"]


def run(capsys, *argv) -> tuple[int, str]:
    status = main([str(a) for a in argv])
    _, err = capsys.readouterr()
    last = err.strip().splitlines()[-1] if err.strip() else ""
    assert status == 0 or (last.startswith("lmforge: error: ") and "Traceback" not in err), err[-3000:]
    return status, last.removeprefix("lmforge: error: ")


def text(dest: Path, train_lines: int, other_lines: int) -> Path:
    """A corpus of the first lines of corpus_text(): train from valid.txt, valid and test from test.txt."""
    source = corpus_text()
    valid = (source / "valid.txt").read_text(encoding="utf-8").splitlines(keepends=True)
    test = (source / "test.txt").read_text(encoding="utf-8").splitlines(keepends=True)
    dest.mkdir(parents=True)
    (dest / "train.txt").write_text("".join(valid[:train_lines]), encoding="utf-8")
    (dest / "valid.txt").write_text("".join(test[:other_lines]), encoding="utf-8")
    (dest / "test.txt").write_text("".join(test[other_lines:2 * other_lines]), encoding="utf-8")
    return dest


@pytest.fixture(scope="module")
def small_text(tmp_path_factory) -> Path:
    """~47 KiB of text, a ~32 KiB data-bin."""
    return text(tmp_path_factory.mktemp("text") / "small", 60, 60)


@pytest.fixture(scope="module")
def more_text(tmp_path_factory) -> Path:
    """~185 KiB of text, a ~130 KiB data-bin (preprocess needs ~400 KiB of scratch and output)."""
    return text(tmp_path_factory.mktemp("text") / "more", 600, 60)


def test_preprocess_onto_a_full_disk_is_one_line_and_leaves_nothing(capsys, small_disk, more_text):
    disk = small_disk("64k")
    status, line = run(capsys, *PREPROCESS, "--corpus", more_text, "--out", disk / "data-bin")
    assert status == 1 and line == f"cannot write {disk / 'data-bin'}: {FULL}64.0 KiB free); {ADVICE}"
    assert listing(disk) == {}, "no half-written data-bin, no scratch directory"


def test_preprocess_workers_report_the_same_line(capsys, small_disk, more_text):
    """The failing write happens in a worker process; its error crosses the process pool."""
    disk = small_disk("64k")
    status, line = run(capsys, *PREPROCESS, "--workers", "2", "--corpus", more_text, "--out", disk / "data-bin")
    assert status == 1 and line == f"cannot write {disk / 'data-bin'}: {FULL}64.0 KiB free); {ADVICE}"
    assert listing(disk) == {}


def test_a_preprocess_rerun_that_fills_the_disk_keeps_the_earlier_data_bin(capsys, small_disk, small_text,
                                                                         more_text):
    disk = small_disk("256k")
    dest = disk / "data-bin"
    assert run(capsys, *PREPROCESS, "--corpus", small_text, "--out", dest)[0] == 0
    earlier = contents(disk)
    status, line = run(capsys, *PREPROCESS, "--corpus", more_text, "--out", dest)
    assert status == 1 and line.startswith(f"cannot write {dest}: {FULL}") and line.endswith(ADVICE)
    assert contents(disk) == earlier, "the earlier data-bin as it was, and nothing else"


def test_preprocess_into_a_read_only_filesystem(capsys, small_disk, small_text):
    disk = small_disk("64k", read_only=True)
    status, line = run(capsys, *PREPROCESS, "--corpus", small_text, "--out", disk / "data-bin")
    assert status == 1 and line == f"cannot write {disk / 'data-bin'}: read-only file system; " \
                                   "choose a writable destination"


def test_download_onto_a_full_disk_names_the_destination_not_the_source(capsys, small_disk, more_text):
    disk = small_disk("64k")
    status, line = run(capsys, "download", "--source", more_text, "--out", disk / "corpus")
    assert status == 1 and line == f"cannot write {disk / 'corpus'}: {FULL}64.0 KiB free); {ADVICE}"
    assert "cannot read" not in line and listing(disk) == {}


def test_a_download_rerun_that_fills_the_disk_keeps_the_earlier_corpus(capsys, small_disk, small_text, more_text):
    disk = small_disk("128k")
    dest = disk / "corpus"
    assert run(capsys, "download", "--source", small_text, "--out", dest)[0] == 0
    earlier = contents(disk)
    status, line = run(capsys, "download", "--source", more_text, "--out", dest)
    assert status == 1 and line.startswith(f"cannot write {dest}: {FULL}") and line.endswith(ADVICE)
    assert contents(disk) == earlier


def test_an_http_download_onto_a_full_disk(capsys, small_disk, server, wikitext_zip):  # noqa: F811
    server.files["/wikitext-2-v1.zip"] = wikitext_zip
    disk = small_disk("64k")
    status, line = run(capsys, "download", "--source", server.url("/wikitext-2-v1.zip"), "--out", disk / "corpus")
    assert status == 1 and line == f"cannot write {disk / 'corpus'}: {FULL}64.0 KiB free); {ADVICE}"
    assert listing(disk) == {}
