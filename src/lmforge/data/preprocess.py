"""Preprocessing as a map-reduce: a text corpus in, fairseq's binarized language-model data out.

In:  a corpus directory (local path or s3:// prefix) holding `train.txt`,
     `valid.txt` and `test.txt` (UTF-8, one sentence per line).
Out: a data-bin directory holding `dict.txt` and `{train,valid,test}.{bin,idx}`
     byte-identical to what

         fairseq-preprocess --only-source --trainpref C/train.txt --validpref C/valid.txt
             --testpref C/test.txt --destdir D --thresholdsrc T --nwordssrc N
             --padding-factor P --dataset-impl mmap --workers K

     writes for the same (tokenized) text, whatever the number of shards N and
     workers K, plus `summary.json` and the tokenizer (`tokenizer.json` and its
     model file, see lmforge.data.tokenization). fairseq's `preprocess.log` is not written.

    lmforge preprocess --corpus DIR --out DIR [--workers K] [--shards N]

The stages (each a function over URIs; the pipeline runs each as a KFP task,
`preprocess()` runs them all on one machine with a process pool):

1. `prepare`: train (or load) the tokenizer once on the train split, then cut
   every split into N byte ranges exactly where fairseq's `find_offsets` cuts
   (lmforge.data.shards). Shard i is the i-th range of every split.
2. `count_shard` (map, one per shard): read only the shard's ranges (local seek
   or ranged S3 GETs), tokenize, give each token type a small id in order of
   first use and write the id stream plus the types and their counts.
3. `build_dictionary` (reduce): add up the train counts and finalize `dict.txt`
   with fairseq's rules (`finalize_dictionary`); summary statistics.
4. `binarize_shard` (map): the shard's id stream through the dictionary into
   an mmap `.bin` with the dtype fairseq picks, and its sentence sizes.
5. `merge_shards`: shards joined in order into one `.bin`/`.idx` per split.
   On one machine with a local work directory, 4 and 5 are `binarize_in_place`:
   each shard task writes its part straight into the final files (no copying merge).

Memory stays flat: text is read in 64 KiB blocks (1 MiB for a tokenizer), ids are streamed to and from
files, and only per-type tables (the symbol counts) grow with the corpus.

Why it is identical to fairseq-preprocess while much faster (fairseq calls
`Dictionary.index` and fills a torch tensor once per token in Python):
- tokens are `str.split()` of each line: fairseq's `tokenize_line` collapses
  `\\s+`, strips and splits, and Python's `re` `\\s` and `str.split()` use the
  same Unicode whitespace table;
- lines are read as fairseq reads them (text mode, universal newlines: `\\n`,
  `\\r\\n` and a lone `\\r` each end a line; a last line without newline counts);
- each block of text is split once with a sentinel token appended to every
  line, tokens become ids with C-level dict lookups, counts come from
  `np.bincount`, and the dictionary lookup, sentence sizes and eos positions
  are numpy operations; the sentinel is each line's eos, so no per-line Python
  work is left (for `none`; a tokenizer encodes a block of lines in one call);
- the dictionary follows `fairseq.data.Dictionary` exactly: specials `<s>`,
  `<pad>`, `</s>`, `<unk>` first, one `</s>` counted per line, symbols sorted
  by count descending with ties alphabetical, `threshold`, `nwords`, then
  padding with `madeupwordNNNN` (checked against fairseq in tests/test_preprocess.py).
"""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing
import os
import shutil
import struct
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from itertools import repeat
from pathlib import Path
from typing import Any

import numpy as np

from lmforge.data import shards as shards_mod
from lmforge.io import storage
from lmforge.io.staging import fetched_dir, staged_dir
from lmforge.config import SPLITS
from lmforge.io.hashing import hash_file
from lmforge.errors import LmforgeError
from lmforge.logs import Progress
from lmforge.data.shards import Shard
from lmforge.data.tokenization import TOKENIZER_MANIFEST, Tokenizer, load_tokenizer

logger = logging.getLogger(__name__)

# fairseq's Dictionary specials, in index order (bos, pad, eos, unk).
SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")
EOS_INDEX, UNK_INDEX = 2, 3

# Every name preprocessing (ours or fairseq's) writes into a data-bin. A
# destination directory holding only these is earlier output and may be
# replaced; anything else there belongs to someone else and is never deleted.
OUTPUT_NAMES = frozenset(
    {"dict.txt", "summary.json", "preprocess.log", TOKENIZER_MANIFEST, "bpe.json", "sentencepiece.model"}
    | {f"{s}.{e}" for s in SPLITS for e in ("bin", "idx")}
)

# fairseq's MMapIndexedDataset on-disk format (fairseq/data/indexed_dataset.py):
# .idx = magic, version <Q 1, dtype code <B, count <Q, int32 sizes, int64 byte pointers.
_MMAP_MAGIC = b"MMIDIDX\x00\x00"
_MMAP_VERSION = 1
_MMAP_HEADER_BYTES = len(_MMAP_MAGIC) + 8 + 1 + 8
# fairseq's `_code_to_dtype`, inverted (only the integer types a vocabulary can need).
_MMAP_DTYPE_CODES = {np.dtype(np.uint16): 8, np.dtype(np.uint32): 9, np.dtype(np.int64): 5}

# Ids are streamed between stages in runs of this many (256 KiB of int32): a run and
# what binarizing makes of it stay in L2. Against runs of 4 Mi ids, binarizing is
# ~30% faster with 1 process and ~2x with 2 (which otherwise share memory bandwidth).
ID_CHUNK = 64 << 10

# Text block for whitespace tokens (tokenizer `none`): a block's ~12 k token objects
# (~0.7 MB) stay in a core's L2 cache. Against 1 MiB blocks (shards.BLOCK_BYTES, which
# a tokenizer keeps as its batch) counting is ~20% faster with 1 process and ~35% with
# 2, which otherwise contend for the shared L3 (WikiText, 2 cores, bench/preprocess.py).
WHITESPACE_BLOCK_BYTES = 64 << 10


@dataclass(frozen=True)
class Settings:
    """What the output depends on besides the corpus (the `preprocess` config section's content)."""

    threshold: int = 0
    nwords: int = -1
    padding_factor: int = 8
    tokenizer: str = "none"
    model_type: str = "bpe"
    vocab_size: int = 8000
    tokenizer_sample_bytes: int = 0
    tokenizer_file: str = ""

    @classmethod
    def from_config(cls, p: Any) -> Settings:
        """From a `config.PreprocessConfig`."""
        return cls(**{name: getattr(p, name) for name in cls.__dataclass_fields__})


def best_fitting_dtype(vocab_size: int) -> np.dtype:
    """The .bin dtype fairseq chooses for `len(dictionary)` (indexed_dataset.best_fitting_int_dtype)."""
    if vocab_size < 65500:
        return np.dtype(np.uint16)
    if vocab_size < 4294967295:
        return np.dtype(np.uint32)
    return np.dtype(np.int64)


def fetched_tokenizer(uri: str) -> contextlib.AbstractContextManager[Path]:
    """The tokenizer directory `uri`, locally (manifest and model file, no subdirectories)."""
    if storage.local_path(uri) is not None:
        return fetched_dir(uri)
    return fetched_dir(uri, [n for n in storage.list_files(uri) if "/" not in n])


def split_uri(corpus_dir: str, split: str) -> str:
    return storage.join(corpus_dir, f"{split}.txt")


# --------------------------------------------------------------------------- 1. prepare


def prepare(corpus_dir: str, work_dir: str, settings: Settings, shards: int) -> list[Shard]:
    """Save the tokenizer under `work_dir`/tokenizer and return the shard plan (also saved as plan.json)."""
    from lmforge.data import tokenization

    started = time.perf_counter()
    tok_uri = storage.join(work_dir, "tokenizer")
    with staged_dir(tok_uri, last=TOKENIZER_MANIFEST) as tmp:
        if settings.tokenizer == "none":
            tokenization.save_none(tmp)
        elif settings.tokenizer_file:
            tokenization.install_tokenizer(settings.tokenizer, settings.tokenizer_file, tmp)
        else:
            lines = training_lines(split_uri(corpus_dir, "train"), settings.tokenizer_sample_bytes)
            tokenization.train_tokenizer(settings.tokenizer, lines, tmp, vocab_size=settings.vocab_size,
                                         model_type=settings.model_type)
        tokenizer = load_tokenizer(tmp)
    logger.info("tokenizer %s ready in %.1f s", tokenizer, time.perf_counter() - started)
    plan = shards_mod.plan_shards({s: split_uri(corpus_dir, s) for s in SPLITS}, shards)
    with staged_dir(storage.join(work_dir, "plan")) as tmp:
        (tmp / "plan.json").write_text(json.dumps([json.loads(s.to_json()) for s in plan], indent=1) + "\n")
    return plan


def training_lines(train_uri: str, sample_bytes: int) -> Iterator[str]:
    """The train split's lines (all, or the lines of its first `sample_bytes` bytes, cut at a line end)."""
    size = storage.size(train_uri)
    end = size
    if 0 < sample_bytes < size:  # the line holding byte sample_bytes - 1 is the last one read
        end = shards_mod.line_end_at_or_after(lambda a, b: storage.read_range(train_uri, a, b), size, sample_bytes - 1)
    for block in shards_mod.iter_text_blocks(train_uri, 0, end):
        yield from block.split("\n")[:-1]


# --------------------------------------------------------------------------- 2. count (map)


def line_sentinel(text: str, taken: dict[str, int]) -> str:
    """A token that occurs nowhere in `text` and is not a key of `taken`.

    It is appended to every line, so it marks each line's eos in the token
    stream; NUL (not whitespace, so one token) is absent from real text.
    """
    s = "\x00"
    while s in text or s in taken:
        s += "\x00"
    return s


class Factorizer:
    """Token strings -> small integer ids in order of first use (id 0: end of line)."""

    def __init__(self) -> None:
        self.ids: dict[str, int] = {}
        self.types: list[str] = [""]  # id 0: end of line
        self.counts = np.zeros(1, dtype=np.int64)

    def block(self, text: str) -> np.ndarray:
        """Ids of the tokens of `text` (lines ending in "\\n"), each line followed by a 0."""
        eol = line_sentinel(text, self.ids)
        tokens = text.replace("\n", f" {eol}\n").split()
        factor = self.ids
        factor[eol] = 0
        # One C-level lookup per token; only tokens not seen before (-1: most of
        # the first block, ~1% later) go through Python. ~20% faster than
        # deduplicating each block with dict.fromkeys first.
        ids = np.fromiter(map(factor.get, tokens, repeat(-1)), dtype=np.int32, count=len(tokens))
        types = self.types
        for i in np.flatnonzero(ids < 0).tolist():
            token = tokens[i]
            fid = factor.get(token)
            if fid is None:
                fid = factor[token] = len(types)
                types.append(token)
            ids[i] = fid
        del factor[eol]
        counts = np.bincount(ids, minlength=len(types))
        counts[: len(self.counts)] += self.counts
        self.counts = counts
        return ids


def encode_block(text: str, tokenizer: Tokenizer) -> str:
    """A block of raw lines -> the same lines as tokenizer output (for `none`, the text itself)."""
    if tokenizer.kind == "none":
        return text
    lines = text.split("\n")[:-1]  # "\n" only: fairseq's lines (other Unicode breaks stay inside a line)
    return "\n".join(tokenizer.encode_lines(lines)) + "\n"


def scan_range(uri: str, start: int, end: int, tokenizer: Tokenizer, ids_file: Path,
               block_bytes: int | None = None) -> Factorizer:
    """Tokenize bytes [start, end) of `uri`, writing the ids to `ids_file`; the types and counts."""
    factorizer = Factorizer()
    default = WHITESPACE_BLOCK_BYTES if tokenizer.kind == "none" else shards_mod.BLOCK_BYTES
    with open(ids_file, "wb") as out:
        for text in shards_mod.iter_text_blocks(uri, start, end, block_bytes or default):
            out.write(factorizer.block(encode_block(text, tokenizer)).tobytes())
    return factorizer


def write_types(path: Path, factorizer: Factorizer) -> None:
    """Types (without the eol placeholder) one per line: tokens hold no whitespace, so no "\\n"."""
    path.write_text("\n".join(factorizer.types[1:]), encoding="utf-8")


def read_types(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    return [""] + (text.split("\n") if text else [])


def shard_name(index: int) -> str:
    return f"{index:05d}"


COUNT_FILES = tuple(f"{s}.{e}" for s in SPLITS for e in ("ids", "types", "counts")) + ("shard.json",)


def count_shard(corpus_dir: str, work_dir: str, shard: Shard) -> str:
    """Map 1: tokenize and count shard `shard` of every split; returns the shard's count directory.

    Writes `{split}.ids` (int32 ids, 0 = end of line), `{split}.types` and
    `{split}.counts` (int64 per id; [0] is the number of lines) and, last,
    `shard.json` with the shard and its token counts.
    """
    out = storage.join(work_dir, "count", shard_name(shard.index))
    with fetched_tokenizer(storage.join(work_dir, "tokenizer")) as tok_dir:
        tokenizer = load_tokenizer(tok_dir)
        with staged_dir(out, last="shard.json") as tmp:
            stats = {}
            for split, (start, end) in shard.ranges.items():
                f = scan_range(split_uri(corpus_dir, split), start, end, tokenizer, tmp / f"{split}.ids")
                write_types(tmp / f"{split}.types", f)
                (tmp / f"{split}.counts").write_bytes(f.counts.tobytes())
                stats[split] = {"sentences": int(f.counts[0]), "tokens": int(f.counts.sum()), "types": len(f.types) - 1}
            (tmp / "shard.json").write_text(json.dumps({"shard": json.loads(shard.to_json()), "splits": stats},
                                                       sort_keys=True) + "\n")
    return out


# --------------------------------------------------------------------------- 3. dictionary (reduce)


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
    return "".join(f"{w} {c}\n" for w, c in symbols)


def read_dictionary(path: Path) -> dict[str, int]:
    """dict.txt -> symbol -> index (specials included), as fairseq's `Dictionary.load` gives them."""
    index = {w: i for i, w in enumerate(SPECIALS)}
    for line in path.read_text(encoding="utf-8").split("\n"):
        if line:
            word = line.rsplit(" ", 1)[0]
            index.setdefault(word, len(index))
    return index


def id_table(types: list[str], index: dict[str, int]) -> np.ndarray:
    """Shard id -> dictionary index (unknown types -> unk, id 0 -> eos), as int64."""
    table = np.fromiter(map(index.get, types, repeat(UNK_INDEX)), dtype=np.int64, count=len(types))
    table[0] = EOS_INDEX
    return table


def _read_counts(directory: Path, split: str) -> tuple[list[str], np.ndarray]:
    types = read_types(directory / f"{split}.types")
    counts = np.fromfile(directory / f"{split}.counts", dtype=np.int64)
    assert len(types) == len(counts), f"{directory}: {split}.types and {split}.counts disagree"
    return types, counts


def add_counts(totals: dict[str, int], types: list[str], counts: np.ndarray) -> None:
    """Add one shard's counts of one split to `totals`; id 0 (end of line) counts as "</s>", as fairseq does."""
    eol = SPECIALS[EOS_INDEX]
    values = counts.tolist()
    if not totals:  # the first shard: types are distinct, so a dict built in C holds them
        totals.update(zip(types[1:], values[1:]))
    else:
        get = totals.get
        for word, n in zip(types[1:], values[1:]):
            totals[word] = get(word, 0) + n
    totals[eol] = totals.get(eol, 0) + values[0]


def build_dictionary(work_dir: str, count_dirs: Sequence[str], settings: Settings) -> str:
    """Reduce: `dict.txt` from the train counts of every shard, and `summary.json`; returns their directory."""
    started = time.perf_counter()
    names = [f"{s}.{e}" for s in SPLITS for e in ("types", "counts")]
    totals: dict[str, dict[str, int]] = {s: {} for s in SPLITS}
    splits = {s: {"sentences": 0, "tokens": 0, "unk": 0} for s in SPLITS}
    for uri in count_dirs:  # each shard read once; only per-type tables are kept
        with fetched_dir(uri, names) as d:
            for split in SPLITS:
                types, counts = _read_counts(d, split)
                add_counts(totals[split], types, counts)
                splits[split]["sentences"] += int(counts[0])
                splits[split]["tokens"] += int(counts.sum())
    symbols = finalize_dictionary(totals["train"], threshold=settings.threshold, nwords=settings.nwords,
                                  padding_factor=settings.padding_factor)
    index = {w: i for i, w in enumerate(SPECIALS)} | {w: i + len(SPECIALS) for i, (w, _) in enumerate(symbols)}
    for split in SPLITS:
        # fairseq's "replaced": tokens that became <unk> (a literal "<unk>" is in the index, so not counted).
        splits[split]["unk"] = sum(n for w, n in totals[split].items() if w not in index)
    out = storage.join(work_dir, "dict")
    with staged_dir(out, last="summary.json") as tmp:
        (tmp / "dict.txt").write_text(dictionary_text(symbols), encoding="utf-8")
        with fetched_tokenizer(storage.join(work_dir, "tokenizer")) as tok_dir:
            tokenizer = load_tokenizer(tok_dir)
        summary = {
            "vocab_size": len(SPECIALS) + len(symbols),
            "dict_sha256": hash_file(tmp / "dict.txt")[0],
            "splits": splits,
            "tokenizer": {"kind": tokenizer.kind, "sha256": tokenizer.sha256},
        }
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    logger.info("dictionary: %d symbols from %d shards in %.1f s", summary["vocab_size"], len(count_dirs),
                time.perf_counter() - started)
    return out


# --------------------------------------------------------------------------- 4. binarize (map)


def iter_sentence_sizes(chunks: Iterator[np.ndarray]) -> Iterator[np.ndarray]:
    """Id chunks (of lines that each end in id 0) -> sentence sizes incl. eos, chunk by chunk."""
    carry = 0
    for ids in chunks:
        ends = np.flatnonzero(ids == 0) + 1
        if len(ends):
            sizes = np.diff(ends, prepend=0)
            sizes[0] += carry
            carry = len(ids) - int(ends[-1])
            yield sizes
        else:
            carry += len(ids)
    assert carry == 0, "every line ends with an eos"


def iter_ids(path: Path, chunk: int | None = None) -> Iterator[np.ndarray]:
    """The int32 values of `path` in runs of `chunk` (default ID_CHUNK)."""
    with open(path, "rb") as f:
        while True:
            ids = np.fromfile(f, dtype=np.int32, count=chunk or ID_CHUNK)
            if not len(ids):
                return
            yield ids


def written(chunks: Iterator[np.ndarray], table: np.ndarray, out: Any) -> Iterator[np.ndarray]:
    """Pass id chunks through, writing each one's dictionary indices to `out` on the way."""
    for ids in chunks:
        out.write(table[ids].tobytes())
        yield ids


BIN_FILES = tuple(f"{s}.{e}" for s in SPLITS for e in ("bin", "sizes")) + ("bin.json",)


def binarize_shard(work_dir: str, count_dir: str, dictionary_dir: str) -> str:
    """Map 2: the shard's ids through dict.txt into `{split}.bin` (fairseq's dtype) and `{split}.sizes` (int32)."""
    index_name = count_dir.rstrip("/").rsplit("/", 1)[-1]
    out = storage.join(work_dir, "bin", index_name)
    with fetched_dir(dictionary_dir, ["dict.txt"]) as d:
        index = read_dictionary(d / "dict.txt")
    dtype = best_fitting_dtype(len(index))
    with fetched_dir(count_dir, COUNT_FILES) as src, staged_dir(out, last="bin.json") as tmp:
        stats = {}
        for split in SPLITS:
            table = id_table(read_types(src / f"{split}.types"), index).astype(dtype)
            tokens = sentences = 0
            with open(tmp / f"{split}.bin", "wb") as bin_out, open(tmp / f"{split}.sizes", "wb") as sizes_out:
                for sizes in iter_sentence_sizes(written(iter_ids(src / f"{split}.ids"), table, bin_out)):
                    sizes_out.write(sizes.astype(np.int32).tobytes())
                    sentences += len(sizes)
                    tokens += int(sizes.sum())
            stats[split] = {"sentences": sentences, "tokens": tokens}
        shard_info = json.loads((src / "shard.json").read_text())
        (tmp / "bin.json").write_text(json.dumps({"shard": shard_info["shard"], "dtype": dtype.name, "splits": stats},
                                                 sort_keys=True) + "\n")
    return out


# --------------------------------------------------------------------------- 5. merge


def copy_into(dst: Any, src: Path, chunk: int = 8 << 20) -> int:
    n = 0
    with open(src, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            dst.write(block)
            n += len(block)
    return n


def idx_header(dtype: np.dtype, sentences: int) -> bytes:
    return (_MMAP_MAGIC + struct.pack("<Q", _MMAP_VERSION) + struct.pack("<B", _MMAP_DTYPE_CODES[dtype])
            + struct.pack("<Q", sentences))


def sentence_pointers(sizes: np.ndarray, pointer: int, dtype: np.dtype) -> tuple[np.ndarray, int]:
    """Byte offsets in .bin (int64) of sentences of `sizes` tokens starting at byte `pointer`; and the next one."""
    ends = np.cumsum(sizes, dtype=np.int64) * dtype.itemsize + pointer
    return ends - sizes.astype(np.int64) * dtype.itemsize, int(ends[-1]) if len(ends) else pointer


def write_merged_split(prefix: Path, parts: Sequence[Path], split: str, dtype: np.dtype) -> dict[str, int]:
    """One split's `.bin`/`.idx` from the shards' parts, in order (fairseq's `merge_file_` then `finalize`)."""
    counts = [(p / f"{split}.sizes").stat().st_size // 4 for p in parts]
    with open(prefix.with_suffix(".bin"), "wb") as out:
        nbytes = sum(copy_into(out, p / f"{split}.bin") for p in parts)
    with open(prefix.with_suffix(".idx"), "wb") as out:
        out.write(idx_header(dtype, sum(counts)))
        for p in parts:
            copy_into(out, p / f"{split}.sizes")
        pointer = 0  # byte offset of the next sentence in .bin
        for p in parts:
            for sizes in iter_ids(p / f"{split}.sizes"):
                pointers, pointer = sentence_pointers(sizes, pointer, dtype)
                out.write(pointers.tobytes())
    stats = {"sentences": sum(counts), "tokens": nbytes // dtype.itemsize}
    verify_split(prefix, stats, dtype)
    return stats


def verify_split(prefix: Path, stats: dict[str, int], dtype: np.dtype) -> None:
    """The files on disk have the sizes the counts imply (catches truncated writes)."""
    bin_size = prefix.with_suffix(".bin").stat().st_size
    idx_size = prefix.with_suffix(".idx").stat().st_size
    want_idx = _MMAP_HEADER_BYTES + stats["sentences"] * (4 + 8)
    if bin_size != stats["tokens"] * dtype.itemsize or idx_size != want_idx:
        raise OSError(f"{prefix}.bin/.idx are {bin_size}/{idx_size} bytes, expected "
                      f"{stats['tokens'] * dtype.itemsize}/{want_idx}")


def merge_shards(work_dir: str, bin_dirs: Sequence[str], dictionary_dir: str, dest: str) -> dict[str, Any]:
    """Join the shards' binarized parts in order into the data-bin `dest`; returns the summary."""
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        d = stack.enter_context(fetched_dir(dictionary_dir, ["dict.txt", "summary.json"]))
        tok = stack.enter_context(fetched_tokenizer(storage.join(work_dir, "tokenizer")))
        parts = [stack.enter_context(fetched_dir(uri, BIN_FILES)) for uri in bin_dirs]
        summary = json.loads((d / "summary.json").read_text())
        dtype = best_fitting_dtype(summary["vocab_size"])
        with staged_dir(dest, last="summary.json") as tmp:
            for split in SPLITS:
                stats = write_merged_split(tmp / split, parts, split, dtype)
                want = summary["splits"][split]
                if (stats["sentences"], stats["tokens"]) != (want["sentences"], want["tokens"]):
                    raise OSError(f"{split}: merged {stats} but the counts said {want}; a shard output is damaged")
            add_metadata(tmp, d, tok)
    logger.info("merged %d shards into %s in %.1f s", len(bin_dirs), dest, time.perf_counter() - started)
    return summary


def add_metadata(data_bin: Path, dictionary: Path, tokenizer: Path) -> None:
    """The tokenizer's files, dict.txt and, last, summary.json into the data-bin being written."""
    for f in load_tokenizer(tokenizer).files():
        shutil.copyfile(f, data_bin / f.name)
    shutil.copyfile(dictionary / "dict.txt", data_bin / "dict.txt")
    # summary.json last: on S3 its presence says the data-bin is complete.
    shutil.copyfile(dictionary / "summary.json", data_bin / "summary.json")


# --------------------------------------------------------------------------- 4+5 on one machine: binarize in place
#
# On one machine every shard task can write its part of a split straight into the
# split's final .bin and .idx: after map 1 the counts fix where each part goes
# (tokens and sentences before it). That saves writing per-shard parts and the
# serial merge that copies them, the part of the run that no worker count speeds up.


def part_layout(shard_stats: Sequence[dict[str, dict[str, int]]]) -> list[dict[str, tuple[int, int, int]]]:
    """Per shard, per split: (tokens before its part, sentences before it, sentences of the whole split)."""
    totals = {s: sum(st[s]["sentences"] for st in shard_stats) for s in SPLITS}
    tokens, sentences = dict.fromkeys(SPLITS, 0), dict.fromkeys(SPLITS, 0)
    layout = []
    for st in shard_stats:
        layout.append({s: (tokens[s], sentences[s], totals[s]) for s in SPLITS})
        for s in SPLITS:
            tokens[s] += st[s]["tokens"]
            sentences[s] += st[s]["sentences"]
    return layout


def allocate_split(prefix: Path, tokens: int, sentences: int, dtype: np.dtype) -> None:
    """A split's .bin and .idx at their final sizes, the .idx header written; the shards fill in the rest."""
    with open(prefix.with_suffix(".bin"), "wb") as f:
        f.truncate(tokens * dtype.itemsize)
    with open(prefix.with_suffix(".idx"), "wb") as f:
        f.write(idx_header(dtype, sentences))
        f.truncate(_MMAP_HEADER_BYTES + sentences * (4 + 8))


def binarize_shard_in_place(count_dir: str, dictionary_dir: str, data_bin: str,
                            layout: dict[str, tuple[int, int, int]]) -> dict[str, dict[str, int]]:
    """Map 2, one machine: the shard's ids through dict.txt into its parts of the allocated `data_bin` files.

    `data_bin` is a local directory; `layout` this shard's entry of `part_layout`.
    Returns per split the sentences and tokens written.
    """
    with fetched_dir(dictionary_dir, ["dict.txt"]) as d:
        index = read_dictionary(d / "dict.txt")
    dtype = best_fitting_dtype(len(index))
    stats = {}
    with fetched_dir(count_dir, COUNT_FILES) as src:
        for split in SPLITS:
            first_token, first_sentence, total = layout[split]
            table = id_table(read_types(src / f"{split}.types"), index).astype(dtype)
            prefix = Path(data_bin) / split
            tokens = sentences = 0
            pointer = first_token * dtype.itemsize
            with open(prefix.with_suffix(".bin"), "r+b") as bin_out, \
                    open(prefix.with_suffix(".idx"), "r+b") as sizes_out, \
                    open(prefix.with_suffix(".idx"), "r+b") as pointers_out:
                bin_out.seek(pointer)
                sizes_out.seek(_MMAP_HEADER_BYTES + 4 * first_sentence)
                pointers_out.seek(_MMAP_HEADER_BYTES + 4 * total + 8 * first_sentence)
                for sizes in iter_sentence_sizes(written(iter_ids(src / f"{split}.ids"), table, bin_out)):
                    sizes_out.write(sizes.astype(np.int32).tobytes())
                    pointers, pointer = sentence_pointers(sizes, pointer, dtype)
                    pointers_out.write(pointers.tobytes())
                    sentences += len(sizes)
                    tokens += int(sizes.sum())
            stats[split] = {"sentences": sentences, "tokens": tokens}
    return stats


def shard_stats(count_dir: str) -> dict[str, dict[str, int]]:
    with fetched_dir(count_dir, ["shard.json"]) as d:
        return json.loads((d / "shard.json").read_text())["splits"]


def binarize_in_place(work_dir: str, count_dirs: Sequence[str], dictionary_dir: str, dest: str,
                      run: Callable[[Callable[..., Any], list[tuple]], list[Any]]) -> dict[str, Any]:
    """Maps 2 and 5 on one machine: every shard binarized (by `run`, maybe in parallel) into `dest`; the summary."""
    started = time.perf_counter()
    expected = [shard_stats(c) for c in count_dirs]
    layout = part_layout(expected)
    with contextlib.ExitStack() as stack:
        d = stack.enter_context(fetched_dir(dictionary_dir, ["dict.txt", "summary.json"]))
        tok = stack.enter_context(fetched_tokenizer(storage.join(work_dir, "tokenizer")))
        summary = json.loads((d / "summary.json").read_text())
        dtype = best_fitting_dtype(summary["vocab_size"])
        with staged_dir(dest, last="summary.json") as tmp:
            for split in SPLITS:
                want = summary["splits"][split]
                allocate_split(tmp / split, want["tokens"], want["sentences"], dtype)
            written_stats = run(binarize_shard_in_place, [(c, dictionary_dir, str(tmp), part)
                                                          for c, part in zip(count_dirs, layout)])
            for c, want, got in zip(count_dirs, expected, written_stats):
                for split in SPLITS:
                    if (got[split]["sentences"], got[split]["tokens"]) != (want[split]["sentences"],
                                                                          want[split]["tokens"]):
                        raise OSError(f"{c}: {split} binarized to {got[split]} but was counted as {want[split]}; "
                                      "a shard output is damaged")
            for split in SPLITS:
                verify_split(tmp / split, summary["splits"][split], dtype)
            add_metadata(tmp, d, tok)
    logger.info("binarized %d shards into %s in %.1f s", len(count_dirs), dest, time.perf_counter() - started)
    return summary


# --------------------------------------------------------------------------- one machine


def check_inputs(corpus_dir: str, dest_dir: str, settings: Settings, *, workers: int, shards: int) -> None:
    """Every problem with the arguments, raised once before any work."""
    problems = []
    for name in ("threshold", "nwords", "padding_factor", "vocab_size", "tokenizer_sample_bytes"):
        value = getattr(settings, name)
        if not isinstance(value, int) or isinstance(value, bool):
            problems.append(f"{name} must be an integer, got {value!r}")
    for name, value in (("workers", workers), ("shards", shards)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            problems.append(f"{name} must be an integer >= 1, got {value!r}")
    from lmforge.data.tokenization import KINDS

    if settings.tokenizer not in KINDS:
        problems.append(f"tokenizer {settings.tokenizer!r} is unknown (use {', '.join(KINDS)})")
    missing = [uri for uri in (split_uri(corpus_dir, split) for split in SPLITS) if not storage.exists(uri)]
    if missing:
        problems.append(
            f"missing {', '.join(missing)}: the corpus directory must hold train.txt, valid.txt and test.txt "
            "(one sentence per line); add the files or point --corpus at the directory that has them"
        )
    dest = storage.local_path(dest_dir)
    if dest is not None and dest.exists() and not dest.is_dir():
        problems.append(f"{dest} exists and is not a directory; remove it or choose another --out")
    elif dest is not None and dest.is_dir():
        foreign = sorted(p.name for p in dest.iterdir() if p.name not in OUTPUT_NAMES)
        if foreign:
            problems.append(
                f"{dest} holds files that are not preprocessing output ({', '.join(foreign[:3])}"
                f"{', ...' if len(foreign) > 3 else ''}); choose an empty or new --out"
            )
    if problems:
        raise LmforgeError("; ".join(problems))


def _pool(workers: int) -> ProcessPoolExecutor:
    """A process pool of `workers`: forked where that is safe (a worker then starts in milliseconds,
    not the ~0.3 s of importing numpy and lmforge again), else spawned. Forking a process whose
    threads may hold locks can deadlock the child: tokenizers' Rust thread pool (after training
    or encoding) and torch's (fairseq imported) are such; numpy's OpenBLAS threads are not
    (OpenBLAS re-creates them after a fork)."""
    threaded = any(name in sys.modules for name in ("tokenizers", "torch"))
    ctx = multiprocessing.get_context("spawn" if threaded or sys.platform != "linux" else "fork")
    return ProcessPoolExecutor(max_workers=workers, mp_context=ctx)


def _run_all(fn: Callable[..., Any], jobs: list[tuple], pool: ProcessPoolExecutor | None, bar: Progress,
             sizes: list[int], names: list[str]) -> list[Any]:
    """Run `fn(*job)` for every job, on `pool` when given; results in job order."""
    if pool is None:
        results = []
        for job, size, name in zip(jobs, sizes, names):
            results.append(fn(*job))
            bar.update(size, name)
        return results
    futures = [pool.submit(fn, *job) for job in jobs]
    for future, size, name in zip(futures, sizes, names):
        future.result()
        bar.update(size, name)
    return [f.result() for f in futures]


def preprocess(corpus_dir: str | Path, dest_dir: str | Path, *, threshold: int = 0, nwords: int = -1,
               padding_factor: int = 8, workers: int = 1, shards: int | None = None, tokenizer: str = "none",
               model_type: str = "bpe", vocab_size: int = 8000, tokenizer_sample_bytes: int = 0,
               tokenizer_file: str = "", work_dir: str | Path | None = None) -> dict[str, Any]:
    """Build fairseq's dictionary from train.txt and binarize all three splits into `dest_dir`, on this machine.

    The same stages the pipeline fans out, with `shards` shards (default: one per
    worker) run on `workers` processes. Args mirror fairseq-preprocess: `threshold`
    (--thresholdsrc), `nwords` (--nwordssrc: dictionary size incl. the 4
    specials, -1 for all), `padding_factor` (--padding-factor); the tokenizer
    settings are those of the `preprocess` config section. The output does not
    depend on `workers` or `shards`.

    Returns (and writes as `dest_dir/summary.json`)::

        {"vocab_size": len(dictionary) incl. specials and padding,
         "dict_sha256": sha256 of dict.txt,
         "splits": {split: {"sentences": lines, "tokens": ids incl. one eos per line,
                            "unk": tokens replaced by <unk> (literal "<unk>" not counted)}},
         "tokenizer": {"kind": ..., "sha256": ... ("" for none)}}

    Raises LmforgeError (one line, before any work) for a missing split file, a bad
    argument or a `dest_dir` holding other files. Output appears at `dest_dir`
    only when complete; on failure earlier output there is left as it was.
    """
    corpus_dir, dest_dir = str(corpus_dir), str(dest_dir)
    settings = Settings(threshold=threshold, nwords=nwords, padding_factor=padding_factor, tokenizer=tokenizer,
                        model_type=model_type, vocab_size=vocab_size, tokenizer_sample_bytes=tokenizer_sample_bytes,
                        tokenizer_file=tokenizer_file)
    shards = workers if shards is None else shards
    check_inputs(corpus_dir, dest_dir, settings, workers=workers, shards=shards)
    started = time.perf_counter()
    dest_local = storage.local_path(dest_dir)
    scratch_parent = dest_local.parent if dest_local is not None and work_dir is None else None
    if scratch_parent is not None:
        scratch_parent.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        if work_dir is None:
            work = stack.enter_context(tempfile.TemporaryDirectory(prefix=".preprocess-", dir=scratch_parent))
        else:
            work = str(work_dir)
        plan = prepare(corpus_dir, work, settings, shards)
        sizes = [s.nbytes for s in plan]
        names = [f"shard {s.index + 1}/{len(plan)}" for s in plan]
        bar = Progress("preprocess", 2 * sum(sizes), logger=logger)
        stack.callback(bar.close)
        pool = stack.enter_context(_pool(min(workers, len(plan)))) if min(workers, len(plan)) > 1 else None
        counted = _run_all(count_shard, [(corpus_dir, work, s) for s in plan], pool, bar, sizes,
                           [f"{n} counted" for n in names])
        dictionary = build_dictionary(work, counted, settings)
        binarized = [f"{n} binarized" for n in names]
        if storage.local_path(work) is not None:
            summary = binarize_in_place(work, counted, dictionary, dest_dir,
                                        lambda fn, jobs: _run_all(fn, jobs, pool, bar, sizes, binarized))
        else:  # the pipeline's own tasks, which keep every intermediate output on S3
            parts = _run_all(binarize_shard, [(work, c, dictionary) for c in counted], pool, bar, sizes, binarized)
            summary = merge_shards(work, parts, dictionary, dest_dir)
    for name, stats in summary["splits"].items():
        logger.info("%s: %d sentences, %d tokens, %d replaced by <unk>", name, stats["sentences"], stats["tokens"],
                    stats["unk"])
    logger.info("wrote %s (%d types, %d shards, %d workers) in %.1f s", dest_dir, summary["vocab_size"], len(plan),
                workers, time.perf_counter() - started)
    return summary


def settings_kwargs(p: Any) -> dict[str, Any]:
    """`preprocess()` keyword arguments from a `config.PreprocessConfig`."""
    return asdict(Settings.from_config(p))
