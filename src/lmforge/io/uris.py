"""Parse the locations lmforge steps take and return: paths and URIs.

In:  a location string: a local path (relative, absolute or `~/...`), `file://`,
     `http://`/`https://` or `s3://bucket/key`. Out: a `Location` saying which
     kind it is and its parts. No I/O happens here, so every step (and its
     tests) can classify a location before touching the network or the disk.

Used by every step; `lmforge download --source URI --out DIR` is the first.
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit

from lmforge.errors import LmforgeError

LOCAL, HTTP, S3 = "local", "http", "s3"

# Query parameters that carry credentials: presigned S3/GCS URLs, SAS tokens,
# OAuth tokens. Their values never reach a log line, an error or a manifest.
_SECRET_PARAM = re.compile(
    r"^(x-amz-(signature|credential|security-token)|x-goog-(signature|credential)|sig|signature"
    r"|token|access_token|api_key|apikey|key)$",
    re.IGNORECASE,
)


def redact(uri: str) -> str:
    """`uri` safe to print: a password in `user:pass@host` and secret query values become `***`.

    Anything that is not an http(s) URL is returned unchanged (paths, s3:// URIs
    hold no secrets).
    """
    parts = urlsplit(uri)
    if parts.scheme.lower() not in ("http", "https"):
        return uri
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, host = netloc.rpartition("@")
        user = userinfo.split(":", 1)[0]
        netloc = f"{user}:***@{host}" if ":" in userinfo else f"{user}@{host}"
    query = "&".join(
        f"{k}=***" if _SECRET_PARAM.match(unquote(k)) and sep else f"{k}{sep}{v}"
        for k, sep, v in (item.partition("=") for item in parts.query.split("&") if item)
    ) if parts.query else ""
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


@dataclass(frozen=True)
class Location:
    """A parsed location; `uri` is the string exactly as the user gave it."""

    kind: str  # LOCAL, HTTP or S3
    uri: str
    path: Path | None = None  # LOCAL only
    bucket: str = ""  # S3 only
    key: str = ""  # S3 only

    @property
    def is_remote(self) -> bool:
        return self.kind != LOCAL

    @property
    def display(self) -> str:
        """The URI as messages show it: credentials redacted (see `redact`)."""
        return redact(self.uri) if self.kind == HTTP else self.uri

    @property
    def name(self) -> str:
        """The last path component (e.g. `wikitext-2-v1.zip`), without any query string."""
        if self.kind == LOCAL:
            assert self.path is not None
            return self.path.name
        if self.kind == S3:
            return posixpath.basename(self.key)
        return posixpath.basename(unquote(urlsplit(self.uri).path))


def parse_location(uri: str | Path) -> Location:
    """Classify `uri`; raise LmforgeError (one line) for an empty or unsupported one."""
    text = str(uri).strip()
    if not text:
        raise LmforgeError("empty location: give a local path, file://, http(s):// or s3:// URI")
    if isinstance(uri, Path) or "://" not in text:
        return Location(LOCAL, text, path=Path(text).expanduser())
    parts = urlsplit(text)
    scheme = parts.scheme.lower()
    if scheme == "file":
        # file:///abs/path or file://localhost/abs/path; another host would be a
        # network share we cannot reach by path.
        if parts.netloc not in ("", "localhost"):
            raise LmforgeError(
                f"{text}: file:// URIs must name a local path (file:///path), not host {parts.netloc!r}"
            )
        return Location(LOCAL, text, path=Path(unquote(parts.path)))
    if scheme in ("http", "https"):
        if not parts.netloc:
            raise LmforgeError(f"{text}: URL has no host")
        return Location(HTTP, text)
    if scheme == "s3":
        # Split by hand: S3 keys may hold '?' or '#', which urlsplit would cut off.
        bucket, _, key = text[len("s3://") :].partition("/")
        if not bucket or not key:
            raise LmforgeError(f"{text}: an S3 location is s3://bucket/key")
        return Location(S3, text, bucket=bucket, key=key)
    raise LmforgeError(f"{text}: unsupported scheme {scheme!r}; use a local path, file://, http(s):// or s3://")
