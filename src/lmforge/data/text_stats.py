"""What a split's bytes are, counted the way fairseq reads them: UTF-8 checked, digest, lines, tokens.

In:  the bytes of one text file, fed in chunks of any size. Out: {"sha256",
     "bytes", "lines", "tokens"} (the per-split entry of a corpus manifest), or
     NotUtf8 with the exact byte offset of the first invalid byte.

    lmforge download --source wikitext-2 --out data/wikitext-2   # manifest.json's "splits"

It lives in data/, not io/, because the counts are fairseq's rules (text-mode
lines, whitespace tokens plus one end-of-sentence), not a property of bytes.
"""

from __future__ import annotations

import codecs
import hashlib
import io
from typing import Any


class NotUtf8(Exception):
    """A split's bytes are not UTF-8 at `offset` (counted from the start of the file)."""

    def __init__(self, offset: int, reason: str):
        super().__init__(f"byte offset {offset}: {reason}")
        self.offset, self.reason = offset, reason


class TextStats:
    """Digest, size, line and token counts of a UTF-8 text fed in chunks.

    Lines are split as Python's text mode splits them (\\n, \\r\\n, \\r), because
    that is how fairseq reads a corpus; tokens are whitespace-separated words plus
    one end-of-sentence per line (so an empty line counts 1). Raises NotUtf8 with
    the exact byte offset of the first invalid byte, even when a multi-byte
    character straddles two chunks.
    """

    def __init__(self) -> None:
        self._sha = hashlib.sha256()
        self.bytes = self.lines = self.tokens = 0
        self._utf8 = codecs.getincrementaldecoder("utf-8")("strict")
        self._newlines = io.IncrementalNewlineDecoder(None, translate=True)
        self._tail: list[str] = []  # the unfinished last line, in pieces (no quadratic joins)

    def update(self, chunk: bytes) -> None:
        text = self._decode(chunk, final=False)
        self._sha.update(chunk)
        self.bytes += len(chunk)
        self._count(self._newlines.decode(text))

    def finish(self) -> dict[str, Any]:
        text = self._decode(b"", final=True)
        self._count(self._newlines.decode(text, final=True))
        last = "".join(self._tail)
        if last:  # a last line without its newline is still a line
            self.lines += 1
            self.tokens += len(last.split()) + 1
        self._tail = []
        return {"sha256": self._sha.hexdigest(), "bytes": self.bytes, "lines": self.lines, "tokens": self.tokens}

    def _decode(self, chunk: bytes, final: bool) -> str:
        # The decoder holds back an incomplete trailing character; its error
        # positions count from the start of those held-back bytes.
        pending = len(self._utf8.getstate()[0])
        try:
            return self._utf8.decode(chunk, final)
        except UnicodeDecodeError as e:
            raise NotUtf8(self.bytes - pending + e.start, e.reason) from None

    def _count(self, text: str) -> None:
        cut = text.rfind("\n")
        if cut < 0:
            if text:
                self._tail.append(text)
            return
        done = "".join(self._tail) + text[: cut + 1]
        self._tail = [text[cut + 1 :]] if cut + 1 < len(text) else []
        n = done.count("\n")
        # "\n" is whitespace, so splitting the whole block never joins two lines' words.
        self.lines += n
        self.tokens += len(done.split()) + n
