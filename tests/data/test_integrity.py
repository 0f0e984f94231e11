"""lmforge.data.integrity against fairseq's own readers: every file it passes, fairseq reads; every
damage it names (a cut .bin, a broken .idx header, a duplicate symbol, a cut checkpoint) is one
fairseq fails on, with a traceback that names neither the file nor the fault.

The data-bins are copies of the session's `small_data_bin` (lmforge's preprocess) and the tiny
LM's (fairseq-preprocess's own, without summary.json); the checkpoint is the tiny LM's.
"""

from __future__ import annotations

import shutil
import struct
import uuid
from pathlib import Path

import boto3
import numpy as np
import pytest

from lmforge.data import integrity
from lmforge.data.formats import MMAP_HEADER_BYTES

# fairseq's MMapIndexedDataset.__del__ fails on an object its own __init__ gave up on: noise, not ours
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

SPLIT_FILES = ["train.bin", "train.idx", "valid.bin", "valid.idx", "test.bin", "test.idx"]


@pytest.fixture
def data_bin(small_data_bin, tmp_path) -> Path:
    return Path(shutil.copytree(small_data_bin, tmp_path / "data-bin"))


def fairseq_reads_split(prefix: Path) -> None:
    """fairseq's MMapIndexedDataset over the split, every sentence read (raises what fairseq raises)."""
    from fairseq.data.indexed_dataset import MMapIndexedDataset

    dataset = MMapIndexedDataset(str(prefix))
    for i in range(len(dataset)):
        dataset[i]


def test_readable_data_bins_have_no_problems(data_bin, tiny_lm):
    assert integrity.data_bin_problems(data_bin, SPLIT_FILES) == []
    assert integrity.data_bin_problems(tiny_lm.data_bin, ["train.bin", "train.idx", "valid.bin", "valid.idx"]) == []
    fairseq_reads_split(data_bin / "train")


def _truncate(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def _poke(path: Path, offset: int, data: bytes) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset:offset + len(data)] = data
    path.write_bytes(bytes(raw))


def _sentences(idx: Path) -> int:
    return struct.unpack("<Q", idx.read_bytes()[MMAP_HEADER_BYTES - 8:MMAP_HEADER_BYTES])[0]


SPLIT_DAMAGE = {
    "truncated bin": (lambda d: _truncate(d / "train.bin", (d / "train.bin").stat().st_size // 2),
                      "train.bin is {half} bytes, but train.idx describes"),
    "bin too long": (lambda d: (d / "train.bin").write_bytes((d / "train.bin").read_bytes() + b"\0\0"),
                     "too long, or not the .bin of this .idx"),
    "idx magic": (lambda d: _poke(d / "train.idx", 0, b"XXXX"), "train.idx is not a fairseq mmap index"),
    "idx version": (lambda d: _poke(d / "train.idx", 9, struct.pack("<Q", 2)), "version 2 (fairseq reads 1)"),
    "idx dtype code": (lambda d: _poke(d / "train.idx", 17, b"\x63"), "dtype code 99, which fairseq does not know"),
    "truncated idx": (lambda d: _truncate(d / "train.idx", (d / "train.idx").stat().st_size - 8),
                      "but its header counts"),
    "idx shorter than its header": (lambda d: _truncate(d / "train.idx", 10), "less than an mmap index's 26-byte"),
    "idx sentence count": (lambda d: _poke(d / "train.idx", 18, struct.pack("<Q", 10 ** 6)),
                           "but its header counts 1000000 sentences"),
    "idx offset": (lambda d: _poke(d / "train.idx", MMAP_HEADER_BYTES + 4 * _sentences(d / "train.idx") + 8 * 5,
                                   struct.pack("<q", 1 << 40)),
                   "train.idx: sentence 5 starts at byte 1099511627776 of the .bin, not "),
}


@pytest.mark.parametrize("damage", SPLIT_DAMAGE, ids=SPLIT_DAMAGE)
def test_a_damaged_split_is_named_with_its_fault_and_fairseq_fails_on_it(data_bin, damage):
    corrupt, needle = SPLIT_DAMAGE[damage]
    half = (data_bin / "train.bin").stat().st_size // 2
    corrupt(data_bin)
    problems = integrity.data_bin_problems(data_bin, SPLIT_FILES)
    assert len(problems) == 1 and needle.format(half=half) in problems[0], problems
    assert problems[0].startswith(str(data_bin / "train.")) and problems[0].endswith("preprocess the corpus again")
    if damage != "bin too long":  # fairseq reads a .bin with bytes to spare without noticing
        with pytest.raises((ValueError, AssertionError, KeyError, struct.error)):
            fairseq_reads_split(data_bin / "train")


def test_a_negative_size_and_an_empty_split(data_bin):
    _poke(data_bin / "valid.idx", MMAP_HEADER_BYTES + 4 * 3, struct.pack("<i", -7))
    (data_bin / "test.bin").write_bytes(b"")
    (data_bin / "test.idx").write_bytes((data_bin / "test.idx").read_bytes()[:MMAP_HEADER_BYTES - 8]
                                        + struct.pack("<Q", 0))
    problems = integrity.data_bin_problems(data_bin, SPLIT_FILES)
    assert [p.split(": ")[0] for p in problems] == [str(data_bin / "test.bin") + " holds no tokens",
                                                    str(data_bin / "valid.idx")], problems
    assert "sentence 3 has size -7" in problems[1]


def test_files_of_two_preprocess_runs_are_told_apart_by_summary_json(data_bin, tiny_lm):
    shutil.copyfile(tiny_lm.data_bin / "valid.idx", data_bin / "valid.idx")
    shutil.copyfile(tiny_lm.data_bin / "valid.bin", data_bin / "valid.bin")
    problems = integrity.data_bin_problems(data_bin, SPLIT_FILES)
    assert len(problems) == 1 and "summary.json recorded" in problems[0] and "files of two preprocess runs" in problems[0]


def test_an_idx_dtype_too_narrow_for_the_dictionary(data_bin):
    with open(data_bin / "dict.txt", "a", encoding="utf-8") as f:
        f.writelines(f"extra{i} 1\n" for i in range(70_000))
    (data_bin / "summary.json").unlink()
    problems = integrity.data_bin_problems(data_bin, ["train.bin", "train.idx"])
    assert problems == [f"{data_bin / 'train.idx'} stores uint16 ids, too narrow for the "
                        f"{sum(1 for _ in open(data_bin / 'dict.txt')) + 4} symbols of the dictionary: binarized "
                        "with another dict.txt; preprocess the corpus again"]


# --------------------------------------------------------------------------- dict.txt

DICT_DAMAGE = {
    "duplicate": (lambda lines: lines[:10] + [lines[3]] + lines[10:], "lists a symbol twice: {w3!r} on lines 4 and 11"),
    "special": (lambda lines: lines + ["<unk> 5"], "'<unk>' (one of fairseq's specials) on line {n1}"),
    "no count": (lambda lines: lines[:-1] + [lines[-1].split()[0]], "line {n} ({last!r}) is not 'symbol count'"),
    "count not a number": (lambda lines: lines[:2] + ["word x"] + lines[2:], "line 3 ('word x') is not 'symbol count'"),
}


@pytest.mark.parametrize("damage", DICT_DAMAGE, ids=DICT_DAMAGE)
def test_a_damaged_dictionary_is_named_and_fairseq_refuses_it(data_bin, damage):
    from fairseq.data import Dictionary

    path = data_bin / "dict.txt"
    lines = path.read_text(encoding="utf-8").splitlines()
    change, needle = DICT_DAMAGE[damage]
    path.write_text("\n".join(change(lines)) + "\n", encoding="utf-8")
    problems = integrity.dictionary_problems(path)
    expected = needle.format(w3=lines[3].rsplit(" ", 1)[0], n=len(lines), n1=len(lines) + 1,
                             last=lines[-1].split()[0])
    assert len(problems) == 1 and problems[0].startswith(f"{path}") and expected in problems[0], problems
    with pytest.raises((RuntimeError, ValueError)):
        Dictionary.load(str(path))


def test_what_fairseq_accepts_passes(tmp_path):
    from fairseq.data import Dictionary

    path = tmp_path / "dict.txt"
    path.write_bytes(b"the 5\r\nof 4\nthe 3 #fairseq:overwrite\nnew york 2\n")
    assert integrity.dictionary_problems(path) == []
    assert len(Dictionary.load(str(path))) == 8
    path.write_bytes(b"the 5\nl\xe9t 2\n")
    assert integrity.dictionary_problems(path) == [f"{path} is not UTF-8 (byte 7): damaged; preprocess the corpus again"]


def test_a_data_bin_on_s3_is_checked_with_ranged_reads(data_bin, moto_s3, monkeypatch):
    from lmforge.io import storage

    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_s3)
    bucket = f"b-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=moto_s3).create_bucket(Bucket=bucket)
    _truncate(data_bin / "valid.bin", 100)
    uri = f"s3://{bucket}/data-bin"
    storage.put_dir(data_bin, uri)
    problems = integrity.data_bin_problems(uri, SPLIT_FILES)
    assert len(problems) == 1 and problems[0].startswith(f"{uri}/valid.bin is 100 bytes, but valid.idx describes")


# --------------------------------------------------------------------------- checkpoints


def test_a_readable_checkpoint(tiny_lm):
    assert integrity.checkpoint_problem(tiny_lm.checkpoint, resumable=True) is None
    state = integrity.read_checkpoint(tiny_lm.checkpoint)
    assert "model" in state and state["optimizer_history"]


def _state(tiny_lm, **changes):
    import torch

    state = torch.load(tiny_lm.checkpoint, map_location="cpu", weights_only=False)
    state.update(changes)
    return {k: v for k, v in state.items() if v is not None}


CHECKPOINT_DAMAGE = {
    "truncated": (lambda src, dst, lm: dst.write_bytes(src.read_bytes()[: src.stat().st_size // 2]),
                  "truncated: {half} bytes, a torch.save archive without its end (the write was cut short)"),
    "empty": (lambda src, dst, lm: dst.write_bytes(b""), "empty (0 bytes): its write never finished"),
    "not a checkpoint": (lambda src, dst, lm: dst.write_text("<html>503 Service Unavailable</html>\n"),
                         "damaged, or not a PyTorch file (torch.load: "),
    "no model": (lambda src, dst, lm: __import__("torch").save({"weights": 1}, dst),
                 "not a fairseq checkpoint (no 'model' entry)"),
    "no cfg": (lambda src, dst, lm: __import__("torch").save(_state(lm, cfg=None, args=None), dst),
               "not a fairseq checkpoint (neither 'cfg' nor 'args'"),
}


@pytest.mark.parametrize("damage", CHECKPOINT_DAMAGE, ids=CHECKPOINT_DAMAGE)
def test_a_damaged_checkpoint_is_named_with_its_fault(tiny_lm, tmp_path, damage):
    corrupt, needle = CHECKPOINT_DAMAGE[damage]
    path = tmp_path / "checkpoint_best.pt"
    corrupt(tiny_lm.checkpoint, path, tiny_lm)
    problem = integrity.checkpoint_problem(path)
    fault = needle.format(half=tiny_lm.checkpoint.stat().st_size // 2)
    assert problem.startswith(f"checkpoint {path}: {fault}"), problem
    assert problem.endswith("; pass another checkpoint, or train again") and "\n" not in problem
    if damage in ("truncated", "empty", "not a checkpoint"):
        from fairseq import checkpoint_utils

        with pytest.raises(Exception):
            checkpoint_utils.load_checkpoint_to_cpu(str(path))


def test_weights_without_training_state_score_but_do_not_resume(tiny_lm, tmp_path):
    import torch

    path = tmp_path / "model.pt"
    torch.save(_state(tiny_lm, optimizer_history=None, last_optimizer_state=None), path)
    assert integrity.checkpoint_problem(path) is None
    assert integrity.checkpoint_problem(path, resumable=True) == (
        f"checkpoint {path}: no training state (no optimizer_history): it can be scored, not resumed from; "
        "pass another checkpoint, or train again")
    assert np.isfinite(integrity.read_checkpoint(path)["model"]["decoder.embed_tokens.weight"].sum().item())
