"""Where a corpus's split files live: a directory, a zip, a .tar.gz, a .gz or one plain file, read safely.

In:  a local directory or file (downloaded, cached or given), what an archive may
     unpack to (`Limits`), optionally a split -> member mapping. Out: a container
     that lists its regular files by normalized member name and copies one out
     (`extract`: the bytes written to a file, with their TextStats), and the
     member chosen for each split (`find_split_members`).

    lmforge download --source https://example.org/corpus.tar.gz --out data/corpus

(the download stage, lmforge.data.download, is the caller.)

Archives are inspected before a byte is written: absolute names, `..`, links,
devices, duplicate names, more than `max_members` members or more than
`max_bytes` uncompressed bytes (declared, and counted again while streaming:
`Budget`) are refused. Split files are found through `members` or by name
(SPLIT_FILE_NAMES) at the top of the container or one folder down (WikiText
zips have a top folder).
"""

from __future__ import annotations

import gzip
import re
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from lmforge.config import SPLITS
from lmforge.data.text_stats import NotUtf8, TextStats
from lmforge.errors import LmforgeError
from lmforge.io.writes import write_error

# 1 MiB reads, as for a download: negligible per-chunk overhead, flat memory.
CHUNK = 1 << 20
# Archive limits. WikiText-103 unpacks to ~540 MB in 4 members (raw: ~550 MB);
# 2 GiB and 10,000 members leave room for any corpus of that kind while
# refusing a zip bomb before it fills the disk.
MAX_BYTES = 2 << 30
MAX_MEMBERS = 10_000

# Looked for in this order, for each split, at the top level then one folder down.
SPLIT_FILE_NAMES = {s: (f"{s}.txt", f"wiki.{s}.tokens", f"wiki.{s}.raw") for s in SPLITS}
ARCHIVE_SUFFIXES = (".zip", ".tar.gz", ".tgz", ".gz")


# ------------------------------------------------------------------ names


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
                    f" (it holds {preview(available)})"
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
                f" it holds {preview(available)}); name it with corpus.members.{split}"
            )
        chosen[split] = below[0]
    return chosen


def preview(names: Iterable[str], limit: int = 8) -> str:
    """A few of `names`, sorted, for a one-line message."""
    items = sorted(names)
    if not items:
        return "nothing"
    more = f", ... ({len(items)} in all)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


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


# ------------------------------------------------------------------ limits


@dataclass(frozen=True)
class Limits:
    """What an archive may hold: uncompressed bytes in all, and members (files, folders, links) in all."""

    max_bytes: int = MAX_BYTES
    max_members: int = MAX_MEMBERS

    def __post_init__(self) -> None:
        if self.max_bytes < 1 or self.max_members < 1:
            raise LmforgeError("max_bytes and max_members must be positive")


class Budget:
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


def _checked(name: str, where: str) -> str:
    try:
        return normalize_member(name)
    except LmforgeError as e:
        raise LmforgeError(f"{where}: refusing archive: {e}") from None


# ------------------------------------------------------------------ containers
# Each lists its regular files by normalized name and opens one by name.
# Archive containers check every member in their constructor, before the caller
# writes anything; `budget` is set where the bytes they yield are decompressed
# (and so counted against max_bytes while streaming).


class Container:
    """A directory or file holding split files; closes what it opened (use it as a context manager)."""

    where: str  # the source as messages name it
    budget: Budget | None = None

    def names(self, members: Mapping[str, str]) -> list[str]:
        raise NotImplementedError

    def open(self, name: str) -> IO[bytes]:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self) -> Container:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Directory(Container):
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


class _Archive(Container):
    """A zip or tar whose checked members are in `files` (name -> the library's member info)."""

    files: dict[str, Any]

    def names(self, members: Mapping[str, str]) -> list[str]:
        return list(self.files)


class Zip(_Archive):
    def __init__(self, path: Path, where: str, limits: Limits):
        self.where, self.budget = where, Budget(limits.max_bytes, where)
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
            self.files = check.finish()
        except BaseException:
            self.zf.close()
            raise

    def open(self, name: str) -> IO[bytes]:
        return self.zf.open(self.files[name])

    def close(self) -> None:
        self.zf.close()


class Tar(_Archive):
    def __init__(self, path: Path, where: str, limits: Limits):
        self.where, self.budget = where, Budget(limits.max_bytes, where)
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
            self.files = check.finish()
        except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
            self.tf.close()
            raise LmforgeError(f"{where}: not a readable .tar.gz archive ({e})") from None
        except BaseException:
            self.tf.close()
            raise

    def open(self, name: str) -> IO[bytes]:
        stream = self.tf.extractfile(self.files[name])
        assert stream is not None  # only regular files are listed
        return stream

    def close(self) -> None:
        self.tf.close()


class PlainFile(Container):
    """One plain text file; its only member is its own name."""

    def __init__(self, path: Path, name: str, where: str):
        self.path, self.name, self.where = path, name, where

    def names(self, members: Mapping[str, str]) -> list[str]:
        return [self.name]

    def open(self, name: str) -> IO[bytes]:
        return open(self.path, "rb")


class GzipFile(PlainFile):
    """One gzip-compressed text file; its member is its name without `.gz`.

    Nothing up front says how much it inflates to (the gzip trailer's size is
    modulo 4 GiB and a hostile file can lie), so only the streaming count
    against max_bytes guards it.
    """

    def __init__(self, path: Path, name: str, where: str, limits: Limits):
        super().__init__(path, name, where)
        self.budget = Budget(limits.max_bytes, where)
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


def open_file(path: Path, name: str, where: str, members: Mapping[str, str], limits: Limits) -> Container:
    """The container for one local file, chosen by its first bytes (then its `name`, the location's file name).

    A gzip stream is a .tar.gz when its name says so or its first block is a tar
    header; a plain or single .gz file holds all three splits only when
    `members` maps them to it.
    """
    with open(path, "rb") as f:
        head = f.read(16)
    kind = archive_kind(head)
    lower = name.lower()
    if kind == "zip":
        return Zip(path, where, limits)
    if kind == "gzip":
        if lower.endswith((".tar.gz", ".tgz")) or looks_like_tar(_gzip_head(path, where)):
            return Tar(path, where, limits)
        inner = name[: -len(".gz")] if lower.endswith(".gz") else name
        _need_members(where, members)
        return GzipFile(path, inner or "corpus.txt", where, limits)
    suffix = next((x for x in ARCHIVE_SUFFIXES if lower.endswith(x)), None)
    if suffix:
        # Typically a server's HTML error page delivered with status 200.
        raise LmforgeError(
            f"{where}: named like a {suffix} archive, but its bytes are not one (they start {head!r})"
        )
    _need_members(where, members)
    return PlainFile(path, name or "corpus.txt", where)


def _gzip_head(path: Path, where: str) -> bytes:
    try:
        with gzip.open(path, "rb") as g:
            return g.read(tarfile.BLOCKSIZE)
    except (OSError, EOFError, zlib.error) as e:
        raise LmforgeError(f"{where}: not a readable gzip file ({e})") from None


def plain_file_problem(where: str) -> str:
    """Why one plain file is no corpus: what `lmforge run` (a corpus.source) and `lmforge preprocess --corpus` say."""
    return (f"{where}: a plain file cannot hold three splits; give a directory with train.txt, valid.txt, test.txt"
            " (lmforge run also takes a .zip/.tar.gz archive, or this file with corpus.members mapping splits to it)")


def _need_members(where: str, members: Mapping[str, str]) -> None:
    if not members:
        raise LmforgeError(plain_file_problem(where))


# ------------------------------------------------------------------ copying a member out


def extract(container: Container, name: str, out: Path) -> dict[str, Any]:
    """Copy member `name` to the file `out`, checking UTF-8 and the budget as it streams; returns its TextStats."""
    where, stats = container.where, TextStats()
    try:
        with container.open(name) as src, open(out, "wb") as dst:
            while chunk := src.read(CHUNK):
                if container.budget is not None:
                    container.budget.check(name, stats.bytes + len(chunk))
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
        if write_error(e, out) is not None:
            raise  # writing the copy failed, not reading the member: the caller names its destination
        if isinstance(e, (FileNotFoundError, PermissionError)):
            raise LmforgeError(f"{name} in {where}: {e.strerror}") from None
        raise LmforgeError(f"{name} in {where}: cannot read it ({e})") from None
