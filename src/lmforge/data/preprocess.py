"""Preprocessing on one machine (`lmforge preprocess`): a text corpus in, fairseq's binarized LM data out.

In:  a corpus directory (local path or s3:// prefix) holding `train.txt`,
     `valid.txt` and `test.txt` (UTF-8, one sentence per line), the preprocess
     settings, a number of workers and shards.
Out: a data-bin directory holding `dict.txt` and `{train,valid,test}.{bin,idx}`
     byte-identical to what

         fairseq-preprocess --only-source --trainpref C/train.txt --validpref C/valid.txt
             --testpref C/test.txt --destdir D --thresholdsrc T --nwordssrc N
             --padding-factor P --dataset-impl mmap --workers K

     writes for the same (tokenized) text, whatever the number of shards N and
     workers K, plus `summary.json` and the tokenizer (`tokenizer.json` and its
     model file, see lmforge.data.tokenization). fairseq's `preprocess.log` is not written.

    lmforge preprocess --corpus DIR --out DIR [--workers K] [--shards N]

`preprocess()` checks its inputs once, then runs the map-reduce stages the
pipeline runs as KFP tasks (lmforge.data.stages: prepare, count, dictionary,
binarize, merge) with a process pool, and reports progress (lmforge.logs.Progress).
fairseq's file formats are lmforge.data.formats.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

from lmforge.config import SPLITS, CorpusChecksConfig
from lmforge.data.archives import plain_file_problem
from lmforge.data.corpus_checks import TrainingShape
from lmforge.data.stages import (
    Settings,
    binarize_in_place,
    binarize_shard,
    build_dictionary,
    count_shard,
    merge_shards,
    prepare,
    split_uri,
)
from lmforge.data.tokenization import KINDS, MODEL_FILES, TOKENIZER_MANIFEST
from lmforge.errors import LmforgeError
from lmforge.io import storage
from lmforge.io.writes import writing
from lmforge.logs import Progress

logger = logging.getLogger(__name__)

# Every name preprocessing (ours or fairseq's) writes into a data-bin. A
# destination directory holding only these is earlier output and may be
# replaced; anything else there belongs to someone else and is never deleted.
OUTPUT_NAMES = frozenset(
    {"dict.txt", "summary.json", "preprocess.log", TOKENIZER_MANIFEST, *MODEL_FILES.values()}
    | {f"{s}.{e}" for s in SPLITS for e in ("bin", "idx")}
)


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
    if settings.tokenizer not in KINDS:
        problems.append(f"tokenizer {settings.tokenizer!r} is unknown (use {', '.join(KINDS)})")
    corpus = storage.local_path(corpus_dir)
    missing = [uri for uri in (split_uri(corpus_dir, split) for split in SPLITS) if not storage.exists(uri)]
    if corpus is not None and corpus.is_file():
        problems.append(plain_file_problem(str(corpus)))
    elif missing:
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
               tokenizer_file: str = "", work_dir: str | Path | None = None,
               checks: CorpusChecksConfig | None = CorpusChecksConfig(),
               shape: TrainingShape | None = None) -> dict[str, Any]:
    """Build fairseq's dictionary from train.txt and binarize all three splits into `dest_dir`, on this machine.

    The same stages the pipeline fans out, with `shards` shards (default: one per
    worker) run on `workers` processes. Args mirror fairseq-preprocess: `threshold`
    (--thresholdsrc), `nwords` (--nwordssrc: dictionary size incl. the 4
    specials, -1 for all), `padding_factor` (--padding-factor); the tokenizer
    settings are those of the `preprocess` config section. The output does not
    depend on `workers` or `shards`. `checks` (`preprocess.checks`; None: none, as
    fairseq-preprocess takes any corpus) refuses a corpus that cannot train, before
    anything is binarized (lmforge.data.corpus_checks); given the training `shape`,
    a train split too small for it too.

    Returns (and writes as `dest_dir/summary.json`)::

        {"vocab_size": len(dictionary) incl. specials and padding,
         "dict_sha256": sha256 of dict.txt,
         "splits": {split: {"sentences": lines, "tokens": ids incl. one eos per line,
                            "unk": tokens replaced by <unk> (literal "<unk>" not counted)}},
         "tokenizer": {"kind": ..., "sha256": ... ("" for none)}}

    Raises LmforgeError (one line, before any work) for a missing split file, a bad
    argument or a `dest_dir` holding other files; CorpusError (one line) for a corpus
    the checks refuse; WriteError (one line, the space left) for a disk that fills up. Output appears at `dest_dir`
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
    # A full disk (or a read-only --out) anywhere below is one line naming `dest_dir` (lmforge.io.writes),
    # raised after every scratch file is gone; earlier output at `dest_dir` is left as it was.
    with writing(dest_dir), contextlib.ExitStack() as stack:
        if scratch_parent is not None:
            scratch_parent.mkdir(parents=True, exist_ok=True)
        if work_dir is None:
            work = stack.enter_context(tempfile.TemporaryDirectory(prefix=".preprocess-", dir=scratch_parent))
        else:
            work = str(work_dir)
        plan = prepare(corpus_dir, work, settings, shards, checks)
        sizes = [s.nbytes for s in plan]
        names = [f"shard {s.index + 1}/{len(plan)}" for s in plan]
        bar = Progress("preprocess", 2 * sum(sizes), logger=logger)
        stack.callback(bar.close)
        pool = stack.enter_context(_pool(min(workers, len(plan)))) if min(workers, len(plan)) > 1 else None
        counted = _run_all(count_shard, [(corpus_dir, work, s) for s in plan], pool, bar, sizes,
                           [f"{n} counted" for n in names])
        dictionary = build_dictionary(work, counted, settings, checks, shape)
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
