"""Download a corpus and lay it out as the three splits the rest of the pipeline reads.

In:  a corpus source: a local directory, a local file, a `file://` URI, an
     `http(s)://` URL or an `s3://bucket/key` URI of a `.zip` / `.tar.gz` / `.tgz`
     archive (or of a plain text file, when `members` maps the splits to it);
     optional pins (`sha256`, `size`) on the downloaded bytes, a split -> member
     mapping, and a content-addressed cache directory.
Out: `DEST/train.txt`, `valid.txt`, `test.txt` (byte for byte the source's split
     files, checked to be UTF-8) and `DEST/manifest.json` (digests, sizes, line and
     token counts), published atomically: DEST appears complete or not at all.

    lmforge download --source https://example.org/wikitext-2-v1.zip --out data/wikitext-2

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
per line.
"""

from __future__ import annotations

import codecs
import errno
import hashlib
import io
import json
import logging
import os
import re
import shutil
import stat
import sys
import tarfile
import tempfile
import time
import zipfile
import zlib
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from lmforge.config import SPLITS
from lmforge.errors import IntegrityError, LmforgeError
from lmforge.uris import HTTP, LOCAL, Location, parse_location

log = logging.getLogger(__name__)

# 1 MiB reads: large enough that per-chunk Python overhead is negligible
# (~200 chunks for WikiText-103's 190 MB zip), small enough to keep memory flat.
CHUNK = 1 << 20
# Attempts per download (the first plus 3 retries) and the first backoff delay,
# doubled after each failure: 2 + 4 + 8 s rides out a proxy restart or a short
# 5xx burst without hiding a real outage for minutes.
RETRIES = 4
BACKOFF_S = 2.0
CONNECT_TIMEOUT_S = 10.0
# Seconds without a single byte before a read is abandoned (and retried).
READ_TIMEOUT_S = 60.0
# Without a terminal (a pod's log), report download progress this often.
LOG_EVERY_S = 10.0

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


ARCHIVE_SUFFIXES = (".zip", ".tar.gz", ".tgz")


def archive_kind(head: bytes) -> str | None:
    """'zip', 'tar.gz' or None (plain file) from a file's first bytes.

    The bytes decide, not the name, because a URL's last segment need not carry
    a suffix (`...?id=3`) and a cached file is named by its digest.
    """
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return "zip"
    if head.startswith(b"\x1f\x8b"):
        return "tar.gz"
    return None


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


class _Dir:
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


class _Zip:
    def __init__(self, path: Path, where: str):
        self.where = where
        try:
            self.zf = zipfile.ZipFile(path)
        except zipfile.BadZipFile as e:
            raise LmforgeError(f"{where}: not a readable zip archive ({e})") from None
        self.files: dict[str, zipfile.ZipInfo] = {}
        try:
            for info in self.zf.infolist():
                name = _checked(info.filename, where)
                # Unix-made zips keep the file type in the high 16 bits; a symlink or
                # device there is as dangerous as in a tar.
                # (Python's own writestr stores bare permission bits, type 0: allowed.)
                kind = stat.S_IFMT(info.external_attr >> 16)
                if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
                    raise LmforgeError(f"{where}: refusing member {info.filename!r}: not a regular file or folder")
                if not info.is_dir():
                    self.files[name] = info
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
    def __init__(self, path: Path, where: str):
        self.where = where
        try:
            self.tf = tarfile.open(path, "r:gz")
        except (tarfile.TarError, OSError, EOFError) as e:
            raise LmforgeError(f"{where}: not a readable .tar.gz archive ({e})") from None
        self.files: dict[str, tarfile.TarInfo] = {}
        try:
            # getmembers() reads every header first, so a bad member anywhere is
            # rejected before a single byte is written.
            for info in self.tf.getmembers():
                name = _checked(info.name, where)
                if info.issym() or info.islnk():
                    raise LmforgeError(f"{where}: refusing member {info.name!r}: links are not allowed")
                if info.isfile():
                    self.files[name] = info
                elif not info.isdir():
                    raise LmforgeError(
                        f"{where}: refusing member {info.name!r}: devices and FIFOs are not allowed"
                    )
        except (tarfile.TarError, OSError, EOFError) as e:
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

    def __init__(self, path: Path, name: str, where: str):
        self.path, self.name, self.where = path, name, where

    def names(self, members: Mapping[str, str]) -> list[str]:
        return [self.name]

    def open(self, name: str) -> IO[bytes]:
        return open(self.path, "rb")

    def close(self) -> None:
        pass


def _checked(name: str, where: str) -> str:
    try:
        return normalize_member(name)
    except LmforgeError as e:
        raise LmforgeError(f"{where}: refusing archive: {e}") from None


def _open_blob(path: Path, name: str, where: str, members: Mapping[str, str]) -> _Zip | _Tar | _Single:
    with open(path, "rb") as f:
        head = f.read(16)
    kind = archive_kind(head)
    if kind == "zip":
        return _Zip(path, where)
    if kind == "tar.gz":
        return _Tar(path, where)
    suffix = next((x for x in ARCHIVE_SUFFIXES if name.lower().endswith(x)), None)
    if suffix:
        # Typically a server's HTML error page delivered with status 200.
        raise LmforgeError(
            f"{where}: named like a {suffix} archive, but its bytes are not one (they start {head!r})"
        )
    if not members:
        raise LmforgeError(
            f"{where}: a plain file cannot hold three splits; give a directory with train.txt, valid.txt,"
            " test.txt or a .zip/.tar.gz archive (or map the splits to this file with corpus.members)"
        )
    return _Single(path, name or "corpus.txt", where)


# ------------------------------------------------------------------ transfers


class _Transient(Exception):
    """A failure worth retrying: connection dropped, timeout, 5xx, short body."""


class _Progress:
    """A tqdm bar in a terminal, a log line every LOG_EVERY_S seconds elsewhere (a pod's log)."""

    def __init__(self, total: int | None, label: str):
        self.total, self.label, self.done = total, label, 0
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=label, leave=False)
        self.next_log = time.monotonic() + LOG_EVERY_S

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif time.monotonic() >= self.next_log:
            self.next_log = time.monotonic() + LOG_EVERY_S
            of = f" of {self.total / 2**20:.1f} MiB ({100 * self.done / self.total:.0f}%)" if self.total else ""
            log.info("%s: %.1f MiB%s", self.label, self.done / 2**20, of)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@contextmanager
def _http_stream(url: str, timeout_s: float) -> Iterator[tuple[int | None, Iterator[bytes]]]:
    import requests
    import urllib3

    try:
        # identity: we want the file's own bytes (what the pin covers), not a
        # transfer-decoded version, and Content-Length to count those bytes.
        resp = requests.get(
            url, stream=True, timeout=(CONNECT_TIMEOUT_S, timeout_s), headers={"Accept-Encoding": "identity"}
        )
    except (requests.ConnectionError, requests.Timeout) as e:
        raise _Transient(f"cannot connect ({e})") from e
    except requests.RequestException as e:
        raise LmforgeError(f"{url}: {e}") from None
    with resp:
        if resp.status_code >= 500 or resp.status_code in (408, 429):
            raise _Transient(f"HTTP {resp.status_code} {resp.reason}")
        if resp.status_code >= 400:
            raise LmforgeError(f"{url}: HTTP {resp.status_code} {resp.reason}; check corpus.source")
        length = resp.headers.get("Content-Length", "")
        total = int(length) if length.isdigit() else None

        def chunks() -> Iterator[bytes]:
            try:
                yield from resp.raw.stream(CHUNK, decode_content=False)
            except (urllib3.exceptions.HTTPError, requests.RequestException, OSError) as e:
                log.debug("%s: %r", url, e)
                raise _Transient("connection broken") from e

        yield total, chunks()


def _s3_client() -> Any:
    import boto3

    # AWS_ENDPOINT_URL points at MinIO in a stock Kubeflow (and at moto in tests).
    return boto3.client("s3", endpoint_url=os.environ.get("AWS_ENDPOINT_URL") or None)


@contextmanager
def _s3_stream(loc: Location) -> Iterator[tuple[int | None, Iterator[bytes]]]:
    from botocore.exceptions import BotoCoreError, ClientError, ConnectionError as BotoConnectionError
    from botocore.exceptions import IncompleteReadError, ReadTimeoutError, ResponseStreamingError
    from botocore.exceptions import NoCredentialsError

    transient = (BotoConnectionError, ReadTimeoutError, IncompleteReadError, ResponseStreamingError)
    try:
        obj = _s3_client().get_object(Bucket=loc.bucket, Key=loc.key)
    except ClientError as e:
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        if status >= 500:
            raise _Transient(f"S3 {e}") from e
        code = e.response.get("Error", {}).get("Code", "error")
        raise LmforgeError(f"{loc.uri}: S3 {code}; check corpus.source and the S3 credentials") from None
    except transient as e:
        raise _Transient(f"S3 {e}") from e
    except NoCredentialsError:
        raise LmforgeError(f"{loc.uri}: no S3 credentials; set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY") from None
    except BotoCoreError as e:
        raise LmforgeError(f"{loc.uri}: {e}") from None
    body = obj["Body"]

    def chunks() -> Iterator[bytes]:
        try:
            yield from body.iter_chunks(CHUNK)
        except transient as e:
            raise _Transient(f"S3 connection broken ({e})") from e

    try:
        yield obj.get("ContentLength"), chunks()
    finally:
        body.close()


def _fetch(
    loc: Location, out: Path, *, size: int | None, retries: int, backoff_s: float, timeout_s: float
) -> tuple[str, int]:
    """Download `loc` into `out`, hashing as it streams; retry transient failures from zero.

    Returns (sha256, bytes). A body shorter or longer than its announced length
    is a transient failure (a dropped connection looks exactly like that).
    """
    last: Exception | None = None
    for attempt in range(1, retries + 1):
        try:
            with open(out, "wb") as fh:
                opener = _http_stream(loc.uri, timeout_s) if loc.kind == HTTP else _s3_stream(loc)
                with opener as (total, chunks):
                    if size is not None and total is not None and total != size:
                        # The server says up front it holds other bytes: fail before the transfer.
                        raise IntegrityError(
                            f"{loc.uri}: downloaded bytes do not match the pin: size expected {size} bytes,"
                            f" the server announces {total} (check the source, or fix corpus.size)"
                        )
                    digest, received = hashlib.sha256(), 0
                    progress = _Progress(total, loc.name or loc.uri)
                    try:
                        for chunk in chunks:
                            fh.write(chunk)
                            digest.update(chunk)
                            received += len(chunk)
                            progress.update(len(chunk))
                    except _Transient as e:
                        of = f" of {total}" if total is not None else ""
                        raise _Transient(f"{e} after {received}{of} bytes") from e
                    finally:
                        progress.close()
                    if total is not None and received != total:
                        raise _Transient(f"received {received} of {total} bytes announced (Content-Length)")
            return digest.hexdigest(), received
        except _Transient as e:
            last = e
            if attempt < retries:
                delay = backoff_s * 2 ** (attempt - 1)
                log.warning("%s: %s; retry %d of %d in %.1f s", loc.uri, e, attempt, retries - 1, delay)
                time.sleep(delay)
    raise LmforgeError(f"{loc.uri}: download failed after {retries} attempts: {last}")


def hash_file(path: Path) -> tuple[str, int]:
    """(sha256, bytes) of a file, read in CHUNK pieces."""
    digest, n = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
            n += len(chunk)
    return digest.hexdigest(), n


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
    try:
        os.replace(tmp_dir, dest)  # new or empty dest: one atomic rename
        return
    except OSError as e:
        if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
    old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
    os.replace(dest, old / "d")
    try:
        os.replace(tmp_dir, dest)
    except BaseException:
        os.replace(old / "d", dest)  # put the previous output back
        shutil.rmtree(old, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _write_split(container: Any, name: str, out: Path, where: str) -> dict[str, Any]:
    stats = TextStats()
    try:
        with container.open(name) as src, open(out, "wb") as dst:
            while chunk := src.read(CHUNK):
                stats.update(chunk)
                dst.write(chunk)
        return stats.finish()
    except NotUtf8 as e:
        raise LmforgeError(
            f"{name} in {where}: not UTF-8 at byte offset {e.offset} ({e.reason}); convert it to UTF-8"
        ) from None
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error, RuntimeError) as e:
        # BadZipFile covers a CRC mismatch; EOFError/zlib errors a truncated gzip.
        raise LmforgeError(f"{name} in {where}: cannot read it from the archive ({e})") from None
    except OSError as e:
        if isinstance(e, (FileNotFoundError, PermissionError)):
            raise LmforgeError(f"{name} in {where}: {e.strerror}") from None
        raise LmforgeError(f"{name} in {where}: cannot read it ({e})") from None


# ------------------------------------------------------------------ the step


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
) -> dict:
    """Fetch `source`, verify it, and publish its three splits plus manifest.json at `dest_dir`.

    Returns the manifest. Raises IntegrityError when the downloaded bytes do not
    match `sha256`/`size`, LmforgeError for every other user-fixable problem; in
    every failure case nothing is left at `dest_dir` and no temporary file stays
    behind. `retries`, `backoff_s` and `timeout_s` tune remote transfers.
    """
    source = str(source)
    members = dict(members or {})
    dest = Path(dest_dir).expanduser()
    cache = Path(cache_dir).expanduser() if cache_dir is not None else None

    # Cheap checks first, before any transfer.
    if sha256 is not None:
        sha256 = sha256.strip().lower()
        if not _SHA256_RE.match(sha256):
            raise LmforgeError(f"corpus.sha256: {sha256!r} is not 64 hex digits")
    if size is not None and size < 0:
        raise LmforgeError(f"corpus.size: {size} must not be negative")
    for split, member in members.items():
        if split not in SPLITS:
            raise LmforgeError(f"corpus.members.{split}: unknown split (use {', '.join(SPLITS)})")
        try:
            normalize_member(member)
        except LmforgeError as e:
            raise LmforgeError(f"corpus.members.{split}: {e}") from None
    loc = parse_location(source)
    if loc.kind == LOCAL:
        assert loc.path is not None
        if not loc.path.exists():
            raise LmforgeError(f"corpus not found: {loc.path}; pass --corpus DIR or set corpus.source")
        if loc.path.is_dir() and (sha256 is not None or size is not None):
            raise LmforgeError(
                f"{source}: corpus.sha256/corpus.size pin a downloaded file,"
                " and a directory is not one; remove them"
            )
    _check_dest(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)

    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    download: Path | None = None  # our temporary download, removed unless moved to the cache
    container: Any = None
    try:
        if loc.kind == LOCAL and loc.path.is_dir():  # type: ignore[union-attr]
            container = _Dir(loc.path, source)  # type: ignore[arg-type]
            blob_sha = blob_size = None
        else:
            blob = _cached(cache, sha256, size) if loc.is_remote else None
            if blob is not None:
                log.info("%s: using cached %s", source, blob)
                blob_sha, blob_size = sha256, blob.stat().st_size
            elif loc.kind == LOCAL:
                blob = loc.path
                assert blob is not None
                blob_sha, blob_size = hash_file(blob)
                check_pins(source, sha256, size, blob_sha, blob_size)
            else:
                fd, name = tempfile.mkstemp(prefix=f".{dest.name}.download-", dir=dest.parent)
                os.close(fd)
                download = Path(name)
                log.info("downloading %s", source)
                blob_sha, blob_size = _fetch(
                    loc, download, size=size, retries=retries, backoff_s=backoff_s, timeout_s=timeout_s
                )
                check_pins(source, sha256, size, blob_sha, blob_size)
                if sha256 is None:
                    # Unpinned remote bytes: print what to pin so the next run is checked.
                    log.info(
                        "%s: sha256 %s, %d bytes; pin them (corpus.sha256, corpus.size)", source, blob_sha, blob_size
                    )
                if cache is not None:
                    cached = cache / "sha256" / blob_sha
                    _place(download, cached)
                    download = None
                    blob = cached
                else:
                    blob = download
            container = _open_blob(blob, loc.name, source, members)

        chosen = find_split_members(container.names(members), members, source)
        splits = {}
        for split in SPLITS:
            log.info("%s: %s <- %s", source, split, chosen[split])
            splits[split] = _write_split(container, chosen[split], tmp_dir / f"{split}.txt", source)
            if splits[split]["bytes"] == 0:
                log.warning("%s: the %s split (%s) is empty", source, split, chosen[split])
        if blob_sha is None:
            blob_sha = combined_digest(splits[s]["sha256"] for s in SPLITS)
            blob_size = sum(splits[s]["bytes"] for s in SPLITS)
        manifest = {"source": source, "sha256": blob_sha, "bytes": blob_size, "splits": splits}
        (tmp_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        if container is not None:
            container.close()
            container = None
        _publish(tmp_dir, dest)
    finally:
        if container is not None:
            container.close()
        if download is not None:
            download.unlink(missing_ok=True)
        if tmp_dir.exists():
            shutil.rmtree(tmp_dir, ignore_errors=True)
    log.info(
        "%s -> %s: %s",
        source,
        dest,
        ", ".join(f"{s} {splits[s]['lines']} lines {splits[s]['tokens']} tokens" for s in SPLITS),
    )
    return manifest
