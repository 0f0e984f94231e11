"""Tokenizers as preprocessing applied them, read back from a data-bin directory.

In: a directory holding `tokenizer.json`, a manifest
``{"kind": "none"|"bpe"|"sentencepiece", "model": <file name or null>, "sha256": <its sha256 or null>}``,
and the model file it names; no manifest means kind "none" (whitespace tokens).
Out: a `Tokenizer` with `.kind`, `.sha256` ("" for none), `.encode(text)` (a raw text line
to the space-separated tokens preprocessing wrote), `.decode(tokens)` and `.files()`.

This minimal version knows kind "none" only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from lmforge.errors import LmforgeError

TOKENIZER_MANIFEST = "tokenizer.json"


@dataclass(frozen=True)
class Tokenizer:
    kind: str = "none"
    sha256: str = ""
    directory: Path | None = None

    def encode(self, text: str) -> str:
        return " ".join(text.split())

    def decode(self, tokens: str) -> str:
        return tokens

    def files(self) -> list[Path]:
        if self.directory is None or not (self.directory / TOKENIZER_MANIFEST).is_file():
            return []
        return [self.directory / TOKENIZER_MANIFEST]


def load_tokenizer(directory: str | Path) -> Tokenizer:
    directory = Path(directory)
    manifest = directory / TOKENIZER_MANIFEST
    if not manifest.is_file():
        return Tokenizer()
    kind = json.loads(manifest.read_text(encoding="utf-8")).get("kind", "none")
    if kind != "none":
        raise LmforgeError(f"{manifest}: tokenizer kind {kind!r} is not supported by this lmforge")
    return Tokenizer(directory=directory)
