"""lmforge.data.preprocess against the real fairseq-preprocess, byte for byte, for any number of shards.

The reference outputs come from fairseq's own console script
(`fairseq-preprocess` next to sys.executable). Importing fairseq costs 5-10 s,
so one background subprocess runs every reference job (see `FairseqReference`).
With a tokenizer, the reference is fairseq-preprocess on the corpus encoded
line by line by the same tokenizer (the one lmforge trained and saved in its
data-bin). S3 runs against moto's real server on 127.0.0.1.
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from lmforge.config import SPLITS
from lmforge.data import preprocess as preprocess_mod
from lmforge.data.tokenization import load_tokenizer
from lmforge.errors import LmforgeError

from conftest import corpus_text

# The corpus checks off: these tests hold preprocessing to fairseq-preprocess, which takes any corpus, on
# corpora made to reach its odd cases (an empty split, one-word lines), not to train. tests/data/test_corpus_checks.py
# tests the checks.
preprocess = functools.partial(preprocess_mod.preprocess, checks=None)
FAIRSEQ_PREPROCESS = Path(sys.executable).with_name("fairseq-preprocess")
FAIRSEQ_FILES = ("dict.txt",) + tuple(f"{s}.{e}" for s in SPLITS for e in ("bin", "idx"))

# Dictionary options compared on WikiText: fairseq's defaults; a cut dictionary
# (threshold and nwords both bite, padding to 8); no padding at all.
WIKITEXT_OPTIONS = {
    "default": {},
    "threshold2-nwords1000": {"threshold": 2, "nwords": 1000, "padding_factor": 8},
    "padding1": {"padding_factor": 1},
}

SHARD_COUNTS = [1, 2, 3, 7]
# Tokenizer settings compared on WikiText (vocabularies small enough to train in well under a second).
TOKENIZERS = {
    "none": {},
    "bpe": {"tokenizer": "bpe", "vocab_size": 500},
    "sentencepiece-bpe": {"tokenizer": "sentencepiece", "model_type": "bpe", "vocab_size": 500},
    "sentencepiece-unigram": {"tokenizer": "sentencepiece", "model_type": "unigram", "vocab_size": 500},
}

# Multi-byte characters on every line, so that most cut points land inside one.
MULTIBYTE = "".join(f"{'日本語' * (i % 7)} é ü {'😀' * (i % 3)} línea {i % 11}\n" for i in range(80))

# fairseq picks the .bin dtype from len(dictionary): uint16 below 65500, else uint32
# (fairseq.data.indexed_dataset.best_fitting_int_dtype). nwords puts the size on
# each side of the boundary (padding_factor=1 keeps it exact).
BIG_VOCAB_OPTIONS = {
    "65499-uint16": ({"nwords": 65499, "padding_factor": 1}, np.uint16),
    "65500-uint32": ({"nwords": 65500, "padding_factor": 1}, np.uint32),
    "all-uint32": ({}, np.uint32),
}

# Lines fairseq reads in odd ways: empty and blank lines, Unicode whitespace
# inside a line (tokenize_line splits on it), \r\n and lone \r (text mode ends a
# line at both), NEL/LS/FF (whitespace, not line ends, for readline), literal
# specials, a word named like fairseq's padding, NUL (our eol sentinel's first
# choice), a BOM, non-ASCII text, and a last line without newline.
EDGE_TRAIN = (
    "b a c b a c d\n"
    "\n"
    "   \t  \n"
    "x\u00a0y\u3000z\u2028w\x0bv\x0cu\x1cq\x85r\n"
    "crlf line\r\n"
    "lone cr\rnext line\n"
    "<unk> </s> <s> <pad> literal specials </s>\n"
    "madeupword0000 madeupword0001 a\n"
    "nul\x00inside \x00 \x00\x00 a\n"
    "\ufeffbom Ünïcödé 日本語 😀 a b\n"
    "\r\n"
    "last line without newline"
)
EDGE_VALID = "a b unseen words\r\n<unk> a\n\n   \nmadeupword0002 \x00\n"
EDGE_TEST = ""  # an empty split: empty .bin, an .idx with no sentences


# --------------------------------------------------------------------------- helpers


def write_corpus(root: Path, train: str, valid: str, test: str) -> Path:
    root.mkdir(parents=True)
    for name, text in (("train", train), ("valid", valid), ("test", test)):
        # newline="" writes \r and \r\n as given
        with open(root / f"{name}.txt", "w", encoding="utf-8", newline="") as f:
            f.write(text)
    return root


def fairseq_args(corpus: Path, dest: Path, *, threshold: int = 0, nwords: int = -1,
                 padding_factor: int = 8, workers: int = 1) -> list[str]:
    return [
        "--workers", str(workers),
        "--only-source",
        "--trainpref", str(corpus / "train.txt"),
        "--validpref", str(corpus / "valid.txt"),
        "--testpref", str(corpus / "test.txt"),
        "--destdir", str(dest),
        "--thresholdsrc", str(threshold),
        "--nwordssrc", str(nwords),
        "--padding-factor", str(padding_factor),
        "--dataset-impl", "mmap",
    ]


# Runs the fairseq-preprocess console script once per argument list, in one
# interpreter: the script itself (runpy), with its real command line, so the
# reference is exactly what `fairseq-preprocess ARGS` writes, while fairseq's
# import is paid once instead of once per job.
_DRIVER = """
import json, runpy, sys
script, jobs = sys.argv[1], json.loads(sys.argv[2])
for argv in jobs:
    sys.argv = [script, *argv]
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as e:
        if e.code not in (None, 0):
            raise
"""


class FairseqReference:
    """fairseq-preprocess outputs, computed by one background subprocess.

    The subprocess starts when the fixture is set up and runs while the tests
    import fairseq and preprocess in-process (two ~10 s imports overlap); the
    first lookup waits for it.
    """

    def __init__(self, root: Path, jobs: dict[str, list[str]]) -> None:
        if not FAIRSEQ_PREPROCESS.exists():
            pytest.fail(f"{FAIRSEQ_PREPROCESS} not found; install fairseq into the venv (scripts/install.sh)")
        self._root = root
        self._log = open(root / "fairseq.log", "w+")
        self._proc: subprocess.Popen | None = subprocess.Popen(
            [sys.executable, "-c", _DRIVER, str(FAIRSEQ_PREPROCESS), json.dumps(list(jobs.values()))],
            stdout=self._log, stderr=subprocess.STDOUT,
        )

    def __getitem__(self, name: str) -> Path:
        if self._proc is not None:
            rc = self._proc.wait(timeout=300)
            self._proc = None
            self._log.seek(0)
            assert rc == 0, f"fairseq-preprocess failed:\n{self._log.read()[-5000:]}"
        return self._root / name

    def close(self) -> None:
        if self._proc is not None:  # no test needed it after all
            self._proc.kill()
            self._proc.wait()
        self._log.close()


def first_difference(a: bytes, b: bytes) -> int | None:
    """Offset of the first differing byte (or of the shorter length), None if equal."""
    if a == b:
        return None
    n = min(len(a), len(b))
    diff = np.flatnonzero(np.frombuffer(a[:n], np.uint8) != np.frombuffer(b[:n], np.uint8))
    return int(diff[0]) if len(diff) else n


def assert_same_as_fairseq(ours: Path, theirs: Path) -> None:
    tokenizer_files = tuple(f.name for f in load_tokenizer(ours).files())
    assert "tokenizer.json" in tokenizer_files, "the data-bin always holds the tokenizer manifest"
    assert sorted(p.name for p in ours.iterdir()) == sorted(FAIRSEQ_FILES + ("summary.json",) + tokenizer_files)
    for name in FAIRSEQ_FILES:
        a, b = (ours / name).read_bytes(), (theirs / name).read_bytes()
        at = first_difference(a, b)
        assert at is None, f"{name}: {len(a)} bytes vs fairseq's {len(b)}, first difference at byte {at}"


def big_vocab_train(n_types: int = 70_000) -> str:
    """n_types distinct words, 10 per line, with a few repeated so counts differ and tie."""
    words = [f"w{i:05d}" for i in range(n_types)]
    lines = [" ".join(words[i : i + 10]) for i in range(0, n_types, 10)]
    lines += [" ".join(words[:50])] * 3 + [" ".join(words[25:75])] * 2
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def wikitext_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    valid = (corpus_text() / "valid.txt").read_text(encoding="utf-8").splitlines(keepends=True)
    test = (corpus_text() / "test.txt").read_text(encoding="utf-8").splitlines(keepends=True)
    return write_corpus(
        tmp_path_factory.mktemp("wikitext") / "corpus",
        train="".join(valid[:1200]), valid="".join(valid[1200:1400]), test="".join(test[:300]),
    )


@pytest.fixture(scope="module")
def edge_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("edge") / "corpus", EDGE_TRAIN, EDGE_VALID, EDGE_TEST)


@pytest.fixture(scope="module")
def multibyte_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Multi-byte characters at the cut points; no final newline in train and valid."""
    return write_corpus(tmp_path_factory.mktemp("multibyte") / "corpus", MULTIBYTE + "日本語 no newline",
                        MULTIBYTE[:400] + "ü", MULTIBYTE[-300:])


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Fewer lines than shards."""
    return write_corpus(tmp_path_factory.mktemp("tiny") / "corpus", "a b\nb c\n", "a\n", "c d\n")


@pytest.fixture(scope="module")
def big_vocab_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("bigvocab") / "corpus", big_vocab_train(), "w00001 w69999 nope\n",
                        "w00000\n")


def encode_corpus(corpus: Path, tokenizer_dir: Path, dest: Path) -> Path:
    """`corpus` with every line (fairseq's lines: universal newlines) replaced by the tokenizer's output."""
    tok = load_tokenizer(tokenizer_dir)
    texts = {}
    for split in SPLITS:
        with open(corpus / f"{split}.txt", encoding="utf-8") as f:
            texts[split] = "".join(tok.encode(line.rstrip("\n")) + "\n" for line in f)
    return write_corpus(dest, texts["train"], texts["valid"], texts["test"])


@pytest.fixture(scope="module")
def tokenized(wikitext_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Per tokenizer: lmforge's data-bin with 1 shard (its tokenizer trained by lmforge), from which the
    corpus encoded for the fairseq reference is made."""
    root = tmp_path_factory.mktemp("tokenized")
    out = {}
    for name, opts in TOKENIZERS.items():
        if opts:
            preprocess(wikitext_corpus, root / f"{name}-bin", shards=1, **opts)
            out[name] = root / f"{name}-bin"
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, edge_corpus: Path, big_vocab_corpus: Path,
              multibyte_corpus: Path, tiny_corpus: Path, request: pytest.FixtureRequest) -> Iterator[FairseqReference]:
    """fairseq-preprocess output for every case, by name."""
    root = tmp_path_factory.mktemp("fairseq")
    cases: dict[str, tuple[Path, dict]] = {
        "edge": (edge_corpus, {"workers": 2}), "multibyte": (multibyte_corpus, {"workers": 3}),
        "tiny": (tiny_corpus, {}),
    }
    cases |= {f"big-{k}": (big_vocab_corpus, opts) for k, (opts, _) in BIG_VOCAB_OPTIONS.items()}
    corpus = request.getfixturevalue("wikitext_corpus")
    cases |= {f"wikitext-{k}": (corpus, opts) for k, opts in WIKITEXT_OPTIONS.items()}
    cases["wikitext-none"] = (corpus, {"workers": 2})
    for name, data_bin in request.getfixturevalue("tokenized").items():
        cases[f"wikitext-{name}"] = (encode_corpus(corpus, data_bin, root / f"{name}-text"), {})
    ref = FairseqReference(root, {name: fairseq_args(corpus, root / name, **opts)
                                  for name, (corpus, opts) in cases.items()})
    yield ref
    ref.close()


# --------------------------------------------------------------------------- byte identity


@pytest.mark.parametrize("shards", SHARD_COUNTS)
@pytest.mark.parametrize("name", list(TOKENIZERS))
def test_wikitext_matches_fairseq_for_any_shard_count(name: str, shards: int, wikitext_corpus: Path,
                                                      reference: FairseqReference, tmp_path: Path) -> None:
    """With a tokenizer, lmforge trains it again for every shard count: training is deterministic, so
    the output is the same as the reference made with the first one."""
    summary = preprocess(wikitext_corpus, tmp_path / "out", shards=shards, **TOKENIZERS[name])
    assert_same_as_fairseq(tmp_path / "out", reference[f"wikitext-{name}"])
    assert summary["tokenizer"]["kind"] == TOKENIZERS[name].get("tokenizer", "none")
    if name != "none":
        assert summary["tokenizer"]["sha256"] == load_tokenizer(tmp_path / "out").sha256


def test_tokenized_data_is_the_tokenizers_tokens(wikitext_corpus: Path, tokenized: dict[str, Path]) -> None:
    """The data-bin's tokenizer encodes raw text to what was counted: its first train sentence."""
    from fairseq.data.indexed_dataset import MMapIndexedDataset

    first_line = (wikitext_corpus / "train.txt").read_text(encoding="utf-8").split("\n")[1]
    for name, data_bin in tokenized.items():
        symbols = ["<s>", "<pad>", "</s>", "<unk>"] + [
            line.rsplit(" ", 1)[0] for line in (data_bin / "dict.txt").read_text(encoding="utf-8").splitlines()]
        ids = MMapIndexedDataset(str(data_bin / "train"))[1].tolist()
        expected = load_tokenizer(data_bin).encode(first_line).split()
        assert [symbols[i] for i in ids[:-1]] == expected, name
        assert len(expected) > len(first_line.split()), f"{name} splits words into pieces"


@pytest.mark.parametrize("option", list(WIKITEXT_OPTIONS))
def test_dictionary_options_match_fairseq(option: str, wikitext_corpus: Path, reference: FairseqReference,
                                          tmp_path: Path) -> None:
    summary = preprocess(wikitext_corpus, tmp_path / "out", shards=3, **WIKITEXT_OPTIONS[option])
    assert_same_as_fairseq(tmp_path / "out", reference[f"wikitext-{option}"])
    assert summary["vocab_size"] % WIKITEXT_OPTIONS[option].get("padding_factor", 8) == 0


@pytest.mark.parametrize("shards", SHARD_COUNTS)
def test_edge_cases_match_fairseq_preprocess(shards: int, edge_corpus: Path, reference: FairseqReference,
                                             tmp_path: Path) -> None:
    summary = preprocess(edge_corpus, tmp_path / "out", shards=shards)
    assert_same_as_fairseq(tmp_path / "out", reference["edge"])
    assert summary["splits"]["test"] == {"sentences": 0, "tokens": 0, "unk": 0}  # the empty split
    # 12 lines in train: the lone \r splits one, the last has no newline.
    assert summary["splits"]["train"]["sentences"] == 13


@pytest.mark.parametrize("shards", [3, 7])
def test_cuts_inside_multibyte_characters_match_fairseq(shards: int, multibyte_corpus: Path,
                                                        reference: FairseqReference, tmp_path: Path) -> None:
    from lmforge.data.shards import split_offsets

    train = multibyte_corpus / "train.txt"
    data = train.read_bytes()
    # the plain cut points size // N * i fall inside a character; the shard cuts never do
    assert any(data[train.stat().st_size // shards * i] & 0xC0 == 0x80 for i in range(1, shards))
    assert all(data[o - 1:o] == b"\n" for o in split_offsets(train, shards)[1:-1])
    preprocess(multibyte_corpus, tmp_path / "out", shards=shards)
    assert_same_as_fairseq(tmp_path / "out", reference["multibyte"])


def test_more_shards_than_lines_match_fairseq(tiny_corpus: Path, reference: FairseqReference, tmp_path: Path) -> None:
    summary = preprocess(tiny_corpus, tmp_path / "out", shards=7, workers=1)
    assert_same_as_fairseq(tmp_path / "out", reference["tiny"])
    assert summary["splits"]["train"]["sentences"] == 2


@pytest.mark.parametrize("option", list(BIG_VOCAB_OPTIONS))
def test_large_vocabulary_dtype_matches_fairseq(option: str, big_vocab_corpus: Path, reference: FairseqReference,
                                                tmp_path: Path) -> None:
    opts, dtype = BIG_VOCAB_OPTIONS[option]
    preprocess(big_vocab_corpus, tmp_path / "out", **opts)
    assert_same_as_fairseq(tmp_path / "out", reference[f"big-{option}"])
    from fairseq.data.indexed_dataset import MMapIndexedDataset

    ds = MMapIndexedDataset(str(tmp_path / "out" / "train"))
    assert ds._index.dtype == dtype


# --------------------------------------------------------------------------- workers


def test_workers_do_not_change_output(big_vocab_corpus: Path, tmp_path: Path) -> None:
    """A real process pool (spawn), 2 workers over 3 shards."""
    one = preprocess(big_vocab_corpus, tmp_path / "w1", workers=1, shards=1)
    two = preprocess(big_vocab_corpus, tmp_path / "w2", workers=2, shards=3)
    assert one == two
    for name in FAIRSEQ_FILES + ("summary.json", "tokenizer.json"):
        assert (tmp_path / "w1" / name).read_bytes() == (tmp_path / "w2" / name).read_bytes(), name


# --------------------------------------------------------------------------- dictionary and summary


def test_ties_are_sorted_alphabetically(tmp_path: Path) -> None:
    corpus = write_corpus(tmp_path / "corpus", "b a c b a c d\ne d\n", "a\n", "z\n")
    summary = preprocess(corpus, tmp_path / "out", padding_factor=1)
    # counts: a b c d 2, e 1; count descending, ties alphabetical
    assert (tmp_path / "out" / "dict.txt").read_text(encoding="utf-8") == "a 2\nb 2\nc 2\nd 2\ne 1\n"
    assert summary["vocab_size"] == 4 + 5
    assert summary["splits"]["test"] == {"sentences": 1, "tokens": 2, "unk": 1}


def test_padding_uses_madeupwords(tmp_path: Path) -> None:
    corpus = write_corpus(tmp_path / "corpus", "x y y\n", "x\n", "y\n")
    summary = preprocess(corpus, tmp_path / "out", padding_factor=8)
    assert (tmp_path / "out" / "dict.txt").read_text(encoding="utf-8") == "y 2\nx 1\nmadeupword0000 0\nmadeupword0001 0\n"
    assert summary["vocab_size"] == 8


def read_sentences(prefix: Path) -> Iterator[np.ndarray]:
    from fairseq.data.indexed_dataset import MMapIndexedDataset

    ds = MMapIndexedDataset(str(prefix))
    for i in range(len(ds)):
        yield ds[i].numpy()


def test_summary_matches_the_binarized_data(wikitext_corpus: Path, tmp_path: Path) -> None:
    from fairseq.data import Dictionary

    summary = preprocess(wikitext_corpus, tmp_path / "out", threshold=2)
    out = tmp_path / "out"
    assert json.loads((out / "summary.json").read_text()) == summary
    import hashlib

    assert summary["dict_sha256"] == hashlib.sha256((out / "dict.txt").read_bytes()).hexdigest()
    d = Dictionary.load(str(out / "dict.txt"))
    d.pad_to_multiple_(8)  # fairseq's LM task loads dict.txt the same way before training
    assert summary["vocab_size"] == len(d)
    for split in SPLITS:
        lines = (wikitext_corpus / f"{split}.txt").read_text(encoding="utf-8").splitlines()
        sentences = list(read_sentences(out / split))
        stats = summary["splits"][split]
        assert stats["sentences"] == len(sentences) == len(lines)
        assert stats["tokens"] == sum(len(s) for s in sentences) == sum(len(line.split()) + 1 for line in lines)
        assert all(s[-1] == d.eos() for s in sentences)
        literal_unk = sum(line.split().count(d.unk_word) for line in lines)
        assert stats["unk"] == sum(int((s == d.unk()).sum()) for s in sentences) - literal_unk
        # ids decode to the text, words out of the dictionary as <unk>
        for line, ids in zip(lines[:50], sentences[:50]):
            assert [d[i] for i in ids[:-1]] == [w if w in d.indices else d.unk_word for w in line.split()]
    assert summary["splits"]["valid"]["unk"] > 0


# --------------------------------------------------------------------------- errors and atomicity


def leftovers(parent: Path, name: str) -> list[str]:
    """Anything next to the output `name` but the output and the corpus (temporary names start with ".")."""
    return sorted(p.name for p in parent.iterdir() if p.name not in (name, "corpus"))


def test_missing_split_names_the_file_and_writes_nothing(tmp_path: Path) -> None:
    corpus = write_corpus(tmp_path / "corpus", "a b\n", "a\n", "b\n")
    (corpus / "valid.txt").unlink()
    with pytest.raises(LmforgeError, match=r"missing .*valid\.txt") as err:
        preprocess(corpus, tmp_path / "out")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()
    assert leftovers(tmp_path, "out") == []


def test_failure_midway_leaves_nothing_and_keeps_earlier_output(tmp_path: Path) -> None:
    corpus = write_corpus(tmp_path / "corpus", "a b\n", "a\n", "b\n")
    (corpus / "test.txt").write_bytes(b"ok\n\xff\xfe not utf-8\n")
    with pytest.raises(LmforgeError, match=r"test\.txt is not UTF-8 .*offset 3"):
        preprocess(corpus, tmp_path / "out")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path, "out") == []

    (corpus / "test.txt").write_text("b\n", encoding="utf-8")
    before = preprocess(corpus, tmp_path / "out")
    (corpus / "test.txt").write_bytes(b"\xff\n")
    with pytest.raises(LmforgeError):
        preprocess(corpus, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "summary.json").read_text()) == before
    assert leftovers(tmp_path, "out") == []


def test_existing_output_is_replaced(tmp_path: Path) -> None:
    corpus = write_corpus(tmp_path / "corpus", "a b\n", "a\n", "b\n")
    preprocess(corpus, tmp_path / "out")
    (tmp_path / "out" / "preprocess.log").write_text("from an earlier fairseq-preprocess run\n")
    (corpus / "train.txt").write_text("c c d\n", encoding="utf-8")
    summary = preprocess(corpus, tmp_path / "out")
    assert (tmp_path / "out" / "dict.txt").read_text() == "c 2\nd 1\nmadeupword0000 0\nmadeupword0001 0\n"
    assert not (tmp_path / "out" / "preprocess.log").exists()
    assert summary["splits"]["valid"]["unk"] == 1
    assert leftovers(tmp_path, "out") == []


def test_refuses_a_destination_holding_other_files(tmp_path: Path) -> None:
    corpus = write_corpus(tmp_path / "corpus", "a b\n", "a\n", "b\n")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.md").write_text("mine")
    with pytest.raises(LmforgeError, match=r"notes\.md"):
        preprocess(corpus, tmp_path / "out")
    assert (tmp_path / "out" / "notes.md").read_text() == "mine"
    with pytest.raises(LmforgeError, match=r"train\.txt"):  # the corpus itself is never a destination
        preprocess(corpus, corpus)


def test_bad_arguments_are_reported_together(tmp_path: Path) -> None:
    with pytest.raises(LmforgeError) as err:
        preprocess(tmp_path / "nowhere", tmp_path / "out", workers=0, nwords="10")  # type: ignore[arg-type]
    message = str(err.value)
    for part in ("workers", "nwords", "train.txt", "valid.txt", "test.txt"):
        assert part in message
    assert not (tmp_path / "out").exists()


def test_non_utf8_in_a_later_shard_names_the_file_and_offset(tmp_path: Path) -> None:
    corpus = write_corpus(tmp_path / "corpus", "a b\n" * 100, "a\n", "b\n")
    (corpus / "valid.txt").write_bytes(b"a b\n" * 50 + b"bad \xfe\n" + b"a\n" * 50)
    with pytest.raises(LmforgeError, match=r"valid\.txt is not UTF-8 \(bad byte at offset 204\)"):
        preprocess(corpus, tmp_path / "out", shards=3)
    assert leftovers(tmp_path, "out") == []


def test_cli_preprocess_runs_the_shards_on_a_pool(wikitext_corpus: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from lmforge.cli import main

    out = tmp_path / "out"
    assert main(["preprocess", "--corpus", str(wikitext_corpus), "--out", str(out), "--workers", "2",
                 "--shards", "3", "--set", "preprocess.threshold=2"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary == json.loads((out / "summary.json").read_text())
    assert summary == preprocess(wikitext_corpus, tmp_path / "again", threshold=2)
    assert main(["preprocess", "--corpus", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")]) == 1
    assert "missing" in capsys.readouterr().err


# --------------------------------------------------------------------------- S3


@pytest.fixture
def recorded_requests(moto_s3: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[], list[dict]]:
    """Every request moto's server receives, as moto's recorder logs it (method, url, headers)."""
    import requests
    from moto.moto_api import recorder

    monkeypatch.setattr(recorder, "_location", str(tmp_path / "moto-recording"))
    requests.post(f"{moto_s3}/moto-api/recorder/reset-recording", timeout=10)
    requests.post(f"{moto_s3}/moto-api/recorder/start-recording", timeout=10)
    yield lambda: [json.loads(line) for line in (tmp_path / "moto-recording").read_text().splitlines()]
    requests.post(f"{moto_s3}/moto-api/recorder/stop-recording", timeout=10)


def test_s3_corpus_is_read_in_ranges_only(moto_s3: str, recorded_requests, wikitext_corpus: Path,
                                          tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Corpus and intermediate outputs on S3 (moto's server on 127.0.0.1), 3 shards and a BPE tokenizer
    trained on a sample: the same data-bin as from local files, and no request for a corpus object
    asked for all of it."""
    import boto3

    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_s3)
    s3 = boto3.client("s3", endpoint_url=moto_s3)
    s3.create_bucket(Bucket="corpora")
    for split in SPLITS:
        s3.upload_file(str(wikitext_corpus / f"{split}.txt"), "corpora", f"wt/{split}.txt")
    opts = {"shards": 3, "tokenizer": "bpe", "vocab_size": 400, "tokenizer_sample_bytes": 60_000}
    recorded_requests()  # uploads are not what is checked
    (tmp_path / "moto-recording").write_text("")
    summary = preprocess("s3://corpora/wt", tmp_path / "from-s3", work_dir="s3://corpora/work", **opts)
    requests_seen = recorded_requests()
    assert summary == preprocess(wikitext_corpus, tmp_path / "local", **opts)
    for name in FAIRSEQ_FILES + ("summary.json", "tokenizer.json", "bpe.json"):
        assert (tmp_path / "from-s3" / name).read_bytes() == (tmp_path / "local" / name).read_bytes(), name

    corpus_gets = [r for r in requests_seen if r["method"] == "GET" and "/wt/" in r["url"]]
    sizes = {f"/wt/{s}.txt": (wikitext_corpus / f"{s}.txt").stat().st_size for s in SPLITS}
    assert len(corpus_gets) >= 2 * 3 * len(SPLITS) - 3, "the plan's probes and map 1's reads"
    for r in corpus_gets:
        headers = {k.lower(): v for k, v in r["headers"].items()}
        assert "range" in headers, f"{r['url']} was fetched whole"
        first, last = map(int, headers["range"].removeprefix("bytes=").split("-"))
        size = next(v for k, v in sizes.items() if r["url"].split("?")[0].endswith(k))
        assert (first, last) != (0, size - 1), f"{r['url']} was fetched whole via a range"
    # each intermediate directory's marker file is uploaded after the rest of it
    for prefix, marker in (("/work/count/00002/", "shard.json"), ("/work/bin/00001/", "bin.json"),
                           ("/work/dict/", "summary.json")):
        puts = [r["url"].split("?")[0] for r in requests_seen if r["method"] == "PUT" and prefix in r["url"]]
        assert len(puts) > 1 and puts[-1].endswith(marker), (prefix, puts)
