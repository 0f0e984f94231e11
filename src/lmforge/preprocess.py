"""Preprocessing: a text corpus in, fairseq's binarized language-model data out.

In:  a corpus directory holding `train.txt`, `valid.txt` and `test.txt` (UTF-8,
     one sentence per line, tokens separated by whitespace, as WikiText ships them).
Out: a destination directory holding `dict.txt`, `{train,valid,test}.{bin,idx}`
     byte-identical to what

         fairseq-preprocess --only-source --trainpref C/train.txt --validpref C/valid.txt
             --testpref C/test.txt --destdir D --thresholdsrc T --nwordssrc N
             --padding-factor P --dataset-impl mmap

     writes (whatever `workers` is), plus `summary.json` (the dict `preprocess`
     returns). fairseq's `preprocess.log` is not written.

    lmforge preprocess --corpus DIR --out DIR

How it stays identical while being much faster than fairseq-preprocess, which
calls `Dictionary.index` and fills a torch tensor once per token in Python:

- tokenization is `str.split()`: fairseq's `tokenize_line` collapses `\\s+`, strips
  and splits, and Python's `re` `\\s` and `str.split()` use the same Unicode
  whitespace table, so both give the same tokens;
- lines are read as fairseq reads them (text mode, universal newlines: `\\n`,
  `\\r\\n` and a lone `\\r` each end a line; a last line without newline counts);
- each block of text is split once, with a sentinel token appended to every line;
  tokens are factorized into small integer ids with C-level dict lookups
  (`map(dict.get, tokens, ...)`), counts come from `np.bincount`, and the final
  ids, sentence sizes and eos positions are numpy operations. The sentinel is
  the eos of each line, so no per-line Python work is left;
- the dictionary is fairseq's own `Dictionary` (its `add_symbol`, `finalize` and
  `save`), fed with the same counts in the same order as fairseq's
  `add_file_to_dictionary`, so finalize's rules (count descending, ties
  alphabetical, threshold, nwords, padding with `madeupwordNNNN`) are fairseq's.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import struct
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from itertools import pairwise, repeat
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lmforge.config import SPLITS
from lmforge.errors import LmforgeError

if TYPE_CHECKING:  # fairseq imports torch (seconds); only the functions that need it import it
    from fairseq.data import Dictionary

logger = logging.getLogger(__name__)

# Text is read in blocks of this many bytes (cut at a line end). A block's token
# list costs ~60 bytes per token in Python objects; 1 MiB of WikiText (~200 k
# tokens, ~12 MB of objects) keeps memory flat whatever the corpus size and was
# ~25% faster than 8 MiB blocks (fewer cache misses).
BLOCK_BYTES = 1 << 20

# Every name preprocessing (ours or fairseq's) writes. A destination directory
# holding only these is earlier output and may be replaced; anything else there
# belongs to someone else and is never deleted.
OUTPUT_NAMES = frozenset(
    {"dict.txt", "summary.json", "preprocess.log"} | {f"{s}.{e}" for s in SPLITS for e in ("bin", "idx")}
)

# fairseq's MMapIndexedDataset on-disk format (fairseq/data/indexed_dataset.py):
# .idx = magic, version <Q 1, dtype code <B, count <Q, int32 sizes, int64 byte pointers.
_MMAP_MAGIC = b"MMIDIDX\x00\x00"
_MMAP_VERSION = 1
# fairseq's `_code_to_dtype`, inverted (only the integer types a vocabulary can need).
_MMAP_DTYPE_CODES = {
    np.dtype(np.uint8): 1,
    np.dtype(np.int8): 2,
    np.dtype(np.int16): 3,
    np.dtype(np.int32): 4,
    np.dtype(np.int64): 5,
    np.dtype(np.uint16): 8,
    np.dtype(np.uint32): 9,
    np.dtype(np.uint64): 10,
}


@dataclass(frozen=True)
class Scan:
    """One text range, tokenized and factorized.

    `fids[i]` is the factor id of the i-th token; id 0 is the end of a line
    (fairseq's eos, appended to every line) and `uniques[k]` is the token with
    id k for k >= 1 (`uniques[0]` is a placeholder). Every line ends with a 0,
    so the sentences are the runs of `fids` that end in 0.
    """

    uniques: list[str]
    fids: np.ndarray  # int32


# --------------------------------------------------------------------------- reading


def chunk_offsets(path: Path, chunks: int) -> list[int]:
    """Byte offsets cutting `path` into at most `chunks` ranges, each starting at a line.

    A cut is placed just after a b"\\n" byte (never inside a UTF-8 character or a
    \\r\\n pair), near size*i/chunks like fairseq's `find_offsets`. A file whose
    lines end in a lone \\r only has no such byte and stays one chunk.
    """
    size = path.stat().st_size
    offsets = [0]
    with open(path, "rb") as f:
        for i in range(1, chunks):
            f.seek(max(size * i // chunks, offsets[-1]))
            f.readline()  # binary readline stops after b"\n": the next line starts here
            pos = f.tell()
            if pos >= size:
                break
            if pos > offsets[-1]:
                offsets.append(pos)
    offsets.append(size)
    return offsets


def decode_block(data: bytes, path: Path, offset: int, *, last: bool) -> str:
    """UTF-8 bytes -> text with fairseq's line semantics (universal newlines).

    Every line of the result, including a last one without a newline in the
    file, ends with "\\n", so the text holds exactly one "\\n" per line.
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise LmforgeError(
            f"{path} is not UTF-8 (bad byte at offset {offset + e.start}); re-encode the file as UTF-8"
        ) from None
    if "\r" in text:  # text-mode reading turns \r\n and a lone \r into \n
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if last and text and not text.endswith("\n"):
        text += "\n"
    return text


def iter_text_blocks(path: Path, start: int, end: int, block_bytes: int = BLOCK_BYTES) -> Iterator[str]:
    """The text of bytes [start, end) of `path`, in blocks cut after a b"\\n"."""
    buf = bytearray()
    buf_offset = start  # file offset of buf[0], for error messages
    with open(path, "rb") as f:
        f.seek(start)
        remaining = end - start
        while remaining > 0:
            data = f.read(min(block_bytes, remaining))
            if not data:  # the file shrank under us: take what there is
                break
            remaining -= len(data)
            buf += data
            cut = buf.rfind(b"\n") + 1
            if remaining > 0 and cut > 0:
                yield decode_block(bytes(buf[:cut]), path, buf_offset, last=False)
                del buf[:cut]
                buf_offset += cut
    if buf:
        yield decode_block(bytes(buf), path, buf_offset, last=True)


def line_sentinel(text: str, taken: dict[str, int]) -> str:
    """A token that occurs nowhere in `text` and is not a key of `taken`.

    It is appended to every line, so it marks each line's eos in the token
    stream; NUL (not whitespace, so one token) is absent from real text.
    """
    s = "\x00"
    while s in text or s in taken:
        s += "\x00"
    return s


def scan_range(path: Path, start: int, end: int, block_bytes: int = BLOCK_BYTES) -> Scan:
    """Tokenize and factorize bytes [start, end) of `path` (a range starting at a line).

    Runs in a worker process when workers > 1, so it takes and returns plain data.
    """
    path = Path(path)
    factor: dict[str, int] = {}
    uniques: list[str] = [""]  # id 0: end of line
    parts: list[np.ndarray] = []
    for text in iter_text_blocks(path, start, end, block_bytes):
        eol = line_sentinel(text, factor)
        tokens = text.replace("\n", f" {eol}\n").split()
        factor[eol] = 0
        # One C-level lookup per token; only tokens not seen before (-1: most of
        # the first block, ~1% later) go through Python. ~20% faster than
        # deduplicating each block with dict.fromkeys first.
        ids = np.fromiter(map(factor.get, tokens, repeat(-1)), dtype=np.int32, count=len(tokens))
        for i in np.flatnonzero(ids < 0).tolist():
            token = tokens[i]
            fid = factor.get(token)
            if fid is None:
                fid = factor[token] = len(uniques)
                uniques.append(token)
            ids[i] = fid
        parts.append(ids)
        del factor[eol]
    fids = np.concatenate(parts) if parts else np.empty(0, dtype=np.int32)
    return Scan(uniques=uniques, fids=fids)


def merge_scans(scans: Sequence[Scan]) -> Scan:
    """Consecutive ranges' scans -> the scan of the whole (ids renumbered by first use)."""
    if len(scans) == 1:
        return scans[0]
    factor: dict[str, int] = {}
    parts = []
    for scan in scans:
        # len(factor) + 1 is evaluated before setdefault inserts, so a new type gets the next id.
        remap = np.fromiter(
            (factor.setdefault(t, len(factor) + 1) for t in scan.uniques[1:]),
            dtype=np.int32,
            count=len(scan.uniques) - 1,
        )
        parts.append(np.concatenate([np.zeros(1, dtype=np.int32), remap])[scan.fids])
    return Scan(uniques=[""] + list(factor), fids=np.concatenate(parts))


def scan_splits(paths: dict[str, Path], workers: int, block_bytes: int = BLOCK_BYTES) -> dict[str, Scan]:
    """Scan every split; with workers > 1, over line-aligned chunks in a process pool."""
    if workers == 1:
        return {name: scan_range(p, 0, p.stat().st_size, block_bytes) for name, p in paths.items()}
    # spawn, not fork: the parent may hold torch's threads (fairseq is imported),
    # and a worker needs only this module and numpy.
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        futures = {
            name: [pool.submit(scan_range, p, a, b, block_bytes) for a, b in pairwise(chunk_offsets(p, workers))]
            for name, p in paths.items()
        }
        return {name: merge_scans([f.result() for f in fs]) for name, fs in futures.items()}


# --------------------------------------------------------------------------- dictionary


def build_dictionary(train: Scan, *, threshold: int, nwords: int, padding_factor: int) -> Dictionary:
    """fairseq's dictionary for the train split, built by fairseq's own code.

    Same counts, same insertion order as `Dictionary.add_file_to_dictionary`
    (a Counter over tokens plus one eos per line, added in sorted order), then
    fairseq's `finalize`.
    """
    from fairseq.data import Dictionary

    counts = np.bincount(train.fids, minlength=len(train.uniques)).tolist()
    d = Dictionary()
    counter = dict(zip(train.uniques[1:], counts[1:]))
    if counts[0]:
        counter[d.eos_word] = counter.get(d.eos_word, 0) + counts[0]
    for word, n in sorted(counter.items()):
        d.add_symbol(word, n)
    d.finalize(threshold=threshold, nwords=nwords, padding_factor=padding_factor)
    return d


def id_table(uniques: list[str], d: Dictionary) -> np.ndarray:
    """Factor id -> dictionary index (unknown types -> unk, id 0 -> eos), as int64."""
    table = np.fromiter(map(d.indices.get, uniques, repeat(d.unk_index)), dtype=np.int64, count=len(uniques))
    table[0] = d.eos_index
    return table


def count_replaced(scan: Scan, table: np.ndarray, d: Dictionary) -> int:
    """Tokens mapped to <unk> that were not literally <unk> (fairseq's "% replaced")."""
    counts = np.bincount(scan.fids, minlength=len(scan.uniques))
    is_unk = table == d.unk_index
    try:
        is_unk[scan.uniques.index(d.unk_word, 1)] = False
    except ValueError:
        pass
    return int(counts[is_unk].sum())


# --------------------------------------------------------------------------- writing


def mmap_index_bytes(sizes: np.ndarray, dtype: np.dtype) -> bytes:
    """The .idx file fairseq's `MMapIndexedDataset.Index.writer` writes for these sentence sizes."""
    sizes = np.asarray(sizes, dtype=np.int64)
    pointers = (np.cumsum(sizes) - sizes) * dtype.itemsize  # byte offset of each sentence
    return b"".join(
        [
            _MMAP_MAGIC,
            struct.pack("<Q", _MMAP_VERSION),
            struct.pack("<B", _MMAP_DTYPE_CODES[dtype]),
            struct.pack("<Q", len(sizes)),
            sizes.astype(np.int32).tobytes(order="C"),
            pointers.astype(np.int64).tobytes(order="C"),
        ]
    )


def sentence_sizes(fids: np.ndarray) -> np.ndarray:
    """Tokens per sentence (incl. eos): the runs of `fids` ending in id 0."""
    ends = np.flatnonzero(fids == 0) + 1
    assert len(fids) == 0 or ends[-1] == len(fids), "every line ends with an eos"
    return np.diff(ends, prepend=0)


def write_split(prefix: Path, scan: Scan, table: np.ndarray, dtype: np.dtype) -> dict[str, int]:
    """Write `prefix`.bin/.idx for one split; return its sentence and token counts.

    Written with numpy rather than fairseq's `MMapIndexedDatasetBuilder`: the
    builder takes one tensor per sentence and its index writer computes pointers
    in a Python loop, ~2 us per sentence; here the whole split is three array
    operations. The bytes are the same (checked against fairseq-preprocess in
    tests/test_preprocess.py).
    """
    sizes = sentence_sizes(scan.fids)
    data = table.astype(dtype)[scan.fids]
    with open(prefix.with_suffix(".bin"), "wb") as f:
        f.write(data.tobytes(order="C"))
    with open(prefix.with_suffix(".idx"), "wb") as f:
        f.write(mmap_index_bytes(sizes, dtype))
    return {"sentences": int(len(sizes)), "tokens": int(len(data))}


def verify_split(prefix: Path, stats: dict[str, int], dtype: np.dtype) -> None:
    """The files on disk have the sizes the counts imply (catches truncated writes)."""
    bin_size = prefix.with_suffix(".bin").stat().st_size
    idx_size = prefix.with_suffix(".idx").stat().st_size
    want_idx = len(_MMAP_MAGIC) + 8 + 1 + 8 + stats["sentences"] * (4 + 8)
    if bin_size != stats["tokens"] * dtype.itemsize or idx_size != want_idx:
        raise OSError(f"{prefix}.bin/.idx are {bin_size}/{idx_size} bytes, expected "
                      f"{stats['tokens'] * dtype.itemsize}/{want_idx}")


# --------------------------------------------------------------------------- checks and atomicity


def check_inputs(corpus_dir: Path, dest_dir: Path, *, threshold: int, nwords: int,
                 padding_factor: int, workers: int) -> dict[str, Path]:
    """Every problem with the arguments, raised once before any work; the split paths."""
    problems = []
    for name, value in (("threshold", threshold), ("nwords", nwords), ("padding_factor", padding_factor)):
        if not isinstance(value, int) or isinstance(value, bool):
            problems.append(f"{name} must be an integer, got {value!r}")
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        problems.append(f"workers must be an integer >= 1, got {workers!r}")
    paths = {s: corpus_dir / f"{s}.txt" for s in SPLITS}
    for p in paths.values():
        if not p.is_file():
            problems.append(
                f"missing {p}: the corpus directory must hold train.txt, valid.txt and test.txt "
                "(one sentence per line); add the file or point --corpus at the directory that has them"
            )
    if dest_dir.exists() and not dest_dir.is_dir():
        problems.append(f"{dest_dir} exists and is not a directory; remove it or choose another --out")
    elif dest_dir.is_dir():
        foreign = sorted(p.name for p in dest_dir.iterdir() if p.name not in OUTPUT_NAMES)
        if foreign:
            problems.append(
                f"{dest_dir} holds files that are not preprocessing output ({', '.join(foreign[:3])}"
                f"{', ...' if len(foreign) > 3 else ''}); choose an empty or new --out"
            )
    if problems:
        raise LmforgeError("; ".join(problems))
    return paths


def replace_dir(src: Path, dest: Path) -> None:
    """Move the complete directory `src` to `dest`, replacing earlier output there.

    Two renames on one filesystem; the old output is kept until the new one is
    in place and restored if the second rename fails.
    """
    if not dest.exists():
        os.rename(src, dest)
        return
    old = dest.parent / f"{dest.name}.old-{os.getpid()}"
    shutil.rmtree(old, ignore_errors=True)
    os.rename(dest, old)
    try:
        os.rename(src, dest)
    except BaseException:
        os.rename(old, dest)
        raise
    shutil.rmtree(old, ignore_errors=True)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------- the step


def preprocess(corpus_dir: str | Path, dest_dir: str | Path, *, threshold: int = 0, nwords: int = -1,
               padding_factor: int = 8, workers: int = 1) -> dict[str, Any]:
    """Build fairseq's dictionary from train.txt and binarize all three splits into `dest_dir`.

    Args mirror fairseq-preprocess: `threshold` (--thresholdsrc: words seen fewer
    times become <unk>), `nwords` (--nwordssrc: dictionary size incl. the 4
    specials, -1 for all), `padding_factor` (--padding-factor), `workers`
    (processes; the output does not depend on it).

    Returns (and writes as `dest_dir/summary.json`)::

        {"vocab_size": len(dictionary) incl. specials and padding,
         "dict_sha256": sha256 of dict.txt,
         "splits": {split: {"sentences": lines, "tokens": ids incl. one eos per line,
                            "unk": tokens replaced by <unk> (literal "<unk>" not counted)}}}

    Raises LmforgeError (one line, before any work) for a missing split file, a bad
    argument or a `dest_dir` holding other files. Output appears at `dest_dir`
    only when complete; on failure earlier output there is left as it was.
    """
    corpus_dir, dest_dir = Path(corpus_dir), Path(dest_dir)
    paths = check_inputs(corpus_dir, dest_dir, threshold=threshold, nwords=nwords,
                         padding_factor=padding_factor, workers=workers)

    from fairseq.data.indexed_dataset import best_fitting_int_dtype

    started = time.perf_counter()
    tmp = dest_dir.parent / f"{dest_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)  # left by a killed run that had our pid
    tmp.mkdir(parents=True)
    try:
        scans = scan_splits(paths, workers)
        d = build_dictionary(scans["train"], threshold=threshold, nwords=nwords, padding_factor=padding_factor)
        d.save(str(tmp / "dict.txt"))
        # fairseq sizes the dtype by len(dictionary): uint16 below 65500 symbols, then uint32.
        dtype = np.dtype(best_fitting_int_dtype(len(d)))
        splits = {}
        for name in SPLITS:
            table = id_table(scans[name].uniques, d)
            stats = write_split(tmp / name, scans[name], table, dtype)
            verify_split(tmp / name, stats, dtype)
            stats["unk"] = count_replaced(scans[name], table, d)
            splits[name] = stats
            logger.info("%s: %d sentences, %d tokens, %d replaced by %s",
                        name, stats["sentences"], stats["tokens"], stats["unk"], d.unk_word)
        summary = {"vocab_size": len(d), "dict_sha256": file_sha256(tmp / "dict.txt"), "splits": splits}
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        replace_dir(tmp, dest_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("wrote %s (%d types) in %.1f s", dest_dir, len(d), time.perf_counter() - started)
    return summary
