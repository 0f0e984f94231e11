"""Download a corpus and lay it out as the three splits the rest of the pipeline reads.

In:  a corpus source: a catalog name (`wikitext-2`, `wikitext-103`, ... see
     lmforge.data.catalog), a local directory, a local file, a `file://` URI, an
     `http(s)://` URL or an `s3://bucket/key` URI of a `.zip` / `.tar.gz` / `.tgz`
     archive, a `.gz` text file or a plain text file (the last two when `members`
     maps the splits to it); optional pins (`sha256`, `size`) on the downloaded
     bytes, a split -> member mapping, and a content-addressed cache directory.
Out: `DEST/train.txt`, `valid.txt`, `test.txt` (byte for byte the source's split
     files, checked to be UTF-8) and `DEST/manifest.json` (digests, sizes, line and
     token counts), published atomically: DEST appears complete or not at all.

    lmforge download --source wikitext-2 --out data/wikitext-2
    lmforge download --source https://example.org/corpus.tar.gz --sha256 ... --out data/corpus

Transfers: HTTP(S) is streamed and, after a dropped connection, resumed with a
`Range` request (If-Range guards against a file that changed meanwhile; a server
that ignores Range is restarted from byte 0). Connection errors, timeouts, 5xx,
408 and 429 are retried with exponential backoff and jitter, honouring a capped
Retry-After. S3 goes through boto3 (endpoint from `endpoint_url` or
AWS_ENDPOINT_URL, botocore's adaptive retry mode) and resumes with a ranged,
If-Match GET. A catalog corpus is tried at each of its locations in order.

Integrity: the download goes to a temporary name, is checked against the pins,
then is unpacked; the verified archive is kept once in `cache_dir/sha256/<digest>`,
so a second run with the same pin transfers nothing. Archives are inspected
before a byte is written: absolute names, `..`, links, devices, duplicate names,
more than `max_members` members or more than `max_bytes` uncompressed bytes
(declared, and counted again while streaming) are refused.

Split files are found through `members` (e.g. {"train": "wikitext-2/wiki.train.tokens"})
or by name: `train.txt`, WikiText's `wiki.train.tokens` or `wiki.train.raw` (same for
valid/test), at the top of the directory/archive or one folder down (WikiText zips
have a top folder).

Manifest: {"source", "sha256", "bytes", "splits": {split: {"sha256", "bytes",
"lines", "tokens"}}}. "sha256"/"bytes" describe the downloaded file (archive or
text); for a directory source, where nothing is downloaded, "sha256" is the sha256
of the three split hex digests concatenated in split order (train, valid, test)
and "bytes" the sum of the split sizes. "lines" and "tokens" count as fairseq
reads the text: Python text-mode lines, whitespace tokens plus one end-of-sentence
per line. For a catalog corpus "source" is its name, whichever location served it.
"""

from __future__ import annotations

import codecs
import email.utils
import errno
import gzip
import hashlib
import io
import json
import logging
import os
import random
import re
import shutil
import stat
import tarfile
import tempfile
import time
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

from lmforge.data import catalog as catalog_mod
from lmforge.config import SPLITS
from lmforge.errors import IntegrityError, LmforgeError
from lmforge.logs import Progress
from lmforge.io import s3
from lmforge.io.hashing import hash_file
from lmforge.io.staging import replace_dir
from lmforge.io.uris import HTTP, LOCAL, S3, Location, parse_location

log = logging.getLogger(__name__)

# 1 MiB reads: large enough that per-chunk Python overhead is negligible
# (~200 chunks for WikiText-103's 190 MB zip), small enough to keep memory flat.
CHUNK = 1 << 20
# Attempts per download without progress (the first plus 3 retries) and the
# first backoff delay, doubled after each failure (with jitter): about 2 + 4 + 8 s
# rides out a proxy restart or a short 5xx burst without hiding a real outage.
RETRIES = 4
BACKOFF_S = 2.0
# Longest single wait, exponential or a server's Retry-After: a server asking for
# an hour is not worth a pipeline step idling that long.
MAX_BACKOFF_S = 60.0
# An attempt that brought new bytes before failing does not use up a retry (it is
# resumed where it stopped), but at most this many such resumes happen in all, so
# a link that drops every few kilobytes still ends.
MAX_RESUMES = 20
CONNECT_TIMEOUT_S = 10.0
# Seconds without a single byte before a read is abandoned (and resumed).
READ_TIMEOUT_S = 60.0
# Without a terminal (a pod's log), report download progress this often.
LOG_EVERY_S = 10.0
# Archive limits. WikiText-103 unpacks to ~540 MB in 4 members (raw: ~550 MB);
# 2 GiB and 10,000 members leave room for any corpus of that kind while
# refusing a zip bomb before it fills the disk.
MAX_BYTES = 2 << 30
MAX_MEMBERS = 10_000

# Looked for in this order, for each split, at the top level then one folder down.
SPLIT_FILE_NAMES = {s: (f"{s}.txt", f"wiki.{s}.tokens", f"wiki.{s}.raw") for s in SPLITS}
OUTPUT_NAMES = frozenset([*(f"{s}.txt" for s in SPLITS), "manifest.json"])
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


# ---------------------------------------------------------------- pure helpers


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


def text_stats(data: bytes) -> dict[str, Any]:
    """TextStats of a whole byte string (convenience for small texts and tests)."""
    stats = TextStats()
    stats.update(data)
    return stats.finish()


def normalize_member(name: str) -> str:
    """A member name as a clean relative POSIX path; LmforgeError if it could escape.

    Rejects absolute names (`/x`, `\\x`, `C:x`) and any `..` component, the two
    ways an archive member (or a `members` entry) could point outside the
    extraction directory. Backslashes count as separators: zips made on Windows
    use them.
    """
    if "\x00" in name:
        raise LmforgeError(f"unsafe member name {name!r}: NUL byte")
    raw = name.replace("\\", "/")
    if raw.startswith("/") or re.match(r"^[A-Za-z]:", raw):
        raise LmforgeError(f"unsafe member name {name!r}: absolute path")
    parts = [p for p in raw.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise LmforgeError(f"unsafe member name {name!r}: '..' component")
    if not parts:
        raise LmforgeError(f"unsafe member name {name!r}: empty")
    return "/".join(parts)


def find_split_members(names: Iterable[str], members: Mapping[str, str], where: str) -> dict[str, str]:
    """Choose the member holding each split among `names` (normalized member names).

    `members` wins for the splits it names; the others are found by name
    (SPLIT_FILE_NAMES), first at the top level, then exactly one folder down.
    Raises LmforgeError (one line) for a missing split or an ambiguous one.
    """
    available = set(names)
    chosen: dict[str, str] = {}
    for split in SPLITS:
        if split in members:
            wanted = normalize_member(members[split])
            if wanted not in available:
                raise LmforgeError(
                    f"{where}: corpus.members.{split} = {members[split]!r} not found"
                    f" (it holds {_preview(available)})"
                )
            chosen[split] = wanted
            continue
        candidates = SPLIT_FILE_NAMES[split]
        top = [c for c in candidates if c in available]
        if top:
            chosen[split] = top[0]
            continue
        below = sorted(n for n in available if n.count("/") == 1 and n.split("/")[1] in candidates)
        if len(below) > 1:
            # Prefer the first name in candidate order when it is unique (train.txt beside
            # wiki.train.tokens in one folder); two folders each holding one is ambiguous.
            for c in candidates:
                hits = [n for n in below if n.split("/")[1] == c]
                if hits:
                    break
            if len(hits) > 1:
                raise LmforgeError(
                    f"{where}: several {split} splits ({', '.join(hits)}); choose one with corpus.members.{split}"
                )
            below = hits
        if not below:
            raise LmforgeError(
                f"{where}: no {split} split (looked for {', '.join(candidates)} at the top or one folder down;"
                f" it holds {_preview(available)}); name it with corpus.members.{split}"
            )
        chosen[split] = below[0]
    return chosen


def check_pins(source: str, sha256: str | None, size: int | None, actual_sha256: str, actual_size: int) -> None:
    """Raise IntegrityError (one line, expected and actual) if the bytes are not the pinned ones."""
    problems = []
    if size is not None and actual_size != size:
        problems.append(f"size expected {size} bytes, got {actual_size}")
    if sha256 is not None and actual_sha256 != sha256:
        problems.append(f"sha256 expected {sha256}, got {actual_sha256}")
    if problems:
        raise IntegrityError(
            f"{source}: downloaded bytes do not match the pin: {'; '.join(problems)}"
            " (check the source, or fix corpus.sha256/corpus.size)"
        )


ARCHIVE_SUFFIXES = (".zip", ".tar.gz", ".tgz", ".gz")


def archive_kind(head: bytes) -> str | None:
    """'zip', 'gzip' (a .tar.gz or a single .gz file) or None (plain file) from a file's first bytes.

    The bytes decide, not the name, because a URL's last segment need not carry
    a suffix (`...?id=3`) and a cached file is named by its digest.
    """
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return "zip"
    if head.startswith(b"\x1f\x8b"):
        return "gzip"
    return None


def looks_like_tar(block: bytes) -> bool:
    """True if `block` (the first 512 uncompressed bytes) is a tar header with a valid checksum."""
    if len(block) < tarfile.BLOCKSIZE:
        return False
    try:
        tarfile.TarInfo.frombuf(block[: tarfile.BLOCKSIZE], "utf-8", "surrogateescape")
    except tarfile.HeaderError:
        return False
    return True


def backoff_delay(
    failures: int,
    base_s: float,
    cap_s: float,
    retry_after: float | None = None,
    rand: Callable[[], float] = random.random,
) -> float:
    """Seconds to wait before the next attempt, after `failures` consecutive failures (>= 1).

    A server's Retry-After wins, capped at `cap_s`. Otherwise exponential
    (base, 2 base, 4 base, ...) capped at `cap_s`, with "equal jitter": a random
    point in the upper half of that delay, so that many clients failed by the
    same outage do not come back in lockstep, yet none retries immediately.
    """
    if retry_after is not None:
        return max(0.0, min(cap_s, retry_after))
    delay = min(cap_s, base_s * 2 ** (max(failures, 1) - 1))
    return delay / 2 + rand() * delay / 2


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date); None if absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - (now or datetime.now(timezone.utc))).total_seconds())


_CONTENT_RANGE = re.compile(r"^\s*bytes\s+(?:(\d+)-(\d+)|\*)/(\d+|\*)\s*$", re.IGNORECASE)


def parse_content_range(value: str | None) -> tuple[int | None, int | None]:
    """(first byte, complete length) from `bytes a-b/N` or `bytes */N`; None for what is absent or '*'."""
    m = _CONTENT_RANGE.match(value or "")
    if not m:
        return None, None
    first = int(m.group(1)) if m.group(1) is not None else None
    total = int(m.group(3)) if m.group(3) != "*" else None
    return first, total


def combined_digest(split_digests: Iterable[str]) -> str:
    """sha256 of the split hex digests concatenated in split order (a directory source's identity)."""
    return hashlib.sha256("".join(split_digests).encode("ascii")).hexdigest()


def _preview(names: Iterable[str], limit: int = 8) -> str:
    items = sorted(names)
    if not items:
        return "nothing"
    more = f", ... ({len(items)} in all)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


# ------------------------------------------------------------------ containers
# A container is where split files live: a directory, an archive or one plain
# file. Each lists its regular files by normalized name and opens one by name.
# Archive containers check every member in their constructor, before the caller
# writes anything; `limited` says whether the bytes they yield are decompressed
# (and so counted against max_bytes while streaming).


@dataclass(frozen=True)
class Limits:
    """What an archive may hold: uncompressed bytes in all, and members (files, folders, links) in all."""

    max_bytes: int = MAX_BYTES
    max_members: int = MAX_MEMBERS


class _Dir:
    limited = False

    def __init__(self, root: Path, where: str):
        self.root, self.where = root, where

    def names(self, members: Mapping[str, str]) -> list[str]:
        found = []
        for child in self.root.iterdir():
            if child.is_file():
                found.append(child.name)
            elif child.is_dir():
                found.extend(f"{child.name}/{g.name}" for g in child.iterdir() if g.is_file())
        # Members named explicitly may sit deeper than the name search looks.
        found.extend(n for n in map(normalize_member, members.values()) if (self.root / n).is_file())
        return found

    def open(self, name: str) -> IO[bytes]:
        return open(self.root / name, "rb")

    def close(self) -> None:
        pass


class _MemberCheck:
    """Accumulates an archive's members and refuses the archive at the first bad one.

    Refuses: unsafe names (absolute, `..`, NUL), duplicates (after
    normalization: `a/b`, `./a/b` and `a//b` are one name, and an extractor would
    keep only one of them), a name that is both a file and a folder, more than
    `max_members` entries, more than `max_bytes` declared uncompressed bytes.
    """

    def __init__(self, where: str, limits: Limits):
        self.where, self.limits = where, limits
        self.count = self.declared = 0
        self.files: dict[str, Any] = {}
        self.dirs: set[str] = set()

    def add(self, raw_name: str, info: Any, *, is_dir: bool, size: int) -> None:
        self.count += 1
        if self.count > self.limits.max_members:
            raise LmforgeError(
                f"{self.where}: refusing archive: more than {self.limits.max_members} members"
                " (limit max_members)"
            )
        if is_dir and raw_name.strip("/") in ("", "."):
            return  # the archive's own root, as `tar -C dir -czf x.tgz .` writes it
        name = _checked(raw_name, self.where)
        if name in self.files or (is_dir and name in self.dirs):
            raise LmforgeError(f"{self.where}: refusing archive: duplicate member {raw_name!r}")
        if is_dir:
            self.dirs.add(name)
            return
        self.declared += size
        if self.declared > self.limits.max_bytes:
            raise LmforgeError(
                f"{self.where}: refusing archive: it declares more than {self.limits.max_bytes} bytes uncompressed"
                f" (limit max_bytes; a zip bomb?)"
            )
        self.files[name] = info

    def finish(self) -> dict[str, Any]:
        parents = {"/".join(n.split("/")[:i]) for n in [*self.files, *self.dirs] for i in range(1, n.count("/") + 1)}
        clash = sorted(parents & set(self.files))
        if clash:
            raise LmforgeError(f"{self.where}: refusing archive: {clash[0]!r} is both a file and a folder")
        return self.files


class _Zip:
    limited = True

    def __init__(self, path: Path, where: str, limits: Limits):
        self.where = where
        try:
            self.zf = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError) as e:
            raise LmforgeError(f"{where}: not a readable zip archive ({e})") from None
        try:
            check = _MemberCheck(where, limits)
            for info in self.zf.infolist():
                # orig_filename is the name as stored; `filename` has already been cut
                # at a NUL byte (and had os.sep rewritten), which would hide a trick.
                raw = info.orig_filename
                # Unix-made zips keep the file type in the high 16 bits; a symlink or
                # device there is as dangerous as in a tar.
                # (Python's own writestr stores bare permission bits, type 0: allowed.)
                kind = stat.S_IFMT(info.external_attr >> 16)
                if kind == stat.S_IFLNK:
                    raise LmforgeError(f"{where}: refusing member {raw!r}: links are not allowed")
                if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
                    raise LmforgeError(f"{where}: refusing member {raw!r}: not a regular file or folder")
                check.add(raw, info, is_dir=info.is_dir(), size=info.file_size)
            self.files: dict[str, zipfile.ZipInfo] = check.finish()
        except BaseException:
            self.zf.close()
            raise

    def names(self, members: Mapping[str, str]) -> list[str]:
        return list(self.files)

    def open(self, name: str) -> IO[bytes]:
        return self.zf.open(self.files[name])

    def close(self) -> None:
        self.zf.close()


class _Tar:
    limited = True

    def __init__(self, path: Path, where: str, limits: Limits):
        self.where = where
        try:
            self.tf = tarfile.open(path, "r:gz")
        except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
            raise LmforgeError(f"{where}: not a readable .tar.gz archive ({e})") from None
        try:
            check = _MemberCheck(where, limits)
            # One header at a time (not getmembers()): reaching a header means
            # decompressing the members before it, so the count and size caps must
            # stop a bomb as soon as its headers cross them.
            while (info := self.tf.next()) is not None:
                if info.issym() or info.islnk():
                    raise LmforgeError(f"{where}: refusing member {info.name!r}: links are not allowed")
                if not (info.isfile() or info.isdir()):
                    raise LmforgeError(
                        f"{where}: refusing member {info.name!r}: devices and FIFOs are not allowed"
                    )
                check.add(info.name, info, is_dir=info.isdir(), size=info.size)
            self.files: dict[str, tarfile.TarInfo] = check.finish()
        except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
            self.tf.close()
            raise LmforgeError(f"{where}: not a readable .tar.gz archive ({e})") from None
        except BaseException:
            self.tf.close()
            raise

    def names(self, members: Mapping[str, str]) -> list[str]:
        return list(self.files)

    def open(self, name: str) -> IO[bytes]:
        stream = self.tf.extractfile(self.files[name])
        assert stream is not None  # only regular files are listed
        return stream

    def close(self) -> None:
        self.tf.close()


class _Single:
    """One plain text file; its only member is its own name."""

    limited = False

    def __init__(self, path: Path, name: str, where: str):
        self.path, self.name, self.where = path, name, where

    def names(self, members: Mapping[str, str]) -> list[str]:
        return [self.name]

    def open(self, name: str) -> IO[bytes]:
        return open(self.path, "rb")

    def close(self) -> None:
        pass


class _Gz(_Single):
    """One gzip-compressed text file; its member is its name without `.gz`.

    Nothing up front says how much it inflates to (the gzip trailer's size is
    modulo 4 GiB and a hostile file can lie), so only the streaming count
    against max_bytes guards it.
    """

    limited = True

    def __init__(self, path: Path, name: str, where: str, limits: Limits):
        super().__init__(path, name, where)
        # Inflate once without writing anything: a bomb, a truncated or corrupt
        # stream is refused before the first split file exists. (~300 MB/s.)
        n = 0
        try:
            with gzip.open(path, "rb") as g:
                while chunk := g.read(CHUNK):
                    n += len(chunk)
                    if n > limits.max_bytes:
                        raise LmforgeError(
                            f"{where}: refusing archive: it unpacks to more than {limits.max_bytes} bytes"
                            " (limit max_bytes; a zip bomb?)"
                        )
        except (OSError, EOFError, zlib.error) as e:
            raise LmforgeError(f"{where}: not a readable gzip file ({e})") from None

    def open(self, name: str) -> IO[bytes]:
        return gzip.open(self.path, "rb")  # type: ignore[return-value]


def _checked(name: str, where: str) -> str:
    try:
        return normalize_member(name)
    except LmforgeError as e:
        raise LmforgeError(f"{where}: refusing archive: {e}") from None


def _gzip_head(path: Path, where: str) -> bytes:
    try:
        with gzip.open(path, "rb") as g:
            return g.read(tarfile.BLOCKSIZE)
    except (OSError, EOFError, zlib.error) as e:
        raise LmforgeError(f"{where}: not a readable gzip file ({e})") from None


def _open_blob(
    path: Path, name: str, where: str, members: Mapping[str, str], limits: Limits
) -> _Zip | _Tar | _Single:
    with open(path, "rb") as f:
        head = f.read(16)
    kind = archive_kind(head)
    lower = name.lower()
    if kind == "zip":
        return _Zip(path, where, limits)
    if kind == "gzip":
        if lower.endswith((".tar.gz", ".tgz")) or looks_like_tar(_gzip_head(path, where)):
            return _Tar(path, where, limits)
        inner = name[: -len(".gz")] if lower.endswith(".gz") else name
        _need_members(where, members)
        return _Gz(path, inner or "corpus.txt", where, limits)
    suffix = next((x for x in ARCHIVE_SUFFIXES if lower.endswith(x)), None)
    if suffix:
        # Typically a server's HTML error page delivered with status 200.
        raise LmforgeError(
            f"{where}: named like a {suffix} archive, but its bytes are not one (they start {head!r})"
        )
    _need_members(where, members)
    return _Single(path, name or "corpus.txt", where)


def _need_members(where: str, members: Mapping[str, str]) -> None:
    if not members:
        raise LmforgeError(
            f"{where}: a plain file cannot hold three splits; give a directory with train.txt, valid.txt,"
            " test.txt or a .zip/.tar.gz archive (or map the splits to this file with corpus.members)"
        )


# ------------------------------------------------------------------ transfers


class _Transient(Exception):
    """A failure worth retrying: connection dropped, timeout, 5xx/408/429, short body."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class _Restart(_Transient):
    """The server cannot continue a partial download (a wrong range, a changed file): start from byte 0."""


class Unreachable(LmforgeError):
    """A remote source still failing with transient errors (connection, timeout, 5xx, 429) after every retry."""


@dataclass
class _Response:
    start: int  # offset in the file of the first byte `chunks` yields
    total: int | None  # the whole file's size, when the server says
    validator: str | None  # what a resumed request sends to make sure the file is the same
    chunks: Iterator[bytes]


def _reason(e: BaseException) -> str:
    """A short cause for a connection-level exception ("Connection refused", "timed out")."""
    text = str(e)
    if "IncompleteRead" in text or "IncompleteRead" in type(e).__name__:
        return "closed before the end of the body"
    m = re.search(r"\[Errno -?\d+\] ([^'\")\]]+)", text)
    if m:
        return m.group(1).strip()
    if "timed out" in text.lower() or "timeout" in type(e).__name__.lower():
        return "timed out"
    return type(e).__name__


class _HttpSource:
    """Ranged, streamed GETs of one URL over a pooled session."""

    def __init__(self, loc: Location, timeout_s: float):
        import requests

        self.loc, self.timeout_s = loc, timeout_s
        self.session = requests.Session()

    def close(self) -> None:
        self.session.close()

    @contextmanager
    def open(self, offset: int, validator: str | None) -> Iterator[_Response]:
        import requests
        import urllib3

        # identity: we want the file's own bytes (what the pin covers), not a
        # transfer-decoded version, and Content-Length to count those bytes.
        headers = {"Accept-Encoding": "identity"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
            if validator:
                # The server sends the rest only if the file is still the one we
                # started; otherwise the whole new file with 200.
                headers["If-Range"] = validator
        try:
            resp = self.session.get(
                self.loc.uri, stream=True, timeout=(CONNECT_TIMEOUT_S, self.timeout_s), headers=headers
            )
        except (requests.ConnectionError, requests.Timeout) as e:
            raise _Transient(f"cannot connect ({_reason(e)})") from e
        except requests.RequestException as e:
            raise LmforgeError(f"{self.loc.display}: {e}") from None
        with resp:
            code = resp.status_code
            if code >= 500 or code in (408, 429):
                raise _Transient(
                    f"HTTP {code} {resp.reason}", retry_after=parse_retry_after(resp.headers.get("Retry-After"))
                )
            length = resp.headers.get("Content-Length", "")
            size = int(length) if length.isdigit() else None
            if code == 416 and offset:
                _, total = parse_content_range(resp.headers.get("Content-Range"))
                if total == offset:  # we already hold every byte
                    yield _Response(offset, total, validator, iter(()))
                    return
                raise _Restart(f"HTTP 416: the server has {total} bytes, not more than the {offset} held")
            if code >= 400:
                raise LmforgeError(f"{self.loc.display}: HTTP {code} {resp.reason}; check corpus.source")
            if code == 206:
                start, total = parse_content_range(resp.headers.get("Content-Range"))
                if start != offset:
                    raise _Restart(f"asked for bytes {offset}-, the server sent {resp.headers.get('Content-Range')!r}")
                if total is None and size is not None:
                    total = offset + size
            elif code == 200:
                start, total = 0, size
            else:
                raise LmforgeError(f"{self.loc.display}: unexpected HTTP {code} {resp.reason}")
            etag = resp.headers.get("ETag")
            # If-Range takes a strong ETag or a date; a weak ETag would never match.
            new_validator = etag if etag and not etag.startswith("W/") else resp.headers.get("Last-Modified")

            def chunks() -> Iterator[bytes]:
                # read1: whatever the socket has, up to CHUNK. A blocking read(CHUNK)
                # would hold bytes already received in a buffer that a read timeout
                # throws away; with read1 a resumed attempt starts after every byte
                # that arrived.
                try:
                    while data := resp.raw.read1(CHUNK, decode_content=False):
                        yield data
                except (urllib3.exceptions.HTTPError, requests.RequestException, OSError) as e:
                    log.debug("%s: %r", self.loc.display, e)
                    raise _Transient(f"connection broken ({_reason(e)})") from e

            yield _Response(start, total, new_validator if start == 0 else validator, chunks())


class _S3Source:
    """Ranged GETs of one S3 object; botocore retries each call (adaptive mode), we resume a broken body."""

    def __init__(self, loc: Location, timeout_s: float, retries: int, endpoint_url: str | None):
        self.loc, self.retries = loc, retries
        self.client = s3.make_client(endpoint_url, retries=retries, timeout_s=timeout_s)

    def close(self) -> None:
        self.client.close()

    @contextmanager
    def open(self, offset: int, validator: str | None) -> Iterator[_Response]:
        import urllib3
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

        transient = s3.transient_errors()
        args: dict[str, Any] = {"Bucket": self.loc.bucket, "Key": self.loc.key}
        if offset:
            args["Range"] = f"bytes={offset}-"
            if validator:
                args["IfMatch"] = validator  # 412 if the object was replaced meanwhile
        try:
            obj = self.client.get_object(**args)
        except ClientError as e:
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            code = e.response.get("Error", {}).get("Code", "error")
            if offset and (status in (412, 416) or code in ("PreconditionFailed", "InvalidRange")):
                raise _Restart(f"S3 {code} on a ranged read") from e
            if status >= 500 or status == 429 or "Throttl" in code or code == "SlowDown":
                # botocore has already retried this call `retries` times.
                raise Unreachable(f"{self.loc.uri}: S3 {code} after {self.retries} attempts") from None
            raise LmforgeError(f"{self.loc.uri}: S3 {code}; check corpus.source and the S3 credentials") from None
        except NoCredentialsError:
            raise LmforgeError(
                f"{self.loc.uri}: no S3 credentials; set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY"
            ) from None
        except transient as e:
            raise Unreachable(f"{self.loc.uri}: S3 unreachable after {self.retries} attempts ({e})") from None
        except BotoCoreError as e:
            raise LmforgeError(f"{self.loc.uri}: {e}") from None
        body = obj["Body"]
        if offset:
            start, total = parse_content_range(obj.get("ContentRange"))
            if start != offset:
                body.close()
                raise _Restart(f"asked for bytes {offset}-, S3 sent {obj.get('ContentRange')!r}")
        else:
            start, total = 0, obj.get("ContentLength")

        def chunks() -> Iterator[bytes]:
            try:
                yield from body.iter_chunks(CHUNK)
            except (*transient, urllib3.exceptions.HTTPError, OSError) as e:
                raise _Transient(f"S3 connection broken ({_reason(e)})") from e

        try:
            yield _Response(start, total, obj.get("ETag") if start == 0 else validator, chunks())
        finally:
            body.close()


def _fetch(
    loc: Location,
    out: Path,
    *,
    size: int | None,
    retries: int = RETRIES,
    backoff_s: float = BACKOFF_S,
    max_backoff_s: float = MAX_BACKOFF_S,
    timeout_s: float = READ_TIMEOUT_S,
    endpoint_url: str | None = None,
    where: str | None = None,
) -> tuple[str, int]:
    """Download `loc` into `out`, hashing as it streams; resume after a broken transfer.

    Returns (sha256, bytes). A body shorter than its announced length is a
    transient failure (a dropped connection looks exactly like that) and the next
    attempt asks only for the missing bytes. `retries` bounds the consecutive
    attempts that bring no new byte; an attempt that brought some is resumed, up
    to MAX_RESUMES times. Raises Unreachable when the attempts run out,
    IntegrityError when the server announces another size than the pin,
    LmforgeError for a final answer (404, 403, ...).
    """
    source: _HttpSource | _S3Source
    if loc.kind == HTTP:
        source = _HttpSource(loc, timeout_s)
    elif loc.kind == S3:
        source = _S3Source(loc, timeout_s, retries, endpoint_url)
    else:
        raise AssertionError(f"not a remote location: {loc}")
    digest, received, total, validator = hashlib.sha256(), 0, None, None
    best = stalls = resumes = attempts = 0
    progress = Progress(loc.name or loc.display, every_s=LOG_EVERY_S, logger=log)
    try:
        with open(out, "wb") as fh:
            while True:
                attempts += 1
                try:
                    with source.open(received, validator) as r:
                        if r.start != received:  # a 200 to a ranged request: the server starts over
                            log.info("%s: the server cannot resume; downloading again from byte 0", loc.display)
                            fh.seek(0)
                            fh.truncate()
                            digest, received = hashlib.sha256(), 0
                            progress.restart()
                        validator = r.validator
                        if r.total is not None:
                            if size is not None and r.total != size:
                                # The server says up front it holds other bytes: fail before the transfer.
                                raise IntegrityError(
                                    f"{where or loc.display}: downloaded bytes do not match the pin:"
                                    f" size expected {size} bytes, the server announces {r.total}"
                                    " (check the source, or fix corpus.size)"
                                )
                            total = r.total
                            progress.set_total(total)
                        try:
                            for chunk in r.chunks:
                                fh.write(chunk)
                                digest.update(chunk)
                                received += len(chunk)
                                progress.update(len(chunk))
                        except _Transient as e:
                            of = f" of {total}" if total is not None else ""
                            raise _Transient(f"{e} after {received}{of} bytes") from e
                        if total is not None and received != total:
                            raise _Transient(f"received {received} of {total} bytes announced")
                    fh.flush()
                    return digest.hexdigest(), received
                except _Transient as e:
                    if isinstance(e, _Restart):
                        log.info("%s: %s; downloading again from byte 0", loc.display, e)
                        fh.seek(0)
                        fh.truncate()
                        digest, received, validator = hashlib.sha256(), 0, None
                        progress.restart()
                    if received > best:  # progress: resume without using up a retry
                        best, stalls = received, 0
                        resumes += 1
                    else:
                        stalls += 1
                    if stalls >= retries or resumes > MAX_RESUMES:
                        raise Unreachable(f"{loc.display}: download failed after {attempts} attempts: {e}") from None
                    delay = backoff_delay(max(stalls, 1), backoff_s, max_backoff_s, e.retry_after)
                    how = f"resuming at byte {received}" if received else "retrying"
                    log.warning("%s: %s; %s in %.1f s (attempt %d)", loc.display, e, how, delay, attempts + 1)
                    time.sleep(delay)
    finally:
        progress.close()
        source.close()


def fetch(
    source: str,
    out: str | Path,
    *,
    sha256: str | None = None,
    size: int | None = None,
    retries: int = RETRIES,
    backoff_s: float = BACKOFF_S,
    max_backoff_s: float = MAX_BACKOFF_S,
    timeout_s: float = READ_TIMEOUT_S,
    endpoint_url: str | None = None,
) -> tuple[str, int]:
    """Download one http(s):// or s3:// file to `out`: temporary name, resumed transfer, pins checked, rename.

    Returns (sha256, bytes). On any failure `out` is untouched and no
    temporary file remains.
    """
    loc = parse_location(source)
    if not loc.is_remote:
        raise LmforgeError(f"{source}: fetch() takes an http(s):// or s3:// location")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{out.name}.download-", dir=out.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        digest, n = _fetch(
            loc, tmp, size=size, retries=retries, backoff_s=backoff_s, max_backoff_s=max_backoff_s,
            timeout_s=timeout_s, endpoint_url=endpoint_url,
        )
        check_pins(loc.display, sha256, size, digest, n)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return digest, n


def _place(src: Path, dst: Path) -> None:
    """Move `src` to `dst` atomically, also across filesystems (copy to a temp name there, then rename)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(src, dst)
        return
    except OSError as e:
        if e.errno != errno.EXDEV:
            raise
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", dir=dst.parent)
    os.close(fd)
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    src.unlink()


def _cached(cache_dir: Path | None, sha256: str | None, size: int | None) -> Path | None:
    """The cached file for a pinned digest, if present and still intact."""
    if cache_dir is None or sha256 is None:
        return None
    path = cache_dir / "sha256" / sha256
    if not path.is_file():
        return None
    # Re-hash: about 1 s per GB, far cheaper than a download, and a cache on a
    # shared volume can be truncated by a killed writer from an older version.
    actual, n = hash_file(path)
    if actual != sha256 or (size is not None and n != size):
        log.warning("cache entry %s is corrupt (sha256 %s, %d bytes); downloading again", path, actual, n)
        path.unlink(missing_ok=True)
        return None
    return path


# ------------------------------------------------------------------ publishing


def _check_dest(dest: Path) -> None:
    """DEST may be new, empty, or a previous download's output; anything else is kept safe."""
    if dest.is_symlink() or (dest.exists() and not dest.is_dir()):
        raise LmforgeError(f"{dest} exists and is not a directory; choose another output directory (--out)")
    if dest.is_dir():
        extra = {p.name for p in dest.iterdir()} - OUTPUT_NAMES
        if extra:
            raise LmforgeError(
                f"{dest} already holds other files ({_preview(extra, 4)});"
                " choose an empty or new output directory (--out)"
            )


def _publish(tmp_dir: Path, dest: Path) -> None:
    """Rename the finished `tmp_dir` to `dest`, replacing an earlier download's output there."""
    _check_dest(dest)
    replace_dir(tmp_dir, dest)


class _Budget:
    """Counts the uncompressed bytes read from an archive, each member once, against max_bytes.

    The declared sizes were checked up front; this catches what declarations
    cannot promise (a .gz file's real size, a header that lies).
    """

    def __init__(self, max_bytes: int, where: str):
        self.max_bytes, self.where = max_bytes, where
        self.read: dict[str, int] = {}

    def check(self, name: str, position: int) -> None:
        if position <= self.read.get(name, 0):
            return
        self.read[name] = position
        if sum(self.read.values()) > self.max_bytes:
            raise LmforgeError(
                f"{self.where}: refusing archive: it unpacks to more than {self.max_bytes} bytes"
                " (limit max_bytes; a zip bomb?)"
            )


def _write_split(container: Any, name: str, out: Path, where: str, budget: _Budget | None) -> dict[str, Any]:
    stats = TextStats()
    try:
        with container.open(name) as src, open(out, "wb") as dst:
            while chunk := src.read(CHUNK):
                if budget is not None:
                    budget.check(name, stats.bytes + len(chunk))
                stats.update(chunk)
                dst.write(chunk)
        return stats.finish()
    except NotUtf8 as e:
        raise LmforgeError(
            f"{name} in {where}: not UTF-8 at byte offset {e.offset} ({e.reason}); convert it to UTF-8"
        ) from None
    except (zipfile.BadZipFile, tarfile.TarError, gzip.BadGzipFile, EOFError, zlib.error, RuntimeError) as e:
        # BadZipFile covers a CRC mismatch; EOFError/zlib errors a truncated gzip.
        raise LmforgeError(f"{name} in {where}: cannot read it from the archive ({e})") from None
    except OSError as e:
        if isinstance(e, (FileNotFoundError, PermissionError)):
            raise LmforgeError(f"{name} in {where}: {e.strerror}") from None
        raise LmforgeError(f"{name} in {where}: cannot read it ({e})") from None


# ------------------------------------------------------------------ the step


@dataclass
class _Blob:
    """The downloaded (or local, or cached) file a corpus is unpacked from."""

    path: Path
    name: str  # the file name its location gives (decides .gz member names, error wording)
    sha256: str
    size: int
    temporary: bool  # ours to move into the cache or delete
    where: str  # the location it came from, as messages show it


def _obtain(
    loc: Location,
    where: str,
    *,
    sha256: str | None,
    size: int | None,
    scratch: Path,
    transfer: dict[str, Any],
) -> _Blob:
    """The bytes at `loc`, checked against the pins: a local file is hashed in place, a remote one downloaded."""
    if loc.kind == LOCAL:
        assert loc.path is not None
        if not loc.path.is_file():
            raise LmforgeError(f"corpus not found: {loc.path}")
        digest, n = hash_file(loc.path)
        check_pins(where, sha256, size, digest, n)
        return _Blob(loc.path, loc.name, digest, n, False, where)
    fd, name = tempfile.mkstemp(prefix=".download-", dir=scratch)
    os.close(fd)
    path = Path(name)
    try:
        log.info("downloading %s", loc.display)
        digest, n = _fetch(loc, path, size=size, where=where, **transfer)
        check_pins(where, sha256, size, digest, n)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    if sha256 is None:
        # Unpinned remote bytes: print what to pin so the next run is checked.
        log.warning(
            "%s is not pinned: it served sha256 %s, %d bytes; pin them (corpus.sha256, corpus.size)"
            " so a changed or tampered file is caught",
            where, digest, n,
        )
    return _Blob(path, loc.name, digest, n, True, where)


def _obtain_first(
    name: str,
    locs: Sequence[Location],
    *,
    sha256: str | None,
    size: int | None,
    scratch: Path,
    transfer: dict[str, Any],
    named: bool,
) -> _Blob:
    """Try each location in order; the first that serves the pinned bytes wins.

    A lone location of a plain source raises its own error. Otherwise (a
    catalog name, or mirrors) each failure is logged and the next location
    tried; when all fail, an IntegrityError if some location served other bytes
    (a mirror out of date, a captive portal), else one line saying none could be
    reached.
    """
    if len(locs) == 1 and not named:
        return _obtain(locs[0], name, sha256=sha256, size=size, scratch=scratch, transfer=transfer)
    integrity: list[str] = []
    for i, loc in enumerate(locs):
        where = f"{name} ({loc.display})"
        try:
            return _obtain(loc, where, sha256=sha256, size=size, scratch=scratch, transfer=transfer)
        except IntegrityError as e:
            integrity.append(str(e))
            err: Exception = e
        except LmforgeError as e:
            err = e
        nxt = f"; trying {locs[i + 1].display}" if i + 1 < len(locs) else ""
        log.warning("%s: location %d of %d failed: %s%s", name, i + 1, len(locs), err, nxt)
    if integrity:
        raise IntegrityError(
            integrity[0] + (f" (and {len(integrity) - 1} other location(s) likewise)" if len(integrity) > 1 else "")
        )
    raise Unreachable(catalog_mod.unreachable_message(name, [loc.display for loc in locs]))


def download_corpus(
    source: str | Path,
    dest_dir: str | Path,
    *,
    sha256: str | None = None,
    size: int | None = None,
    members: dict[str, str] | None = None,
    cache_dir: str | Path | None = None,
    retries: int = RETRIES,
    backoff_s: float = BACKOFF_S,
    timeout_s: float = READ_TIMEOUT_S,
    max_backoff_s: float = MAX_BACKOFF_S,
    endpoint_url: str | None = None,
    max_bytes: int = MAX_BYTES,
    max_members: int = MAX_MEMBERS,
    locations: Sequence[str] | None = None,
    catalog: Mapping[str, catalog_mod.CatalogEntry] | None = None,
) -> dict:
    """Fetch `source`, verify it, and publish its three splits plus manifest.json at `dest_dir`.

    `source` is a catalog name (see lmforge.data.catalog; `catalog` replaces the
    built-in one) or a location. A catalog name brings its pins, members and
    locations; `locations` replaces those locations (a local mirror, say), or,
    for a plain source, adds mirrors tried after it. `retries`, `backoff_s`,
    `max_backoff_s` and `timeout_s` tune remote transfers, `endpoint_url` the S3
    endpoint; `max_bytes` and `max_members` bound what an archive may unpack to.

    Returns the manifest. Raises IntegrityError when the downloaded bytes do not
    match `sha256`/`size`, Unreachable when no location could be reached,
    LmforgeError for every other user-fixable problem; in every failure case
    nothing is left at `dest_dir` and no temporary file stays behind.
    """
    members = dict(members or {})
    dest = Path(dest_dir).expanduser()
    cache = Path(cache_dir).expanduser() if cache_dir is not None else None
    limits = Limits(max_bytes=max_bytes, max_members=max_members)
    transfer = {
        "retries": retries, "backoff_s": backoff_s, "max_backoff_s": max_backoff_s,
        "timeout_s": timeout_s, "endpoint_url": endpoint_url,
    }

    # Cheap checks first, before any transfer.
    if sha256 is not None:
        sha256 = sha256.strip().lower()
        if not _SHA256_RE.match(sha256):
            raise LmforgeError(f"corpus.sha256: {sha256!r} is not 64 hex digits")
    if size is not None and size < 0:
        raise LmforgeError(f"corpus.size: {size} must not be negative")
    if retries < 1:
        raise LmforgeError(f"retries: {retries} must be at least 1")
    if max_bytes < 1 or max_members < 1:
        raise LmforgeError("max_bytes and max_members must be positive")
    given = source  # a Path is always a local path, whatever its text
    entry = None if isinstance(source, Path) else catalog_mod.lookup(source.strip(), catalog)
    source = str(source).strip() if entry is None else entry.name
    if entry is not None:
        problems = catalog_mod.check_entry(entry)
        if problems:
            raise LmforgeError(f"catalog: {'; '.join(problems)}")
        if sha256 is not None and sha256 != entry.sha256:
            raise LmforgeError(
                f"corpus.sha256: {source} is pinned by the catalog to {entry.sha256}, not {sha256};"
                " remove corpus.sha256"
            )
        if size is not None and size != entry.size:
            raise LmforgeError(
                f"corpus.size: {source} is pinned by the catalog to {entry.size} bytes, not {size}; remove corpus.size"
            )
        sha256, size = entry.sha256, entry.size
        members = {**entry.members, **members}
        uris: list[str | Path] = list(locations) if locations else list(entry.locations)
        if Path(source).exists():
            log.warning("%s: using the catalog corpus; for the local path of that name pass ./%s", source, source)
    else:
        uris = [given if isinstance(given, Path) else source, *(locations or [])]
    for split, member in members.items():
        if split not in SPLITS:
            raise LmforgeError(f"corpus.members.{split}: unknown split (use {', '.join(SPLITS)})")
        try:
            normalize_member(member)
        except LmforgeError as e:
            raise LmforgeError(f"corpus.members.{split}: {e}") from None
    locs = [parse_location(u) for u in uris]
    shown = locs[0].display if entry is None else source  # what the manifest and messages call the source
    directory = None
    if entry is None and len(locs) == 1 and locs[0].kind == LOCAL:
        path = locs[0].path
        assert path is not None
        if not path.exists():
            hint = catalog_mod.suggest(source, catalog)
            also = f", or the catalog corpus {hint!r}" if hint else ""
            raise LmforgeError(f"corpus not found: {path}; pass --corpus DIR or set corpus.source{also}")
        if path.is_dir():
            if sha256 is not None or size is not None:
                raise LmforgeError(
                    f"{source}: corpus.sha256/corpus.size pin a downloaded file,"
                    " and a directory is not one; remove them"
                )
            directory = path
    _check_dest(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)

    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    blob: _Blob | None = None
    container: Any = None
    try:
        if directory is not None:
            container = _Dir(directory, source)
            blob_sha = blob_size = None
            budget = None
        else:
            cached = _cached(cache, sha256, size) if any(loc.is_remote for loc in locs) else None
            if cached is not None:
                log.info("%s: using cached %s", shown, cached)
                assert sha256 is not None  # _cached only finds pinned files
                blob = _Blob(cached, locs[0].name, sha256, cached.stat().st_size, False, shown)
            else:
                blob = _obtain_first(
                    shown, locs, sha256=sha256, size=size, scratch=tmp_dir, transfer=transfer, named=entry is not None
                )
            blob_sha, blob_size = blob.sha256, blob.size
            container = _open_blob(blob.path, blob.name, blob.where, members, limits)
            budget = _Budget(limits.max_bytes, blob.where) if container.limited else None

        where = container.where
        chosen = find_split_members(container.names(members), members, where)
        splits = {}
        for split in SPLITS:
            log.info("%s: %s <- %s", where, split, chosen[split])
            splits[split] = _write_split(container, chosen[split], tmp_dir / f"{split}.txt", where, budget)
            if splits[split]["bytes"] == 0:
                log.warning("%s: the %s split (%s) is empty", where, split, chosen[split])
        if blob_sha is None:
            blob_sha = combined_digest(splits[s]["sha256"] for s in SPLITS)
            blob_size = sum(splits[s]["bytes"] for s in SPLITS)
        manifest = {"source": shown, "sha256": blob_sha, "bytes": blob_size, "splits": splits}
        (tmp_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        container.close()
        container = None
        if blob is not None and blob.temporary:
            # Out of the folder about to be published; into the cache, or gone.
            if cache is not None:
                _store(blob.path, cache / "sha256" / blob_sha)
            blob.path.unlink(missing_ok=True)
        _publish(tmp_dir, dest)
    finally:
        if container is not None:
            container.close()
        if tmp_dir.exists():
            shutil.rmtree(tmp_dir, ignore_errors=True)
    log.info(
        "%s -> %s: %s",
        shown,
        dest,
        ", ".join(f"{s} {splits[s]['lines']} lines {splits[s]['tokens']} tokens" for s in SPLITS),
    )
    return manifest


def _store(path: Path, entry: Path) -> None:
    """Keep a verified download in the content-addressed cache; a full or read-only cache only costs a warning."""
    try:
        _place(path, entry)
    except OSError as e:
        log.warning("could not keep %s in the cache (%s); the next run downloads it again", entry, e)
