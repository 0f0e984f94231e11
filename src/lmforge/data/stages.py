"""The preprocessing stages: a text corpus in, fairseq's binarized language-model data out, as a map-reduce.

In:  a corpus directory (local path or s3:// prefix) holding `train.txt`,
     `valid.txt` and `test.txt` (UTF-8, one sentence per line), the preprocess
     `Settings` and a work directory (local or s3://) for the stages' outputs.
Out: a data-bin directory holding `dict.txt` and `{train,valid,test}.{bin,idx}`
     byte-identical to fairseq-preprocess's (see lmforge.data.preprocess), plus
     `summary.json` and the tokenizer files.

Each stage is a function over URIs. The pipeline runs each as a KFP task
(lmforge.steps.preprocess_plan ... preprocess_merge); `lmforge preprocess --corpus DIR
--out DIR` runs them all on one machine (lmforge.data.preprocess):

1. `prepare`: cut every split into N byte ranges exactly where fairseq's
   `find_offsets` cuts (lmforge.data.shards; shard i is the i-th range of every
   split), refuse an empty split, then train (or load) the tokenizer once on the
   train split.
2. `count_shard` (map, one per shard): read only the shard's ranges (local seek
   or ranged S3 GETs), tokenize, give each token type a small id in order of
   first use and write the id stream plus the types and their counts (and how
   many lines were blank or one token, for the corpus checks).
3. `build_dictionary` (reduce): add up the train counts and finalize `dict.txt`
   with fairseq's rules (lmforge.data.formats.finalize_dictionary); summary statistics.
   Before writing, the corpus checks (lmforge.data.corpus_checks) refuse a corpus
   that cannot train.
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
- the dictionary follows `fairseq.data.Dictionary` exactly (lmforge.data.formats).
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from itertools import repeat
from pathlib import Path
from typing import Any

import numpy as np

from lmforge.config import SPLITS, CorpusChecksConfig
from lmforge.data import corpus_checks, formats
from lmforge.data import shards as shards_mod
from lmforge.data.formats import EOS_INDEX, SPECIALS, UNK_INDEX, best_fitting_dtype
from lmforge.data.corpus_checks import SplitCounts, TrainingShape
from lmforge.data.shards import Shard
from lmforge.data.tokenization import TOKENIZER_MANIFEST, Tokenizer, load_tokenizer
from lmforge.errors import LmforgeError
from lmforge.io import storage
from lmforge.io.hashing import hash_file
from lmforge.io.staging import fetched_dir, staged_dir

logger = logging.getLogger(__name__)

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


def fetched_tokenizer(uri: str) -> contextlib.AbstractContextManager[Path]:
    """The tokenizer directory `uri`, locally (manifest and model file, no subdirectories)."""
    if storage.local_path(uri) is not None:
        return fetched_dir(uri)
    return fetched_dir(uri, [n for n in storage.list_files(uri) if "/" not in n])


def split_uri(corpus_dir: str, split: str) -> str:
    return storage.join(corpus_dir, f"{split}.txt")


# --------------------------------------------------------------------------- 1. prepare


def prepare(corpus_dir: str, work_dir: str, settings: Settings, shards: int,
            checks: CorpusChecksConfig | None = CorpusChecksConfig()) -> list[Shard]:
    """Save the tokenizer under `work_dir`/tokenizer and return the shard plan (also saved as plan.json).

    With `checks` (None: none), an empty split, or a train split of blank lines only that a
    tokenizer would train on, is refused (CorpusError) before the tokenizer trains.
    """
    from lmforge.data import tokenization

    started = time.perf_counter()
    plan = shards_mod.plan_shards({s: split_uri(corpus_dir, s) for s in SPLITS}, shards)
    if checks is not None:
        sizes = {s: sum(end - start for start, end in (shard.ranges[s] for shard in plan)) for s in SPLITS}
        corpus_checks.check({s: SplitCounts(lines=0, tokens=0) for s, size in sizes.items() if size == 0}, checks)
    tok_uri = storage.join(work_dir, "tokenizer")
    with staged_dir(tok_uri, last=TOKENIZER_MANIFEST) as tmp:
        if settings.tokenizer == "none":
            tokenization.save_none(tmp)
        elif settings.tokenizer_file:
            tokenization.install_tokenizer(settings.tokenizer, settings.tokenizer_file, tmp)
        else:
            train_tokenizer(corpus_dir, settings, tmp, checks)
        tokenizer = load_tokenizer(tmp)
    logger.info("tokenizer %s ready in %.1f s", tokenizer, time.perf_counter() - started)
    with staged_dir(storage.join(work_dir, "plan")) as tmp:
        (tmp / "plan.json").write_text(json.dumps([json.loads(s.to_json()) for s in plan], indent=1) + "\n")
    return plan


def train_tokenizer(corpus_dir: str, settings: Settings, directory: Path,
                    checks: CorpusChecksConfig | None) -> None:
    """Train the tokenizer of `settings` on the train split into `directory`; a vocabulary the text
    could not fill gets a warning. With `checks`, a train split read whole that holds no text is
    refused with the corpus checks' line (not the trainer's error, nor a tokenizer of nothing)."""
    from lmforge.data import tokenization

    train_uri = split_uri(corpus_dir, "train")
    lines = training_lines(train_uri, settings.tokenizer_sample_bytes)
    seen = {"lines": 0, "text": 0}

    def counted(lines: Iterator[str]) -> Iterator[str]:
        for line in lines:
            seen["lines"] += 1
            seen["text"] += bool(line.strip())  # str.strip and fairseq's str.split share one whitespace table
            yield line

    whole = checks is not None and not 0 < settings.tokenizer_sample_bytes < storage.size(train_uri)

    def refuse_blank() -> None:
        if whole and seen["text"] == 0:
            corpus_checks.check({"train": SplitCounts(lines=seen["lines"], tokens=seen["lines"])}, checks)

    try:
        tokenizer = tokenization.train_tokenizer(settings.tokenizer, counted(lines) if whole else lines, directory,
                                                 vocab_size=settings.vocab_size, model_type=settings.model_type)
    except LmforgeError:
        refuse_blank()  # sentencepiece fails on no text, with a message that does not say so
        raise
    refuse_blank()  # byte-level BPE trains on nothing
    corpus_checks.enforce(corpus_checks.vocabulary_review(settings.vocab_size, tokenizer.kind,
                                                          tokenizer.vocabulary_size()))


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
        self.blank = self.one_token = 0  # lines of no token and of exactly one (lmforge.data.corpus_checks)

    def block(self, text: str, raw_blank: np.ndarray | None = None) -> np.ndarray:
        """Ids of the tokens of `text` (lines ending in "\\n"), each line followed by a 0.

        `raw_blank`: which lines were blank before a tokenizer encoded them (a tokenizer may turn
        whitespace into a token, byte-level BPE's `Ġ`); None: `text` is the raw text.
        """
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
        # A block holds whole lines, so its ends of line give each line's length (~1% of counting).
        lengths = np.diff(np.flatnonzero(ids == 0), prepend=-1)
        blank = lengths == 1 if raw_blank is None else raw_blank
        self.blank += int(np.count_nonzero(blank))
        self.one_token += int(np.count_nonzero((lengths == 2) & ~blank))
        return ids


def encode_block(text: str, tokenizer: Tokenizer) -> str:
    """A block of raw lines -> the same lines as tokenizer output (for `none`, the text itself)."""
    if tokenizer.kind == "none":
        return text
    lines = text.split("\n")[:-1]  # "\n" only: fairseq's lines (other Unicode breaks stay inside a line)
    return "\n".join(tokenizer.encode_lines(lines)) + "\n"


def blank_lines(text: str) -> np.ndarray:
    """Which lines of `text` (lines ending in "\\n") hold no token of their own: whitespace at most
    (str.strip and fairseq's str.split share one whitespace table)."""
    lines = text.split("\n")[:-1]
    return np.fromiter((not line.strip() for line in lines), dtype=bool, count=len(lines))


def scan_range(uri: str, start: int, end: int, tokenizer: Tokenizer, ids_file: Path,
               block_bytes: int | None = None) -> Factorizer:
    """Tokenize bytes [start, end) of `uri`, writing the ids to `ids_file`; the types and counts."""
    factorizer = Factorizer()
    default = WHITESPACE_BLOCK_BYTES if tokenizer.kind == "none" else shards_mod.BLOCK_BYTES
    with open(ids_file, "wb") as out:
        for text in shards_mod.iter_text_blocks(uri, start, end, block_bytes or default):
            raw_blank = None if tokenizer.kind == "none" else blank_lines(text)
            out.write(factorizer.block(encode_block(text, tokenizer), raw_blank).tobytes())
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
                stats[split] = {"sentences": int(f.counts[0]), "tokens": int(f.counts.sum()), "types": len(f.types) - 1,
                                "blank": f.blank, "one_token": f.one_token}
            (tmp / "shard.json").write_text(json.dumps({"shard": json.loads(shard.to_json()), "splits": stats},
                                                       sort_keys=True) + "\n")
    return out



# --------------------------------------------------------------------------- 3. dictionary (reduce)


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


def build_dictionary(work_dir: str, count_dirs: Sequence[str], settings: Settings,
                     checks: CorpusChecksConfig | None = CorpusChecksConfig(),
                     shape: TrainingShape | None = None) -> str:
    """Reduce: `dict.txt` from the train counts of every shard, and `summary.json`; returns their directory.

    Before anything is written, the splits' counts go through `checks` (lmforge.data.corpus_checks;
    None: none, as fairseq-preprocess takes any corpus), with the train split's size against `shape`
    when given: a refused corpus raises CorpusError and leaves no dictionary.
    """
    started = time.perf_counter()
    names = [f"{s}.{e}" for s in SPLITS for e in ("types", "counts")] + ["shard.json"]
    totals: dict[str, dict[str, int]] = {s: {} for s in SPLITS}
    splits = {s: {"sentences": 0, "tokens": 0, "unk": 0} for s in SPLITS}
    shapes = {s: {"blank": 0, "one_token": 0} for s in SPLITS}
    for uri in count_dirs:  # each shard read once; only per-type tables are kept
        with fetched_dir(uri, names) as d:
            counted = json.loads((d / "shard.json").read_text())["splits"]
            for split in SPLITS:
                types, counts = _read_counts(d, split)
                add_counts(totals[split], types, counts)
                splits[split]["sentences"] += int(counts[0])
                splits[split]["tokens"] += int(counts.sum())
                for key in ("blank", "one_token"):
                    shapes[split][key] += counted[split][key]
    symbols = formats.finalize_dictionary(totals["train"], threshold=settings.threshold, nwords=settings.nwords,
                                  padding_factor=settings.padding_factor)
    index = formats.dictionary_index(symbols)
    for split in SPLITS:
        # fairseq's "replaced": tokens that became <unk> (a literal "<unk>" is in the index, so not counted).
        splits[split]["unk"] = sum(n for w, n in totals[split].items() if w not in index)
    with fetched_tokenizer(storage.join(work_dir, "tokenizer")) as tok_dir:
        tokenizer = load_tokenizer(tok_dir)
    if checks is not None:
        literal_unk = SPECIALS[UNK_INDEX]
        corpus_checks.check({s: SplitCounts(lines=n["sentences"], tokens=n["tokens"], **shapes[s],
                                            unk=n["unk"] + totals[s].get(literal_unk, 0))
                             for s, n in splits.items()}, checks, tokenizer.kind, shape)
    out = storage.join(work_dir, "dict")
    with staged_dir(out, last="summary.json") as tmp:
        (tmp / "dict.txt").write_text(formats.dictionary_text(symbols), encoding="utf-8")
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
    """The int32 ids of `path` in runs of `chunk` (default ID_CHUNK)."""
    return formats.iter_int32(path, chunk or ID_CHUNK)


def written(chunks: Iterator[np.ndarray], table: np.ndarray, out: Any) -> Iterator[np.ndarray]:
    """Pass id chunks through, writing each one's dictionary indices to `out` on the way."""
    for ids in chunks:
        out.write(table[ids].tobytes())
        yield ids


def read_index(dictionary_dir: str) -> tuple[dict[str, int], np.dtype]:
    """The dictionary's symbol -> index, and the .bin dtype fairseq picks for its size."""
    with fetched_dir(dictionary_dir, ["dict.txt"]) as d:
        index = formats.read_dictionary(d / "dict.txt")
    return index, best_fitting_dtype(len(index))


def binarized_sizes(count_dir: Path, split: str, index: dict[str, int], dtype: np.dtype, bin_out: Any,
                    sizes_out: Any) -> Iterator[np.ndarray]:
    """A counted shard's `split` through `index`: its dictionary indices (`dtype`) written to `bin_out`, its
    sentence sizes (int32) to `sizes_out`; yields the sizes chunk by chunk as they are written."""
    table = id_table(read_types(count_dir / f"{split}.types"), index).astype(dtype)
    for sizes in iter_sentence_sizes(written(iter_ids(count_dir / f"{split}.ids"), table, bin_out)):
        sizes_out.write(sizes.astype(np.int32).tobytes())
        yield sizes


def totals(size_chunks: Iterator[np.ndarray]) -> dict[str, int]:
    """Sentences and tokens of a stream of sentence-size chunks (consuming it)."""
    sentences = tokens = 0
    for sizes in size_chunks:
        sentences += len(sizes)
        tokens += int(sizes.sum())
    return {"sentences": sentences, "tokens": tokens}


BIN_FILES = tuple(f"{s}.{e}" for s in SPLITS for e in ("bin", "sizes")) + ("bin.json",)


def binarize_shard(work_dir: str, count_dir: str, dictionary_dir: str) -> str:
    """Map 2: the shard's ids through dict.txt into `{split}.bin` (fairseq's dtype) and `{split}.sizes` (int32)."""
    index_name = count_dir.rstrip("/").rsplit("/", 1)[-1]
    out = storage.join(work_dir, "bin", index_name)
    index, dtype = read_index(dictionary_dir)
    with fetched_dir(count_dir, COUNT_FILES) as src, staged_dir(out, last="bin.json") as tmp:
        stats = {}
        for split in SPLITS:
            with open(tmp / f"{split}.bin", "wb") as bin_out, open(tmp / f"{split}.sizes", "wb") as sizes_out:
                stats[split] = totals(binarized_sizes(src, split, index, dtype, bin_out, sizes_out))
        shard_info = json.loads((src / "shard.json").read_text())
        (tmp / "bin.json").write_text(json.dumps({"shard": shard_info["shard"], "dtype": dtype.name, "splits": stats},
                                                 sort_keys=True) + "\n")
    return out


# --------------------------------------------------------------------------- 5. merge


@contextlib.contextmanager
def staged_data_bin(work_dir: str, dictionary_dir: str, dest: str) -> Iterator[tuple[Path, dict[str, Any]]]:
    """A local directory to write the splits of the data-bin `dest` into, and the dictionary's summary.

    When the block ends without error the tokenizer's files, dict.txt and, last,
    summary.json are added (on S3 summary.json's presence says the data-bin is
    complete) and the directory becomes `dest`.
    """
    with fetched_dir(dictionary_dir, ["dict.txt", "summary.json"]) as d, \
            fetched_tokenizer(storage.join(work_dir, "tokenizer")) as tok:
        summary = json.loads((d / "summary.json").read_text())
        with staged_dir(dest, last="summary.json") as tmp:
            yield tmp, summary
            for f in load_tokenizer(tok).files():
                shutil.copyfile(f, tmp / f.name)
            shutil.copyfile(d / "dict.txt", tmp / "dict.txt")
            shutil.copyfile(d / "summary.json", tmp / "summary.json")


def check_counts(what: str, got: dict[str, int], want: dict[str, int]) -> None:
    """A split's sentences and tokens as written are those counted, or a shard output is damaged."""
    if (got["sentences"], got["tokens"]) != (want["sentences"], want["tokens"]):
        raise OSError(f"{what}: written {got} but counted {want}; a shard output is damaged")


def merge_shards(work_dir: str, bin_dirs: Sequence[str], dictionary_dir: str, dest: str) -> dict[str, Any]:
    """Join the shards' binarized parts in order into the data-bin `dest`; returns the summary."""
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        parts = [stack.enter_context(fetched_dir(uri, BIN_FILES)) for uri in bin_dirs]
        tmp, summary = stack.enter_context(staged_data_bin(work_dir, dictionary_dir, dest))
        dtype = best_fitting_dtype(summary["vocab_size"])
        for split in SPLITS:
            stats = formats.write_split(tmp / split, [p / f"{split}.bin" for p in parts],
                                        [p / f"{split}.sizes" for p in parts], dtype, ID_CHUNK)
            check_counts(f"{split} merged", stats, summary["splits"][split])
    logger.info("merged %d shards into %s in %.1f s", len(bin_dirs), dest, time.perf_counter() - started)
    return summary


# --------------------------------------------------------------------------- 4+5 on one machine: binarize in place
#
# On one machine every shard task can write its part of a split straight into the
# split's final .bin and .idx: after map 1 the counts fix where each part goes
# (tokens and sentences before it). That saves writing per-shard parts and the
# serial merge that copies them, the part of the run that no worker count speeds up.


def part_layout(shard_stats: Sequence[dict[str, dict[str, int]]]) -> list[dict[str, tuple[int, int, int]]]:
    """Per shard, per split: (tokens before its part, sentences before it, sentences of the whole split)."""
    whole = {s: sum(st[s]["sentences"] for st in shard_stats) for s in SPLITS}
    tokens, sentences = dict.fromkeys(SPLITS, 0), dict.fromkeys(SPLITS, 0)
    layout = []
    for st in shard_stats:
        layout.append({s: (tokens[s], sentences[s], whole[s]) for s in SPLITS})
        for s in SPLITS:
            tokens[s] += st[s]["tokens"]
            sentences[s] += st[s]["sentences"]
    return layout


def with_pointers(size_chunks: Iterator[np.ndarray], pointer: int, dtype: np.dtype,
                  out: Any) -> Iterator[np.ndarray]:
    """Pass sentence-size chunks through, writing the sentences' .bin byte offsets (from `pointer`) to `out`."""
    for sizes in size_chunks:
        pointers, pointer = formats.sentence_pointers(sizes, pointer, dtype)
        out.write(pointers.tobytes())
        yield sizes


def binarize_shard_in_place(count_dir: str, dictionary_dir: str, data_bin: str,
                            layout: dict[str, tuple[int, int, int]]) -> dict[str, dict[str, int]]:
    """Map 2, one machine: the shard's ids through dict.txt into its parts of the allocated `data_bin` files.

    `data_bin` is a local directory; `layout` this shard's entry of `part_layout`.
    Returns per split the sentences and tokens written.
    """
    index, dtype = read_index(dictionary_dir)
    stats = {}
    with fetched_dir(count_dir, COUNT_FILES) as src:
        for split in SPLITS:
            first_token, first_sentence, total = layout[split]
            prefix = Path(data_bin) / split
            pointer = first_token * dtype.itemsize
            with open(prefix.with_suffix(".bin"), "r+b") as bin_out, \
                    open(prefix.with_suffix(".idx"), "r+b") as sizes_out, \
                    open(prefix.with_suffix(".idx"), "r+b") as pointers_out:
                bin_out.seek(pointer)
                sizes_out.seek(formats.sizes_offset(first_sentence))
                pointers_out.seek(formats.pointers_offset(total, first_sentence))
                sizes = binarized_sizes(src, split, index, dtype, bin_out, sizes_out)
                stats[split] = totals(with_pointers(sizes, pointer, dtype, pointers_out))
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
    with staged_data_bin(work_dir, dictionary_dir, dest) as (tmp, summary):
        dtype = best_fitting_dtype(summary["vocab_size"])
        for split in SPLITS:
            want = summary["splits"][split]
            formats.allocate_split(tmp / split, want["tokens"], want["sentences"], dtype)
        written_stats = run(binarize_shard_in_place, [(c, dictionary_dir, str(tmp), part)
                                                      for c, part in zip(count_dirs, layout)])
        for c, want, got in zip(count_dirs, expected, written_stats):
            for split in SPLITS:
                check_counts(f"{c}: {split} binarized", got[split], want[split])
        for split in SPLITS:
            formats.verify_split(tmp / split, summary["splits"][split], dtype)
    logger.info("binarized %d shards into %s in %.1f s", len(count_dirs), dest, time.perf_counter() - started)
    return summary
