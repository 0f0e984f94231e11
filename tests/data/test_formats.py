"""lmforge.data.formats against fairseq's own code: `Dictionary` for dict.txt, `MMapIndexedDataset` and its
builder for the .bin/.idx pair, `best_fitting_int_dtype` for the dtype.

Importing fairseq costs 5-10 s, once for the module (imports inside the tests).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lmforge.data import formats
from lmforge.data.formats import (
    SPECIALS,
    allocate_split,
    best_fitting_dtype,
    dictionary_index,
    dictionary_text,
    finalize_dictionary,
    idx_header,
    pointers_offset,
    read_dictionary,
    sentence_pointers,
    sizes_offset,
    verify_split,
    write_split,
)

# Three sentences in one part, none in the second (an empty shard), two in the third.
PARTS = [[[5, 6, 2], [7, 2], [2]], [], [[9, 9, 9, 2], [4, 2]]]


# --------------------------------------------------------------------------- dict.txt


def test_finalize_dictionary_is_fairseqs(tmp_path: Path) -> None:
    """Random counts with ties, literal specials and a madeupword, against fairseq's Dictionary itself."""
    from fairseq.data import Dictionary

    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(300)] + ["<unk>", "</s>", "<pad>", "madeupword0001", "madeupword0000"]
    counts = {w: int(c) for w, c in zip(words, rng.integers(1, 6, size=len(words)))}
    for threshold, nwords, padding in [(0, -1, 8), (3, -1, 8), (0, 100, 8), (2, 57, 1), (0, 3, 8), (6, -1, 16)]:
        d = Dictionary()
        for w, c in sorted(counts.items()):
            d.add_symbol(w, c)
        d.finalize(threshold=threshold, nwords=nwords, padding_factor=padding)
        expected = list(zip(d.symbols[d.nspecial:], d.count[d.nspecial:]))
        assert finalize_dictionary(counts, threshold=threshold, nwords=nwords, padding_factor=padding) == expected


COUNTS = {"b": 2, "a": 2, "c": 3, "madeupword0001": 1, "</s>": 4, "<unk>": 1}


def test_ties_are_alphabetical_and_specials_stay_out() -> None:
    assert finalize_dictionary(COUNTS, threshold=0, nwords=-1, padding_factor=1) == [
        ("c", 3), ("a", 2), ("b", 2), ("madeupword0001", 1)]


def test_padding_skips_madeupwords_the_text_holds() -> None:
    """4 specials + 4 symbols, padded to 16: madeupword0001 is a real symbol, so padding goes 0000, 0002, ..."""
    padded = finalize_dictionary(COUNTS, threshold=0, nwords=-1, padding_factor=16)
    assert padded[4:] == [(f"madeupword{i:04d}", 0) for i in (0, 2, 3, 4, 5, 6, 7, 8)]
    assert len(SPECIALS) + len(padded) == 16
    assert finalize_dictionary(COUNTS, threshold=0, nwords=-1, padding_factor=8)[-1] == ("madeupword0001", 1)


def test_threshold_and_nwords_cut_before_padding() -> None:
    assert finalize_dictionary(COUNTS, threshold=2, nwords=-1, padding_factor=8) == [
        ("c", 3), ("a", 2), ("b", 2), ("madeupword0000", 0)]
    # nwords counts the specials: 6 leaves 2 symbols; madeupword0001, cut, no longer blocks its name
    assert finalize_dictionary(COUNTS, threshold=0, nwords=6, padding_factor=8) == [
        ("c", 3), ("a", 2), ("madeupword0000", 0), ("madeupword0001", 0)]
    assert finalize_dictionary({}, threshold=0, nwords=-1, padding_factor=8) == [
        (f"madeupword{i:04d}", 0) for i in range(4)]


def test_dict_txt_round_trips_through_fairseqs_loader(tmp_path: Path) -> None:
    from fairseq.data import Dictionary

    symbols = finalize_dictionary(COUNTS, threshold=0, nwords=-1, padding_factor=16)
    path = tmp_path / "dict.txt"
    path.write_text(dictionary_text(symbols), encoding="utf-8")
    assert path.read_text(encoding="utf-8").splitlines()[:2] == ["c 3", "a 2"]
    d = Dictionary.load(str(path))
    assert read_dictionary(path) == dictionary_index(symbols) == d.indices
    assert [d.count[i] for i in range(len(SPECIALS), len(d))] == [c for _, c in symbols]


# --------------------------------------------------------------------------- .bin/.idx


@pytest.mark.parametrize("vocab_size", [4, 65499, 65500, 4294967294, 4294967295])
def test_dtype_is_fairseqs_best_fitting_int_dtype(vocab_size: int) -> None:
    from fairseq.data.indexed_dataset import best_fitting_int_dtype

    assert best_fitting_dtype(vocab_size) == np.dtype(best_fitting_int_dtype(vocab_size))


def write_parts(root: Path, parts: list[list[list[int]]], dtype: np.dtype) -> tuple[list[Path], list[Path]]:
    """Each part as a shard's binarized output: token indices in `dtype`, int32 sentence sizes."""
    bins, sizes = [], []
    for i, sentences in enumerate(parts):
        bins.append(root / f"{i}.bin")
        sizes.append(root / f"{i}.sizes")
        bins[-1].write_bytes(np.array([t for s in sentences for t in s], dtype=dtype).tobytes())
        sizes[-1].write_bytes(np.array([len(s) for s in sentences], dtype=np.int32).tobytes())
    return bins, sizes


def fairseq_written(prefix: Path, sentences: list[list[int]], dtype: np.dtype) -> Path:
    """The split as fairseq's own MMapIndexedDatasetBuilder writes it."""
    import torch
    from fairseq.data.indexed_dataset import MMapIndexedDatasetBuilder

    builder = MMapIndexedDatasetBuilder(str(prefix.with_suffix(".bin")), dtype=dtype.type)
    for s in sentences:
        builder.add_item(torch.tensor(s, dtype=torch.int64))
    builder.finalize(str(prefix.with_suffix(".idx")))
    return prefix


@pytest.mark.parametrize("dtype", [np.dtype(np.uint16), np.dtype(np.uint32), np.dtype(np.int64)])
@pytest.mark.parametrize("parts", [PARTS, [[]]], ids=["three-parts", "empty"])
def test_split_is_what_fairseq_writes_and_reads(dtype: np.dtype, parts: list, tmp_path: Path) -> None:
    from fairseq.data.indexed_dataset import MMapIndexedDataset

    sentences = [s for part in parts for s in part]
    bins, sizes = write_parts(tmp_path, parts, dtype)
    stats = write_split(tmp_path / "ours", bins, sizes, dtype, chunk=1)  # 1: a size per read, pointers carried over
    assert stats == {"sentences": len(sentences), "tokens": sum(map(len, sentences))}
    theirs = fairseq_written(tmp_path / "theirs", sentences, dtype)
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"ours{ext}").read_bytes() == theirs.with_suffix(ext).read_bytes(), ext
    assert (tmp_path / "ours.idx").read_bytes()[:formats.MMAP_HEADER_BYTES] == idx_header(dtype, len(sentences))
    if sentences:  # numpy cannot mmap the empty .bin of an empty split, for fairseq's reader as for anyone's
        ds = MMapIndexedDataset(str(tmp_path / "ours"))
        assert ds._index.dtype == dtype and len(ds) == len(sentences)
        assert [ds[i].tolist() for i in range(len(ds))] == sentences
        assert ds.sizes.tolist() == [len(s) for s in sentences]



def test_allocated_split_filled_part_by_part_is_the_written_one(tmp_path: Path) -> None:
    """What binarizing in place does: the files allocated whole, each part written at its offsets."""
    dtype = np.dtype(np.uint16)
    sentences = [s for part in PARTS for s in part]
    tokens = sum(map(len, sentences))
    allocate_split(tmp_path / "split", tokens, len(sentences), dtype)
    with open(tmp_path / "split.bin", "r+b") as bin_out, open(tmp_path / "split.idx", "r+b") as idx:
        for part in reversed(PARTS):  # any order: each part's place is fixed by the parts before it
            before = PARTS[: PARTS.index(part)]
            first_sentence = sum(len(p) for p in before)
            first_token = sum(len(s) for p in before for s in p)
            sizes = np.array([len(s) for s in part], dtype=np.int32)
            bin_out.seek(first_token * dtype.itemsize)
            bin_out.write(np.array([t for s in part for t in s], dtype=dtype).tobytes())
            idx.seek(sizes_offset(first_sentence))
            idx.write(sizes.tobytes())
            idx.seek(pointers_offset(len(sentences), first_sentence))
            idx.write(sentence_pointers(sizes, first_token * dtype.itemsize, dtype)[0].tobytes())
    verify_split(tmp_path / "split", {"sentences": len(sentences), "tokens": tokens}, dtype)
    theirs = fairseq_written(tmp_path / "theirs", sentences, dtype)
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"split{ext}").read_bytes() == theirs.with_suffix(ext).read_bytes(), ext


def test_sentence_pointers_continue_from_the_given_byte() -> None:
    pointers, following = sentence_pointers(np.array([3, 1, 2], dtype=np.int32), 10, np.dtype(np.uint32))
    assert pointers.dtype == np.int64 and pointers.tolist() == [10, 22, 26] and following == 34
    empty, same = sentence_pointers(np.array([], dtype=np.int32), 10, np.dtype(np.uint16))
    assert empty.tolist() == [] and same == 10


def test_a_truncated_split_is_caught(tmp_path: Path) -> None:
    dtype = np.dtype(np.uint16)
    bins, sizes = write_parts(tmp_path, PARTS, dtype)
    stats = write_split(tmp_path / "split", bins, sizes, dtype, chunk=1024)
    with open(tmp_path / "split.bin", "r+b") as f:
        f.truncate(f.seek(0, 2) - 2)
    with pytest.raises(OSError, match=r"split\.bin/\.idx are 22/\d+ bytes, expected 24/"):
        verify_split(tmp_path / "split", stats, dtype)
