"""Download one remote file over a bad network: HTTP(S) and S3, resumed, retried, checked against pins.

In:  an `http(s)://` or `s3://bucket/key` location, a local file name to write,
     optional pins (sha256, size) and retry settings. Out: the file's bytes at
     that name and their (sha256, size). Raises Unreachable when transient
     failures outlast the retries, IntegrityError for bytes other than the
     pinned ones, LmforgeError for a final answer (404, 403, no credentials).

    lmforge download --source https://example.org/corpus.tar.gz --out data/corpus

(the download stage, lmforge.data.download, is the caller.)

HTTP(S) is streamed and, after a dropped connection, resumed with a `Range`
request (If-Range guards against a file that changed meanwhile; a server that
ignores Range is restarted from byte 0). Connection errors, timeouts, 5xx, 408
and 429 are retried with exponential backoff and jitter, honouring a capped
Retry-After. S3 goes through lmforge.io.s3's client (endpoint from
`endpoint_url` or AWS_ENDPOINT_URL, botocore's adaptive retry mode) and resumes
a broken body with a ranged, If-Match GET.
"""

from __future__ import annotations

import email.utils
import hashlib
import logging
import os
import random
import re
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from lmforge.errors import IntegrityError, LmforgeError
from lmforge.io import s3
from lmforge.io.s3 import CONNECT_TIMEOUT_S, READ_TIMEOUT_S
from lmforge.io.uris import HTTP, S3, Location, parse_location
from lmforge.io.writes import writing
from lmforge.logs import Progress

log = logging.getLogger(__name__)

# 1 MiB reads: large enough that per-chunk Python overhead is negligible
# (~200 chunks for WikiText-103's 190 MB zip), small enough to keep memory flat.
CHUNK = 1 << 20
# Attempts per download without progress (the first plus 3 retries) and the
# first backoff delay, doubled after each failure (with jitter): about 2 + 4 + 8 s
# rides out a proxy restart or a short 5xx burst without hiding a real outage.
# One attempt is always made, whatever `retries` says.
RETRIES = 4
BACKOFF_S = 2.0
# Longest single wait, exponential or a server's Retry-After: a server asking for
# an hour is not worth a pipeline step idling that long.
MAX_BACKOFF_S = 60.0
# An attempt that brought new bytes before failing does not use up a retry (it is
# resumed where it stopped), but at most this many such resumes happen in all, so
# a link that drops every few kilobytes still ends.
MAX_RESUMES = 20
# Without a terminal (a pod's log), report download progress this often.
LOG_EVERY_S = 10.0


class Unreachable(LmforgeError):
    """A remote source still failing with transient errors (connection, timeout, 5xx, 429) after every retry."""


# ------------------------------------------------------------------ pure helpers


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


# ------------------------------------------------------------------ sources
# A source opens the file at a byte offset and yields a _Response; it raises
# _Transient for what another attempt may cure, _Restart when only starting
# over from byte 0 can, LmforgeError (or Unreachable) for a final answer.


class _Transient(Exception):
    """A failure worth retrying: connection dropped, timeout, 5xx/408/429, short body."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class _Restart(_Transient):
    """The server cannot continue a partial download (a wrong range, a changed file): start from byte 0."""


@dataclass
class _Response:
    start: int  # offset in the file of the first byte `chunks` yields
    total: int | None  # the whole file's size, when the server says
    validator: str | None  # what a resumed request sends to make sure the file is the same
    chunks: Iterator[bytes]


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


def _source(loc: Location, retries: int, timeout_s: float, endpoint_url: str | None) -> _HttpSource | _S3Source:
    if loc.kind == HTTP:
        return _HttpSource(loc, timeout_s)
    if loc.kind == S3:
        return _S3Source(loc, timeout_s, retries, endpoint_url)
    raise LmforgeError(f"{loc.display}: only http(s):// and s3:// locations are downloaded")


# ------------------------------------------------------------------ the transfer


def fetch(
    source: str | Location,
    out: str | Path,
    *,
    sha256: str | None = None,
    size: int | None = None,
    where: str | None = None,
    retries: int = RETRIES,
    backoff_s: float = BACKOFF_S,
    max_backoff_s: float = MAX_BACKOFF_S,
    timeout_s: float = READ_TIMEOUT_S,
    endpoint_url: str | None = None,
) -> tuple[str, int]:
    """Download one http(s):// or s3:// file to `out`: temporary name, resumed transfer, pins checked, rename.

    Returns (sha256, bytes). On any failure `out` is untouched and no
    temporary file remains; a disk that fills up (or a read-only `out`) is a one-line
    WriteError naming `out` (lmforge.io.writes). `where` names the source in messages (default:
    its redacted URI).
    """
    loc = source if isinstance(source, Location) else parse_location(source)
    where = where or loc.display
    out = Path(out)
    with writing(out, needed=size):
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{out.name}.download-", dir=out.parent)
        os.close(fd)
        tmp = Path(name)
        try:
            digest, n = _stream(
                _source(loc, retries, timeout_s, endpoint_url), loc, tmp, size=size, where=where,
                retries=retries, backoff_s=backoff_s, max_backoff_s=max_backoff_s,
            )
            check_pins(where, sha256, size, digest, n)
            os.replace(tmp, out)
        finally:
            tmp.unlink(missing_ok=True)
    return digest, n


def _stream(
    source: _HttpSource | _S3Source,
    loc: Location,
    out: Path,
    *,
    size: int | None,
    where: str,
    retries: int,
    backoff_s: float,
    max_backoff_s: float,
) -> tuple[str, int]:
    """Download from `source` into `out`, hashing as it streams; resume after a broken transfer.

    Returns (sha256, bytes). A body shorter than its announced length is a
    transient failure (a dropped connection looks exactly like that) and the next
    attempt asks only for the missing bytes. `retries` bounds the consecutive
    attempts that bring no new byte; an attempt that brought some is resumed, up
    to MAX_RESUMES times. Raises Unreachable when the attempts run out,
    IntegrityError when the server announces another size than the pin,
    LmforgeError for a final answer (404, 403, ...).
    """
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
                                    f"{where}: downloaded bytes do not match the pin:"
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
