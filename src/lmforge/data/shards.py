"""Shard plans and shard reading: a split cut into byte ranges at line boundaries, and a range read back as text.

In:  a split file (local path, file:// or s3://bucket/key) and a number of shards N.
Out: N + 1 byte offsets, cut exactly where fairseq's `find_offsets`
     (fairseq/file_chunker_utils.py) cuts; and, for one range, its text in
     blocks, read with a local seek or ranged S3 GETs only (never the whole
     object), decoded with the line semantics fairseq's text-mode reading has.

Used by the preprocessing stages (lmforge.data.stages: the shard plan before each
fan-out, the map tasks' reads), which the pipeline's preprocess tasks and
`lmforge preprocess --shards N ...` on one machine run.

How fairseq cuts: offset i (0 < i < N) is where text-mode `readline` stops
after seeking to `size // N * i`, stepping back to the start of a UTF-8
character first when the seek landed inside one. In bytes that is: just past
the first line terminator at or after `size // N * i`, where a terminator is
"\\n", "\\r\\n" or a lone "\\r" (universal newlines), or the end of the file if
none follows. Offsets may repeat (N larger than the number of lines gives
empty ranges); fairseq keeps them, and so does this plan. fairseq's `tell()`
returns an opaque cookie instead of a byte offset after a lone "\\r" it could
only decide on by reading the next character; the byte offset given here is
the position that cookie stands for.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from lmforge.io import storage
from lmforge.errors import LmforgeError

# Text is handed out in blocks of about this many bytes, cut after a "\n". A
# block's token list costs ~60 bytes per token in Python objects; 1 MiB of
# WikiText (~200 k tokens, ~12 MB of objects) keeps memory flat whatever the
# shard size and was ~25% faster than 8 MiB blocks (fewer cache misses).
BLOCK_BYTES = 1 << 20

# Bytes read per probe when looking for the line end after a cut point. WikiText
# lines average ~110 bytes with a long tail; 64 KiB finds the end in one ranged
# GET almost always, and a longer line just takes more probes.
PROBE_BYTES = 64 << 10


@dataclass(frozen=True)
class Shard:
    """Range `index` of every split: `ranges[split] = (start, end)`, byte offsets into `split`.txt."""

    index: int
    ranges: dict[str, tuple[int, int]]

    def to_json(self) -> str:
        return json.dumps({"index": self.index, "ranges": {s: list(r) for s, r in self.ranges.items()}}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Shard:
        # int(): KFP may hand numbers back as floats (JSON via protobuf Struct).
        data = json.loads(text)
        return cls(int(data["index"]), {s: (int(a), int(b)) for s, (a, b) in data["ranges"].items()})

    @property
    def nbytes(self) -> int:
        return sum(b - a for a, b in self.ranges.values())


def line_end_at_or_after(read: Callable[[int, int], bytes], size: int, pos: int) -> int:
    """Offset just past the first line terminator at or after `pos` ("\\n", "\\r\\n", lone "\\r"), else `size`.

    `read(start, end)` returns bytes [start, end) of the file.
    """
    while pos < size:
        window = read(pos, min(size, pos + PROBE_BYTES))
        if not window:
            return size
        cr, lf = window.find(b"\r"), window.find(b"\n")
        hits = [i for i in (cr, lf) if i >= 0]
        if not hits:
            pos += len(window)
            continue
        at = pos + min(hits)
        if min(hits) == lf:
            return at + 1
        # "\r": one terminator with a "\n" right after it, else a lone "\r" ends the line.
        following = window[min(hits) + 1 : min(hits) + 2] or read(at + 1, min(size, at + 2))
        return at + 2 if following == b"\n" else at + 1
    return size


def split_offsets(uri: str | Path, shards: int) -> list[int]:
    """`shards` + 1 offsets cutting `uri` where fairseq's `find_offsets(uri, shards)` cuts it."""
    if shards < 1:
        raise ValueError(f"shards must be >= 1, got {shards}")
    size = storage.size(uri)
    local = storage.local_path(uri)
    if local is not None:
        with open(local, "rb") as f:

            def read(start: int, end: int) -> bytes:
                f.seek(start)
                return f.read(end - start)

            cuts = [line_end_at_or_after(read, size, size // shards * i) for i in range(1, shards)]
    else:
        cuts = [
            line_end_at_or_after(lambda a, b: storage.read_range(uri, a, b), size, size // shards * i)
            for i in range(1, shards)
        ]
    return [0, *cuts, size]


def plan_shards(split_uris: dict[str, str | Path], shards: int) -> list[Shard]:
    """Shard i holds the i-th range of every split (so each task gets a slice of each)."""
    offsets = {split: split_offsets(uri, shards) for split, uri in split_uris.items()}
    return [Shard(i, {split: (o[i], o[i + 1]) for split, o in offsets.items()}) for i in range(shards)]


# --------------------------------------------------------------------------- reading a range


def decode_block(data: bytes, uri: str | Path, offset: int, *, last: bool) -> str:
    """UTF-8 bytes at `offset` of `uri` -> text with fairseq's line semantics (universal newlines).

    Every line of the result, including a last one without a newline in the
    file, ends with "\\n", so the text holds exactly one "\\n" per line.
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise LmforgeError(
            f"{uri} is not UTF-8 (bad byte at offset {offset + e.start}); re-encode the file as UTF-8"
        ) from None
    if "\r" in text:  # text-mode reading turns \r\n and a lone \r into \n
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if last and text and not text.endswith("\n"):
        text += "\n"
    return text


def iter_text_blocks(uri: str | Path, start: int, end: int, block_bytes: int = BLOCK_BYTES) -> Iterator[str]:
    """The text of bytes [start, end) of `uri` (a range cut by `split_offsets`), in blocks cut after a "\\n".

    Locally a seek and reads; on S3 one ranged GET streamed in `block_bytes`
    chunks. Memory holds one block (plus the longest line).
    """
    buf = bytearray()
    buf_offset = start  # file offset of buf[0], for error messages
    received = 0
    for data in storage.iter_range(uri, start, end, chunk_size=block_bytes):
        received += len(data)
        buf += data
        cut = buf.rfind(b"\n") + 1
        # Cut after the last "\n" (never inside a UTF-8 character or a "\r\n" pair); the rest waits.
        if cut > 0 and start + received < end:
            yield decode_block(bytes(buf[:cut]), uri, buf_offset, last=False)
            del buf[:cut]
            buf_offset += cut
    if buf:
        yield decode_block(bytes(buf), uri, buf_offset, last=True)
