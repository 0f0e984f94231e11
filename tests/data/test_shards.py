"""lmforge.data.shards: cut points equal to fairseq's own `find_offsets`, and ranges read back as fairseq reads lines.

fairseq's fairseq/file_chunker_utils.py is loaded from the venv by file path:
it imports only the standard library, so the real function runs without
fairseq's (torch-importing) package __init__.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from conftest import corpus_text
from lmforge.errors import LmforgeError
from lmforge.data.shards import Shard, iter_text_blocks, plan_shards, split_offsets


def _fairseq_chunker():
    site = next(Path(p) for p in sys.path if (Path(p) / "fairseq" / "file_chunker_utils.py").is_file())
    spec = importlib.util.spec_from_file_location("fairseq_file_chunker_utils", site / "fairseq" / "file_chunker_utils.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


FAIRSEQ = _fairseq_chunker()

# Multi-byte characters everywhere, so that size // N * i lands inside one for most N
# (fairseq steps back to the character's first byte); lines of very different lengths.
MULTIBYTE = "".join(f"{'日本語' * (i % 7)} é ü {'😀' * (i % 3)} línea {i}\n" for i in range(60))
TEXTS = {
    "multibyte": MULTIBYTE,
    "no-final-newline": MULTIBYTE + "日本語 last line without newline",
    "crlf": MULTIBYTE.replace("\n", "\r\n"),
    "empty-lines": "\n\n\nä\n\n\n" * 5,
    "one-line": "only one line, no newline",
    "three-lines": "a b\nc\nd e f\n",
    "empty": "",
}


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / f"{name}.txt"
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write(text)
    return path


@pytest.mark.parametrize("name", list(TEXTS))
def test_offsets_are_fairseqs_find_offsets(name: str, tmp_path: Path) -> None:
    path = write(tmp_path, name, TEXTS[name])
    for n in (1, 2, 3, 4, 7, 13, 50):  # 50 > lines for most texts: repeated offsets, empty ranges
        assert split_offsets(path, n) == FAIRSEQ.find_offsets(str(path), n), n


def test_offsets_on_wikitext(tmp_path: Path) -> None:
    path = corpus_text() / "test.txt"
    for n in (1, 2, 3, 7, 64):
        assert split_offsets(path, n) == FAIRSEQ.find_offsets(str(path), n), n


def test_more_shards_than_lines_gives_empty_ranges_that_cover_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "three", TEXTS["three-lines"])
    plan = plan_shards({"train": path}, 7)
    assert [s.index for s in plan] == list(range(7))
    ranges = [s.ranges["train"] for s in plan]
    assert ranges[0][0] == 0 and ranges[-1][1] == path.stat().st_size
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    assert sum(1 for a, b in ranges if a == b) >= 4  # 3 lines, 7 shards
    text = "".join(t for a, b in ranges for t in iter_text_blocks(path, a, b))
    assert text == TEXTS["three-lines"]


def read_lines_like_fairseq(path: Path, start: int, end: int) -> list[str]:
    with FAIRSEQ.Chunker(str(path), start, end) as lines:
        return [line.rstrip("\n") + "\n" if line.endswith("\n") else line + "\n" for line in lines]


@pytest.mark.parametrize("name", ["multibyte", "no-final-newline", "crlf", "empty-lines"])
@pytest.mark.parametrize("block_bytes", [1, 5, 64, 1 << 20])
def test_ranges_read_the_lines_fairseqs_chunker_reads(name: str, block_bytes: int, tmp_path: Path) -> None:
    """Every range, in any block size (down to 1 byte: characters split across reads), holds exactly the
    lines fairseq's Chunker yields for it (text mode: universal newlines, a last line without "\\n")."""
    path = write(tmp_path, name, TEXTS[name])
    offsets = split_offsets(path, 7)
    for start, end in zip(offsets, offsets[1:]):
        ours = "".join(iter_text_blocks(path, start, end, block_bytes))
        assert ours == "".join(read_lines_like_fairseq(path, start, end)), (start, end)


def test_non_utf8_error_names_the_file_and_the_byte_offset(tmp_path: Path) -> None:
    path = tmp_path / "train.txt"
    path.write_bytes("fine line\n".encode() * 50 + b"bad \xff byte\n" + b"more\n" * 10)
    offsets = split_offsets(path, 3)
    bad_at = 500 + 4
    start, end = next((a, b) for a, b in zip(offsets, offsets[1:]) if a <= bad_at < b)
    assert start > 0, "the bad byte is in a later shard: the offset reported is the file's, not the shard's"
    with pytest.raises(LmforgeError, match=rf"{path.name} is not UTF-8 \(bad byte at offset {bad_at}\)") as err:
        list(iter_text_blocks(path, start, end, block_bytes=16))
    assert "\n" not in str(err.value)


def test_shard_descriptor_round_trips_through_json_with_float_numbers() -> None:
    shard = Shard(2, {"train": (10, 20), "valid": (0, 0)})
    assert Shard.from_json(shard.to_json()) == shard
    # KFP's local runner may hand collected numbers back as floats
    assert Shard.from_json('{"index": 2.0, "ranges": {"train": [10.0, 20.0], "valid": [0, 0]}}') == shard
    assert shard.nbytes == 10
