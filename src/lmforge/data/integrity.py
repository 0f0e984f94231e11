"""Can fairseq read it? The data-bin's dictionary and mmap splits, and checkpoints, checked before use.

In:  a data-bin location (a directory or s3:// prefix; files are read through lmforge.io.storage,
     S3 with ranged reads) with the names of the split files to check, a dictionary, a local
     checkpoint file.
Out: problems, one line each, naming the file and what is wrong with it (empty: readable):
- `dictionary_problems`: dict.txt as fairseq's `Dictionary.add_from_file` reads it: UTF-8,
  "symbol count [#fairseq:overwrite]" lines, no symbol twice (the 4 specials included);
- `split_problems`: an mmap `.idx`/`.bin` pair (lmforge.data.formats): the header's magic,
  version and dtype code, the `.idx` size its sentence count implies, sizes that are not
  negative, offsets that follow each other, the `.bin` size the sizes imply, a dtype wide
  enough for the dictionary, and (for lmforge's own data-bins) the counts of summary.json;
- `data_bin_problems`: both, for the files a command reads;
- `checkpoint_problem` / `read_checkpoint`: a file `torch.load` opens (tensors memory-mapped,
  not read) holding fairseq's 'model' and 'cfg' or 'args' (and, to resume training from it,
  'optimizer_history'); `model_problems`: a checkpoint with its dict.txt, as a scorer loads them.

Without these, fairseq fails on the same files with a traceback that names neither the file
nor the fault: a truncated .bin (ValueError: offset must be non-negative), a damaged .idx
header (AssertionError: ... --dataset-impl), a duplicate symbol (RuntimeError: Duplicate
word), a cut checkpoint (EOFError, or "failed finding central directory").

Callers: `lmforge train` and its `--dry-run` (training.train.preflight), the worker's choice of
the checkpoint to resume from (training.checkpoints), `lmforge evaluate`
(models.evaluate.check_inputs), `lmforge register` (models.register.register_model, and the CLI
before it opens a tracking run).
"""

from __future__ import annotations

import json
import struct
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from lmforge.data.formats import (
    MMAP_HEADER_BYTES, MMAP_MAGIC, MMAP_VERSION, SPECIALS, idx_bytes, pointers_offset, sizes_offset,
)
from lmforge.errors import LmforgeError
from lmforge.io import storage

#: fairseq's `_code_to_dtype` (indexed_dataset.py): every code its reader accepts.
FAIRSEQ_DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.double,
                  8: np.uint16, 9: np.uint32, 10: np.uint64}
OVERWRITE_FLAG = "#fairseq:overwrite"
ZIP_MAGIC = b"PK\x03\x04"  # torch.save's archive (fairseq's checkpoints) starts so
#: Sentences read at a time when the offsets are checked: 12 MiB of .idx.
CHUNK_SENTENCES = 1 << 20
SHOWN = 3  # duplicates or bad lines named in one message; the rest are counted

_REPREPROCESS = "preprocess the corpus again"
_RETRAIN = "pass another checkpoint, or train again"


class UnreadableFile(LmforgeError):
    """A checkpoint fairseq cannot load: `fault` says what is wrong, the message names the file too."""

    def __init__(self, path: Path, fault: str) -> None:
        self.path, self.fault = path, fault
        super().__init__(f"checkpoint {path}: {fault}; {_RETRAIN}")


# --------------------------------------------------------------------------- dict.txt


def _read_dictionary(uri: str) -> tuple[int | None, list[str]]:
    """(symbols including the 4 specials, problems) of the dict.txt at `uri`, read as fairseq does."""
    try:
        raw = storage.read_range(uri, 0, storage.size(uri))
    except LmforgeError as exc:
        return None, [str(exc)]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return None, [f"{uri} is not UTF-8 (byte {exc.start}): damaged; {_REPREPROCESS}"]
    # fairseq opens it in text mode: \r\n and a lone \r end a line too
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    if lines[-1] == "":
        lines.pop()
    first_line: dict[str, int] = {s: 0 for s in SPECIALS}  # line 0: fairseq adds the specials first
    bad: list[int] = []
    duplicates: list[tuple[str, int, int]] = []
    for number, line in enumerate(lines, 1):
        parts = line.rstrip().rsplit(" ", 1)
        overwrite = len(parts) == 2 and parts[1] == OVERWRITE_FLAG
        if overwrite:
            parts = parts[0].rsplit(" ", 1)
        if len(parts) != 2 or not _is_int(parts[1]):
            bad.append(number)
            continue
        word = parts[0]
        if word in first_line and not overwrite:
            duplicates.append((word, first_line[word], number))
        first_line.setdefault(word, number)
    problems = []
    if bad:
        shown = ", ".join(f"{n} ({lines[n - 1][:30]!r})" for n in bad[:SHOWN])
        more = f" and {len(bad) - SHOWN} more" if len(bad) > SHOWN else ""
        problems.append(f"{uri}: line {shown}{more} is not 'symbol count': truncated or damaged; {_REPREPROCESS}")
    if duplicates:
        shown = ", ".join(f"{w!r} on lines {a} and {b}" if a else f"{w!r} (one of fairseq's specials) on line {b}"
                          for w, a, b in duplicates[:SHOWN])
        more = f" and {len(duplicates) - SHOWN} more" if len(duplicates) > SHOWN else ""
        problems.append(f"{uri} lists a symbol twice: {shown}{more}; fairseq refuses duplicates: {_REPREPROCESS}")
    return len(SPECIALS) + len(lines), problems


def _is_int(text: str) -> bool:
    try:
        int(text)  # fairseq's own test of the count
    except ValueError:
        return False
    return True


def dictionary_problems(uri: str | Path) -> list[str]:
    """What keeps fairseq from loading the dict.txt at `uri` (empty: it loads)."""
    return _read_dictionary(str(uri))[1]


# --------------------------------------------------------------------------- mmap .bin/.idx


def split_problems(data_bin: str | Path, prefix: str, vocab: int | None = None,
                   recorded: dict[str, int] | None = None) -> list[str]:
    """What keeps fairseq from reading the split `prefix` ("train", "input0/valid") of `data_bin`.

    `vocab`: the dictionary's size, which the .idx dtype must hold; `recorded`: the split's
    {"sentences", "tokens"} as summary.json counted them.
    """
    idx_uri, bin_uri = (storage.join(str(data_bin), *f"{prefix}.{ext}".split("/")) for ext in ("idx", "bin"))
    try:
        idx_size, bin_size = storage.size(idx_uri), storage.size(bin_uri)
    except LmforgeError as exc:
        return [str(exc)]
    if idx_size < MMAP_HEADER_BYTES:
        return [f"{idx_uri} is truncated: {idx_size} bytes, less than an mmap index's "
                f"{MMAP_HEADER_BYTES}-byte header; {_REPREPROCESS}"]
    header = storage.read_range(idx_uri, 0, MMAP_HEADER_BYTES)
    magic = header[: len(MMAP_MAGIC)]
    version, code, sentences = struct.unpack("<QBQ", header[len(MMAP_MAGIC):])  # formats.idx_header's layout
    if magic != MMAP_MAGIC:
        return [f"{idx_uri} is not a fairseq mmap index: its header starts {magic!r}, not {MMAP_MAGIC!r} "
                f"(damaged, or written with another --dataset-impl); {_REPREPROCESS}"]
    if version != MMAP_VERSION or code not in FAIRSEQ_DTYPES:
        what = f"version {version} (fairseq reads {MMAP_VERSION})" if version != MMAP_VERSION else \
            f"dtype code {code}, which fairseq does not know"
        return [f"{idx_uri} has a damaged header: {what}; {_REPREPROCESS}"]
    if idx_size != idx_bytes(sentences):
        return [f"{idx_uri} is {idx_size} bytes, but its header counts {sentences} sentences "
                f"({idx_bytes(sentences)} bytes): truncated or damaged; {_REPREPROCESS}"]
    dtype = np.dtype(FAIRSEQ_DTYPES[code])
    tokens, fault = _scan_entries(idx_uri, sentences, dtype.itemsize)
    if fault:
        return [f"{idx_uri}: {fault}: damaged; {_REPREPROCESS}"]
    problems = []
    if bin_size != tokens * dtype.itemsize:
        problems.append(
            f"{bin_uri} is {bin_size} bytes, but {prefix}.idx describes {sentences} sentences of {tokens} tokens "
            f"({tokens * dtype.itemsize} bytes of {dtype.name}): "
            f"{'truncated' if bin_size < tokens * dtype.itemsize else 'too long'}, or not the .bin of this .idx; "
            f"{_REPREPROCESS}")
    elif sentences == 0 or tokens == 0:
        problems.append(f"{bin_uri} holds no tokens: fairseq cannot read an empty split (it memory-maps the file); "
                        f"add text to the {prefix} split and {_REPREPROCESS}")
    if vocab is not None and dtype.kind in "iu" and vocab - 1 > np.iinfo(dtype).max:
        problems.append(f"{idx_uri} stores {dtype.name} ids, too narrow for the {vocab} symbols of the dictionary: "
                        f"binarized with another dict.txt; {_REPREPROCESS}")
    if not problems and recorded is not None and (recorded.get("sentences"), recorded.get("tokens")) != (sentences, tokens):
        problems.append(f"{idx_uri} holds {sentences} sentences of {tokens} tokens, summary.json recorded "
                        f"{recorded.get('sentences')} of {recorded.get('tokens')}: files of two preprocess runs "
                        f"mixed; {_REPREPROCESS}")
    return problems


def _scan_entries(idx_uri: str, sentences: int, itemsize: int) -> tuple[int, str | None]:
    """(tokens, fault): the sentence sizes summed, and the first entry whose size is negative or
    whose byte offset does not follow the sentence before it (fairseq's writer lays them back to back)."""
    tokens, expected = 0, 0
    for start in range(0, sentences, CHUNK_SENTENCES):
        end = min(start + CHUNK_SENTENCES, sentences)
        sizes = np.frombuffer(storage.read_range(idx_uri, sizes_offset(start), sizes_offset(end)), dtype="<i4")
        pointers = np.frombuffer(storage.read_range(idx_uri, pointers_offset(sentences, start),
                                                    pointers_offset(sentences, end)), dtype="<i8")
        negative = np.flatnonzero(sizes < 0)
        if len(negative):
            i = int(negative[0])
            return tokens, f"sentence {start + i} has size {int(sizes[i])}"
        ends = np.cumsum(sizes, dtype=np.int64) * itemsize + expected
        starts = ends - sizes.astype(np.int64) * itemsize
        off = np.flatnonzero(pointers != starts)
        if len(off):
            i = int(off[0])
            return tokens, f"sentence {start + i} starts at byte {int(pointers[i])} of the .bin, not {int(starts[i])}"
        tokens += int(sizes.sum(dtype=np.int64))
        expected = int(ends[-1])
    return tokens, None


# --------------------------------------------------------------------------- a data-bin


def data_bin_problems(data_bin: str | Path, files: Iterable[str], dictionary: str = "dict.txt") -> list[str]:
    """The dictionary and every mmap split among `files` (names relative to `data_bin`, as a task's
    `split_files` gives them; a split is its .idx with its .bin), checked; summary.json's counts
    compared where lmforge's preprocess wrote one."""
    data_bin = str(data_bin)
    vocab, problems = _read_dictionary(storage.join(data_bin, *dictionary.split("/")))
    summary = _summary(data_bin)
    if not problems and vocab is not None and summary.get("vocab_size") not in (None, vocab):
        problems.append(f"{storage.join(data_bin, dictionary)} has {vocab} symbols (with fairseq's 4 specials), "
                        f"summary.json recorded {summary['vocab_size']}: truncated or replaced; {_REPREPROCESS}")
    splits = summary.get("splits") or {}
    for name in sorted(set(files)):
        if name.endswith(".idx"):
            prefix = name[: -len(".idx")]
            problems += split_problems(data_bin, prefix, vocab, splits.get(prefix))
    return problems


def _summary(data_bin: str) -> dict[str, Any]:
    """lmforge's summary.json of the data-bin ({} when there is none, as for fairseq-preprocess's output)."""
    uri = storage.join(data_bin, "summary.json")
    try:
        summary = json.loads(storage.read_text(uri)) if storage.exists(uri) else {}
    except (ValueError, LmforgeError):
        return {}
    return summary if isinstance(summary, dict) else {}


# --------------------------------------------------------------------------- checkpoints


def read_checkpoint(path: str | Path, *, resumable: bool = False) -> dict[str, Any]:
    """The fairseq checkpoint at the local `path` as `torch.load` gives it, its tensors memory-mapped
    (not read); UnreadableFile naming the fault otherwise. `resumable`: training must be able to
    resume from it (fairseq's optimizer_history)."""
    path = Path(path)
    if not path.is_file():
        raise UnreadableFile(path, "does not exist")
    size = path.stat().st_size
    if size == 0:
        raise UnreadableFile(path, "empty (0 bytes): its write never finished")
    with open(path, "rb") as f:
        head = f.read(len(ZIP_MAGIC))
    archive = zipfile.is_zipfile(path)  # looks for the archive's end record: a cut file has none
    if head == ZIP_MAGIC and not archive:
        raise UnreadableFile(path, f"truncated: {size} bytes, a torch.save archive without its end (the write was "
                                   "cut short)")
    import torch

    try:
        # weights_only=False: fairseq checkpoints pickle an argparse Namespace / omegaconf cfg
        # (our own training output). mmap: only the archive's index and the pickle are read.
        state = torch.load(path, map_location="cpu", weights_only=False, mmap=archive)
    except Exception as exc:  # whatever unpickling meets (EOFError, UnpicklingError, RuntimeError, ...)
        raise UnreadableFile(path, f"damaged, or not a PyTorch file (torch.load: {type(exc).__name__}: "
                                   f"{_first_line(exc)})") from None
    if not isinstance(state, dict) or "model" not in state:
        raise UnreadableFile(path, "not a fairseq checkpoint (no 'model' entry)")
    if state.get("cfg") is None and state.get("args") is None:
        raise UnreadableFile(path, "not a fairseq checkpoint (neither 'cfg' nor 'args': fairseq cannot rebuild "
                                   "its model)")
    if resumable and not state.get("optimizer_history"):
        raise UnreadableFile(path, "no training state (no optimizer_history): it can be scored, not resumed from")
    return state


def checkpoint_problem(path: str | Path, *, resumable: bool = False) -> str | None:
    """Why fairseq cannot load the checkpoint at `path` (None: it loads); see `read_checkpoint`."""
    try:
        read_checkpoint(path, resumable=resumable)
    except UnreadableFile as exc:
        return str(exc)
    return None


def model_problems(checkpoint: str | Path, dictionary: str | Path) -> list[str]:
    """A checkpoint and its dict.txt, as a registered model (or any scorer) loads them: what is wrong with each."""
    problem = checkpoint_problem(checkpoint)
    return ([problem] if problem else []) + dictionary_problems(dictionary)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0][:160] if text else "") or type(exc).__name__
