"""Tokenizers: raw text lines in, space-separated tokens out (what preprocessing counts and binarizes).

In:  a kind (`none`, `bpe`, `sentencepiece`) and either training text (an
     iterator of lines) or a model file; later, a directory holding a saved tokenizer.
Out: a directory holding `tokenizer.json`, lmforge's manifest

         {"kind": "none" | "bpe" | "sentencepiece", "model": <file name or null>,
          "sha256": <sha256 of that file or null>}

     and the model file it names; `load_tokenizer(directory)` gives back a
     `Tokenizer` (`.kind`, `.sha256`, `.encode`, `.decode`, `.files()`). The
     data-bin directory holds these files, so the registered model can turn raw
     text into the very tokens the dictionary counted. No manifest means `none`.

Kinds:
- `none`: whitespace tokens, as WikiText ships them (fairseq's `tokenize_line`);
- `bpe`: byte-level BPE from HuggingFace `tokenizers` (GPT-2's byte alphabet,
  so every input byte is representable and no token holds whitespace), saved as
  `bpe.json` (the library's own JSON format);
- `sentencepiece`: sentencepiece BPE or unigram, saved as `sentencepiece.model`.

Used by `lmforge preprocess` (train or load once before the fan-out, encode in
every shard task) and by the registered model.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from lmforge.io.hashing import hash_file
from lmforge.errors import LmforgeError

TOKENIZER_MANIFEST = "tokenizer.json"
KINDS = ("none", "bpe", "sentencepiece")
SENTENCEPIECE_TYPES = ("bpe", "unigram")
# The model file each kind saves. Not "tokenizer.json" for HF's format: that name is the manifest's.
MODEL_FILES = {"bpe": "bpe.json", "sentencepiece": "sentencepiece.model"}


def _sha256(path: Path) -> str:
    return hash_file(path)[0]


class Tokenizer:
    """Base: `none`, whitespace tokens. Subclasses hold a model file."""

    kind = "none"

    def __init__(self, directory: Path | None = None, model: Path | None = None) -> None:
        self.directory = directory
        self.model = model
        self.sha256 = _sha256(model) if model is not None else ""

    def encode(self, text: str) -> str:
        """One line of raw text -> its tokens, space-separated (no newline in `text`)."""
        return self.encode_lines([text])[0]

    def encode_lines(self, lines: list[str]) -> list[str]:
        """A batch of lines (no newlines in them) -> one token string per line."""
        return [" ".join(line.split()) for line in lines]

    def decode(self, tokens: str) -> str:
        """Space-separated tokens -> text."""
        return tokens

    def vocabulary_size(self) -> int | None:
        """Tokens the model knows (None: whitespace tokens, any word)."""
        return None

    def files(self) -> list[Path]:
        """The files that make up this tokenizer (manifest, then model file), for packaging."""
        if self.directory is None or not (self.directory / TOKENIZER_MANIFEST).is_file():
            return []
        return [self.directory / TOKENIZER_MANIFEST] + ([self.model] if self.model is not None else [])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(kind={self.kind!r}, sha256={self.sha256[:12]!r})"


class BpeTokenizer(Tokenizer):
    """Byte-level BPE (HuggingFace `tokenizers`); tokens are GPT-2's byte-alphabet strings, e.g. `Ġthe`."""

    kind = "bpe"

    def __init__(self, directory: Path | None, model: Path) -> None:
        super().__init__(directory, model)
        from tokenizers import Tokenizer as HfTokenizer

        try:
            self._tok = HfTokenizer.from_file(str(model))
        except Exception as exc:
            raise LmforgeError(f"{model} is not a HuggingFace tokenizers JSON file ({exc}); "
                               "give a file saved by tokenizers' Tokenizer.save") from None
        # id -> token once: converting ids through a list beats asking for Encoding.tokens (~2x).
        vocab = self._tok.get_vocab(with_added_tokens=True)
        self._tokens = [""] * (max(vocab.values()) + 1 if vocab else 0)
        for token, i in vocab.items():
            self._tokens[i] = token

    def encode_lines(self, lines: list[str]) -> list[str]:
        table = self._tokens
        encodings = self._tok.encode_batch_fast(lines, add_special_tokens=False)
        return [" ".join([table[i] for i in e.ids]) for e in encodings]

    def encode_line_by_line(self, lines: list[str]) -> list[str]:
        """The same tokens, one `encode` call per line (the peer bench/preprocess.py measures against)."""
        return [" ".join(self._tok.encode(line, add_special_tokens=False).tokens) for line in lines]

    def decode(self, tokens: str) -> str:
        return self._tok.decoder.decode(tokens.split()) if self._tok.decoder is not None else tokens

    def vocabulary_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)


class SentencePieceTokenizer(Tokenizer):
    """sentencepiece (BPE or unigram); pieces mark a preceding space with `▁`."""

    kind = "sentencepiece"

    def __init__(self, directory: Path | None, model: Path) -> None:
        super().__init__(directory, model)
        import sentencepiece as spm

        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.Load(model_proto=model.read_bytes())
        except Exception as exc:
            raise LmforgeError(f"{model} is not a sentencepiece model ({exc}); "
                               "give a .model file written by sentencepiece's trainer") from None

    def encode_lines(self, lines: list[str]) -> list[str]:
        return [" ".join(pieces) for pieces in self._sp.encode(lines, out_type=str)]

    def decode(self, tokens: str) -> str:
        return self._sp.decode_pieces(tokens.split())

    def vocabulary_size(self) -> int:
        return self._sp.GetPieceSize()


_CLASSES: dict[str, type[Tokenizer]] = {"none": Tokenizer, "bpe": BpeTokenizer, "sentencepiece": SentencePieceTokenizer}


# --------------------------------------------------------------------------- saving and loading


def write_manifest(directory: Path, kind: str, model: Path | None) -> Path:
    manifest = {"kind": kind, "model": model.name if model else None, "sha256": _sha256(model) if model else None}
    path = directory / TOKENIZER_MANIFEST
    tmp = directory / f".{TOKENIZER_MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def load_tokenizer(directory: str | Path) -> Tokenizer:
    """The tokenizer saved in `directory`; `none` when it holds no manifest."""
    directory = Path(directory)
    path = directory / TOKENIZER_MANIFEST
    if not path.is_file():
        return Tokenizer()
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        kind, model_name, sha = manifest["kind"], manifest["model"], manifest["sha256"]
    except (ValueError, KeyError, TypeError):
        raise LmforgeError(f"{path} is not an lmforge tokenizer manifest (kind, model, sha256); "
                           "rebuild the data-bin with lmforge preprocess") from None
    if kind not in KINDS:
        raise LmforgeError(f"{path}: unknown tokenizer kind {kind!r} (known: {', '.join(KINDS)})")
    if kind == "none":
        return Tokenizer(directory)
    model = directory / str(model_name)
    if not model.is_file():
        raise LmforgeError(f"{path} names {model_name!r}, which is not in {directory}; copy the whole directory")
    if _sha256(model) != sha:
        raise LmforgeError(f"{model} does not match the sha256 in {path}; the tokenizer was changed or damaged")
    return _CLASSES[kind](directory, model)


def install_tokenizer(kind: str, source: str | Path, directory: str | Path) -> Tokenizer:
    """Copy an existing model file (a HF tokenizers JSON for `bpe`, a .model for `sentencepiece`) into `directory`."""
    from lmforge.io import storage

    directory = Path(directory)
    if kind == "none":
        return save_none(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model = directory / MODEL_FILES[kind]
    if not storage.exists(source):
        raise LmforgeError(f"preprocess.tokenizer_file {source} does not exist; give the path or URI of a {kind} model")
    storage.get_file(source, model)
    tokenizer = _CLASSES[kind](directory, model)  # fails here, with a message, if it does not load
    write_manifest(directory, kind, model)
    return tokenizer


def save_none(directory: str | Path) -> Tokenizer:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_manifest(directory, "none", None)
    return Tokenizer(directory)


def train_tokenizer(kind: str, lines: Iterable[str], directory: str | Path, *, vocab_size: int,
                    model_type: str = "bpe") -> Tokenizer:
    """Train a `kind` tokenizer on `lines` (raw text, no newlines) and save it into `directory`.

    Deterministic: the same lines and settings give the same model file (both
    libraries' trainers break ties by fixed rules), so the tokenizer's sha256
    identifies it.
    """
    directory = Path(directory)
    if kind == "none":
        return save_none(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model = directory / MODEL_FILES[kind]
    fd, tmp_name = tempfile.mkstemp(prefix=f".{model.name}.", dir=directory)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        if kind == "bpe":
            _train_bpe(lines, tmp, vocab_size)
        elif kind == "sentencepiece":
            _train_sentencepiece(lines, tmp, vocab_size, model_type)
        else:
            raise LmforgeError(f"unknown tokenizer {kind!r} (use {', '.join(KINDS)})")
        os.replace(tmp, model)
    finally:
        tmp.unlink(missing_ok=True)
    write_manifest(directory, kind, model)
    return _CLASSES[kind](directory, model)


def _train_bpe(lines: Iterable[str], out: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer as HfTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = HfTokenizer(models.BPE())
    # No prefix space: a line's first word keeps its own form, and decode(encode(x)) == x.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(lines, trainer=trainer)
    tok.save(str(out))


def _train_sentencepiece(lines: Iterable[str], out: Path, vocab_size: int, model_type: str) -> None:
    import io

    import sentencepiece as spm

    if model_type not in SENTENCEPIECE_TYPES:
        raise LmforgeError(f"preprocess.model_type {model_type!r}: use {' or '.join(SENTENCEPIECE_TYPES)}")
    proto = io.BytesIO()
    nonempty: Iterator[str] = (line for line in lines if line.strip())
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=nonempty, model_writer=proto, vocab_size=vocab_size, model_type=model_type,
            # A small corpus may not hold vocab_size pieces: take what it has rather than fail.
            hard_vocab_limit=False, minloglevel=2,
        )
    except RuntimeError as exc:
        raise LmforgeError(f"sentencepiece could not train on the training text ({exc}); "
                           "check preprocess.vocab_size and preprocess.tokenizer_sample_bytes") from None
    out.write_bytes(proto.getvalue())


def describe(tokenizer: Tokenizer) -> dict[str, Any]:
    return {"kind": tokenizer.kind, "sha256": tokenizer.sha256}
