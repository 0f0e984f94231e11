"""fairseq's on-disk data formats, in one place: `dict.txt` and the mmap `.bin`/`.idx` pair.

In:  token counts (for a dictionary), a `dict.txt` file (to read one back), and
     sentence sizes and token bytes (for a split).
Out: what fairseq writes and reads:
     - `dict.txt`: one "symbol count" line per symbol after the 4 specials, in
       index order, by the rules of `fairseq.data.Dictionary` (`finalize_dictionary`);
     - `{split}.bin`: every sentence's dictionary indices, back to back, in the
       dtype `best_fitting_dtype` picks from the dictionary's size;
     - `{split}.idx`: `MMapIndexedDataset`'s index (fairseq/data/indexed_dataset.py):
       magic, version <Q 1, dtype code <B, sentence count <Q, then one int32 size
       per sentence, then one int64 byte offset into `.bin` per sentence.

Pure functions but for reading `dict.txt` and writing or checking a split's
files. Used by the preprocessing stages (lmforge.data.stages), which
`lmforge preprocess --corpus DIR --out DIR` and the pipeline's preprocess tasks
run; tests/data/test_formats.py reads the results back with fairseq's own
`Dictionary` and `MMapIndexedDataset`.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

# fairseq's Dictionary specials, in index order (bos, pad, eos, unk).
SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")
EOS_INDEX, UNK_INDEX = 2, 3

MMAP_MAGIC = b"MMIDIDX\x00\x00"
MMAP_VERSION = 1
MMAP_HEADER_BYTES = len(MMAP_MAGIC) + 8 + 1 + 8
# fairseq's `_code_to_dtype`, inverted (only the integer types a vocabulary can need).
MMAP_DTYPE_CODES = {np.dtype(np.uint16): 8, np.dtype(np.uint32): 9, np.dtype(np.int64): 5}
SIZE_BYTES, POINTER_BYTES = 4, 8  # an .idx entry: int32 sentence size, int64 byte offset


# --------------------------------------------------------------------------- dict.txt


def finalize_dictionary(counts: dict[str, int], *, threshold: int, nwords: int,
                        padding_factor: int) -> list[tuple[str, int]]:
    """fairseq's `Dictionary` built from `counts` (token -> count, "</s>" holding one per line) and finalized.

    Returns every symbol after the 4 specials, with its count, in index order:
    what `dict.txt` lists. The rules are `Dictionary.add_symbol`, `finalize`
    and `pad_to_multiple_`: specials keep indices 0-3 (a literal special in the
    text only adds to its count), the rest sorted by count descending with
    ties alphabetical, cut at `nwords` (counting the specials; <= 0: all) and
    at the first count below `threshold`, then `madeupwordNNNN` (count 0)
    appended until the size is a multiple of `padding_factor`.
    """
    words = sorted(w for w in counts if w not in SPECIALS)
    n = len(SPECIALS) + len(words) if nwords <= 0 else nwords
    # A stable sort by count, descending, of the alphabetical list keeps ties in alphabetical
    # order: heapq.nlargest's result (Counter.most_common, which finalize uses), 3x faster.
    ordered = sorted(words, key=counts.__getitem__, reverse=True)[: max(0, n - len(SPECIALS))]
    kept = list(zip(ordered, map(counts.__getitem__, ordered)))
    while kept and kept[-1][1] < threshold:  # counts descend: what is below the threshold is at the end
        kept.pop()
    present = set(SPECIALS) | {w for w, _ in kept}
    i = 0
    while padding_factor > 1 and (len(SPECIALS) + len(kept)) % padding_factor:
        word = f"madeupword{i:04d}"
        if word not in present:
            kept.append((word, 0))
            present.add(word)
        i += 1
    return kept


def dictionary_text(symbols: list[tuple[str, int]]) -> str:
    """`dict.txt`'s content for the symbols `finalize_dictionary` returns."""
    return "".join(f"{w} {c}\n" for w, c in symbols)


def dictionary_index(symbols: Sequence[tuple[str, int]]) -> dict[str, int]:
    """Symbol -> index (specials included) of a finalized dictionary."""
    return {w: i for i, w in enumerate(SPECIALS)} | {w: i + len(SPECIALS) for i, (w, _) in enumerate(symbols)}


def read_dictionary(path: Path) -> dict[str, int]:
    """dict.txt -> symbol -> index (specials included), as fairseq's `Dictionary.load` gives them."""
    index = {w: i for i, w in enumerate(SPECIALS)}
    for line in path.read_text(encoding="utf-8").split("\n"):
        if line:
            word = line.rsplit(" ", 1)[0]
            index.setdefault(word, len(index))
    return index


# --------------------------------------------------------------------------- mmap .bin/.idx


def best_fitting_dtype(vocab_size: int) -> np.dtype:
    """The .bin dtype fairseq chooses for `len(dictionary)` (indexed_dataset.best_fitting_int_dtype)."""
    if vocab_size < 65500:
        return np.dtype(np.uint16)
    if vocab_size < 4294967295:
        return np.dtype(np.uint32)
    return np.dtype(np.int64)


def idx_header(dtype: np.dtype, sentences: int) -> bytes:
    return (MMAP_MAGIC + struct.pack("<Q", MMAP_VERSION) + struct.pack("<B", MMAP_DTYPE_CODES[dtype])
            + struct.pack("<Q", sentences))


def idx_bytes(sentences: int) -> int:
    """The size of the .idx of a split of `sentences` sentences."""
    return MMAP_HEADER_BYTES + sentences * (SIZE_BYTES + POINTER_BYTES)


def sizes_offset(sentence: int) -> int:
    """Where in the .idx sentence `sentence`'s size is."""
    return MMAP_HEADER_BYTES + SIZE_BYTES * sentence


def pointers_offset(sentences: int, sentence: int) -> int:
    """Where in the .idx of a split of `sentences` sentences sentence `sentence`'s byte offset is."""
    return sizes_offset(sentences) + POINTER_BYTES * sentence


def sentence_pointers(sizes: np.ndarray, pointer: int, dtype: np.dtype) -> tuple[np.ndarray, int]:
    """Byte offsets in .bin (int64) of sentences of `sizes` tokens starting at byte `pointer`; and the next one."""
    ends = np.cumsum(sizes, dtype=np.int64) * dtype.itemsize + pointer
    return ends - sizes.astype(np.int64) * dtype.itemsize, int(ends[-1]) if len(ends) else pointer


def iter_int32(path: Path, chunk: int) -> Iterator[np.ndarray]:
    """The int32 values of `path` in runs of `chunk`.

    The file is open only while a run is read: a consumer that fails between runs (a full disk)
    would otherwise keep a deleted scratch file open, and its space taken, as long as the
    exception lives.
    """
    offset = 0
    while True:
        with open(path, "rb") as f:
            f.seek(offset)
            values = np.fromfile(f, dtype=np.int32, count=chunk)
        if not len(values):
            return
        offset += values.nbytes
        yield values


def copy_into(dst: Any, src: Path, chunk: int = 8 << 20) -> int:
    """Append the bytes of `src` to the open file `dst`; the number of bytes."""
    n = 0
    with open(src, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            dst.write(block)
            n += len(block)
    return n


def allocate_split(prefix: Path, tokens: int, sentences: int, dtype: np.dtype) -> None:
    """A split's .bin and .idx at their final sizes, the .idx header written; writers fill in the rest."""
    with open(prefix.with_suffix(".bin"), "wb") as f:
        f.truncate(tokens * dtype.itemsize)
    with open(prefix.with_suffix(".idx"), "wb") as f:
        f.write(idx_header(dtype, sentences))
        f.truncate(idx_bytes(sentences))


def write_split(prefix: Path, bins: Sequence[Path], sizes: Sequence[Path], dtype: np.dtype,
                chunk: int) -> dict[str, int]:
    """A split's `.bin`/`.idx` from parts in order: `bins[i]` holds part i's token indices (`dtype`),
    `sizes[i]` its sentence sizes (int32); fairseq's `merge_file_` then `finalize`. Reads `chunk` sizes
    at a time. Returns the split's sentences and tokens, checked against the files written."""
    counts = [p.stat().st_size // SIZE_BYTES for p in sizes]
    with open(prefix.with_suffix(".bin"), "wb") as out:
        nbytes = sum(copy_into(out, p) for p in bins)
    with open(prefix.with_suffix(".idx"), "wb") as out:
        out.write(idx_header(dtype, sum(counts)))
        for p in sizes:
            copy_into(out, p)
        pointer = 0  # byte offset of the next sentence in .bin
        for p in sizes:
            for part in iter_int32(p, chunk):
                pointers, pointer = sentence_pointers(part, pointer, dtype)
                out.write(pointers.tobytes())
    stats = {"sentences": sum(counts), "tokens": nbytes // dtype.itemsize}
    verify_split(prefix, stats, dtype)
    return stats


def verify_split(prefix: Path, stats: dict[str, int], dtype: np.dtype) -> None:
    """The files on disk have the sizes the counts imply (catches truncated writes)."""
    bin_size = prefix.with_suffix(".bin").stat().st_size
    idx_size = prefix.with_suffix(".idx").stat().st_size
    want_idx = idx_bytes(stats["sentences"])
    if bin_size != stats["tokens"] * dtype.itemsize or idx_size != want_idx:
        raise OSError(f"{prefix}.bin/.idx are {bin_size}/{idx_size} bytes, expected "
                      f"{stats['tokens'] * dtype.itemsize}/{want_idx}")
