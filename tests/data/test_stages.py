"""lmforge.data.stages, called stage by stage as the pipeline's tasks call them: what each reads, what each
writes, and that the two ways of finishing (per-shard parts merged, or binarized in place) agree.

Byte identity with fairseq-preprocess over the whole run is tests/data/test_preprocess.py's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lmforge.config import SPLITS
from lmforge.data import shards, stages
from lmforge.data.shards import Shard

LINE = " ".join(f"w{i % 500}" for i in range(40)) + "\n"


def corpus_of(root: Path, train: str, valid: str, test: str) -> Path:
    root.mkdir(parents=True)
    for split, text in zip(SPLITS, (train, valid, test)):
        (root / f"{split}.txt").write_text(text, encoding="utf-8")
    return root


def run_maps(corpus: Path, work: Path, n_shards: int) -> tuple[list[str], str]:
    """Plan, map 1 on every shard and the reduce; the count directories and the dictionary's. The corpus
    checks are off: these corpora are made to test the stages' mechanics, not to train."""
    settings = stages.Settings(threshold=2)
    plan = stages.prepare(str(corpus), str(work), settings, n_shards, checks=None)
    counted = [stages.count_shard(str(corpus), str(work), shard) for shard in plan]
    return counted, stages.build_dictionary(str(work), counted, settings, checks=None)


def test_shard_tasks_stream_in_flat_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Counting and binarizing a shard 8 times larger (same vocabulary) peaks at about the same memory:
    only per-type tables grow with the corpus, text and ids are streamed in blocks."""
    import tracemalloc

    monkeypatch.setattr(shards, "BLOCK_BYTES", 16 << 10)
    monkeypatch.setattr(stages, "WHITESPACE_BLOCK_BYTES", 16 << 10)
    monkeypatch.setattr(stages, "ID_CHUNK", 4 << 10)
    peaks = []
    for copies in (500, 4000):  # ~100 KB and ~800 KB of text
        corpus = corpus_of(tmp_path / f"c{copies}", LINE * copies, LINE, LINE)
        work = str(tmp_path / f"work{copies}")
        settings = stages.Settings()
        [shard] = stages.prepare(str(corpus), work, settings, 1)
        tracemalloc.start()
        count = stages.count_shard(str(corpus), work, Shard(0, shard.ranges))
        dictionary = stages.build_dictionary(work, [count], settings)
        stages.binarize_shard(work, count, dictionary)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    assert peaks[1] < 1.5 * peaks[0], f"peak memory grew from {peaks[0]} to {peaks[1]} bytes with 8x the text"


def test_count_shard_reads_only_its_ranges(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    corpus = corpus_of(tmp_path / "corpus", "".join(f"a{i} b c\n" for i in range(300)), LINE * 20, LINE * 5)
    work = tmp_path / "work"
    plan = stages.prepare(str(corpus), str(work), stages.Settings(), 3)
    reads: list[tuple[str, int, int]] = []
    real = shards.storage.iter_range

    def recording(uri, start, end, **kwargs):
        reads.append((Path(uri).stem, start, end))
        return real(uri, start, end, **kwargs)

    monkeypatch.setattr(shards.storage, "iter_range", recording)
    count = stages.count_shard(str(corpus), str(work), plan[1])
    assert sorted(reads) == sorted((split, *plan[1].ranges[split]) for split in SPLITS)
    assert all(start > 0 for _, start, _ in reads), "a middle shard starts inside every file"
    train = stages.shard_stats(count)["train"]
    first, last = plan[1].ranges["train"]
    assert train["sentences"] == (corpus / "train.txt").read_bytes()[first:last].count(b"\n")


def test_merged_parts_and_binarizing_in_place_write_the_same_data_bin(tmp_path: Path) -> None:
    """The pipeline's path (parts, then a merge) and the one-machine path (in place) from the same counts."""
    corpus = corpus_of(tmp_path / "corpus", "".join(f"x{i % 37} y{i % 5} z\n" for i in range(400)),
                       "x1 y2 unseen\n" * 30, "")
    counted, dictionary = run_maps(corpus, tmp_path / "work", 3)
    parts = [stages.binarize_shard(str(tmp_path / "work"), c, dictionary) for c in counted]
    merged = stages.merge_shards(str(tmp_path / "work"), parts, dictionary, str(tmp_path / "merged"))
    in_place = stages.binarize_in_place(str(tmp_path / "work"), counted, dictionary, str(tmp_path / "in-place"),
                                        lambda fn, jobs: [fn(*job) for job in reversed(jobs)][::-1])
    assert merged == in_place
    names = sorted(p.name for p in (tmp_path / "merged").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "in-place").iterdir())
    assert {"dict.txt", "summary.json", "tokenizer.json", "train.bin", "test.idx"} <= set(names)
    for name in names:
        assert (tmp_path / "merged" / name).read_bytes() == (tmp_path / "in-place" / name).read_bytes(), name
    assert merged["splits"]["train"] == {"sentences": 400, "tokens": 1600, "unk": 0}


def test_a_damaged_shard_output_is_refused(tmp_path: Path) -> None:
    corpus = corpus_of(tmp_path / "corpus", "a b\nc d\n" * 50, "a\n", "b\n")
    counted, dictionary = run_maps(corpus, tmp_path / "work", 2)
    parts = [stages.binarize_shard(str(tmp_path / "work"), c, dictionary) for c in counted]
    sizes = Path(parts[1]) / "train.sizes"
    sizes.write_bytes(sizes.read_bytes()[:-4])  # one sentence lost
    with pytest.raises(OSError, match="a shard output is damaged"):
        stages.merge_shards(str(tmp_path / "work"), parts, dictionary, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_part_layout_places_each_shard_after_the_ones_before() -> None:
    stats = [{s: {"sentences": n, "tokens": 10 * n} for s in SPLITS} for n in (2, 0, 3)]
    layout = stages.part_layout(stats)
    assert [part["train"] for part in layout] == [(0, 0, 5), (20, 2, 5), (20, 2, 5)]


def test_factorizer_ids_follow_first_use_and_end_each_line_with_0() -> None:
    f = stages.Factorizer()
    ids = f.block("b a b\n\x00 a\n\n")  # NUL, the sentinel's first choice, is a token here
    assert ids.tolist() == [1, 2, 1, 0, 3, 2, 0, 0]
    assert f.types == ["", "b", "a", "\x00"]
    assert f.counts.tolist() == [3, 2, 2, 1]
    assert f.block("a c\n").tolist() == [2, 4, 0] and f.counts.tolist() == [4, 2, 3, 1, 1]
    assert stages.line_sentinel("x \x00 y", {}) == "\x00\x00"
    assert np.array_equal(stages.id_table(["", "a", "zz"], {"a": 7}), [2, 7, 3])
