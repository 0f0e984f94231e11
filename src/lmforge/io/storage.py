"""Read and write run data wherever `storage.root` points: a local path, file:// or s3://bucket/key.

In:  locations (parsed by lmforge.io.uris) and local files. Out: byte ranges,
     verified copies, listings. Every step that moves data between pods goes
     through here, so the embedded run (local disk) and the cluster (S3, MinIO in
     a stock Kubeflow) share one code path. `put_text` writes a small text file
     (a config, a manifest, metrics) the same way.

Writes are atomic and verified (a full disk, a quota or a read-only destination is one line
naming it: lmforge.io.writes):
- local: copy to a temporary name in the destination directory, fsync, rename;
- S3: a PUT is all-or-nothing for readers, so the object is uploaded under its
  final key with its sha256 in the object metadata, then a HEAD checks size and
  digest before the write counts as done. A reader (`get_file`) checks the same
  two against the bytes it received.

The S3 endpoint comes from the `endpoint_url` argument, else AWS_ENDPOINT_URL
(`use_endpoint` sets it from the config once per step).

    lmforge run --config pipelines/configs/tiny.yaml --set storage.root=s3://bucket/lmforge
"""

from __future__ import annotations

import functools
import hashlib
import os
import posixpath
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lmforge.io import s3
from lmforge.io.hashing import hash_file
from lmforge.errors import IntegrityError, LmforgeError
from lmforge.io.uris import S3, Location, parse_location
from lmforge.io.writes import writing

SHA256_METADATA = "lmforge-sha256"  # stored as x-amz-meta-lmforge-sha256
CHUNK = 8 << 20
_READ_ATTEMPTS = 4  # a ranged read resumes where a dropped stream stopped, this many times


def use_endpoint(endpoint_url: str) -> None:
    """Make a configured S3 endpoint (storage.s3_endpoint) the default for this process and its children."""
    if endpoint_url:
        os.environ["AWS_ENDPOINT_URL"] = endpoint_url


def is_remote(uri: str | Path) -> bool:
    return _parse(uri).kind == S3


def join(base: str | Path, *parts: str) -> str:
    """`base` with `parts` appended: a path join locally, a key join on S3 (always '/')."""
    loc = _parse(base)
    if loc.kind == S3:
        return "s3://" + posixpath.join(loc.bucket, loc.key, *parts)
    assert loc.path is not None
    return str(loc.path.joinpath(*parts))


def local_path(uri: str | Path) -> Path | None:
    """The filesystem path of a local location, None for a remote one."""
    loc = _parse(uri)
    return loc.path if loc.kind != S3 else None


# ------------------------------------------------------------------ reading


def size(uri: str | Path, *, endpoint_url: str | None = None) -> int:
    loc = _parse(uri)
    if loc.kind != S3:
        return _existing(loc).stat().st_size
    return int(_head(loc, endpoint_url)["ContentLength"])


def exists(uri: str | Path, *, endpoint_url: str | None = None) -> bool:
    loc = _parse(uri)
    if loc.kind != S3:
        assert loc.path is not None
        return loc.path.exists()
    try:
        _head(loc, endpoint_url)
    except LmforgeError:
        return False
    return True


def read_range(uri: str | Path, start: int, end: int, *, endpoint_url: str | None = None) -> bytes:
    """Bytes [start, end) of `uri` (fewer if the object is shorter): a seek locally, one ranged GET on S3."""
    return b"".join(iter_range(uri, start, end, chunk_size=max(1, end - start), endpoint_url=endpoint_url))


def iter_range(
    uri: str | Path, start: int, end: int, *, chunk_size: int = CHUNK, endpoint_url: str | None = None
) -> Iterator[bytes]:
    """Stream bytes [start, end) of `uri` in chunks of at most `chunk_size`.

    On S3 this is one ranged GET streamed as it arrives; a connection that
    drops mid-stream is picked up with a new ranged GET from the next byte, so a
    shard task never reads more than its own range.
    """
    if start < 0 or end < start:
        raise ValueError(f"bad byte range [{start}, {end})")
    if end == start:
        return
    loc = _parse(uri)
    if loc.kind != S3:
        with open(_existing(loc), "rb") as f:
            f.seek(start)
            remaining = end - start
            while remaining > 0:
                chunk = f.read(min(chunk_size, remaining))
                if not chunk:
                    return
                remaining -= len(chunk)
                yield chunk
        return
    yield from _s3_range(loc, start, end, chunk_size, endpoint_url)


def _s3_range(loc: Location, start: int, end: int, chunk_size: int, endpoint_url: str | None) -> Iterator[bytes]:
    client = s3_client(endpoint_url)
    position, failures = start, 0
    while position < end:
        try:
            response = client.get_object(Bucket=loc.bucket, Key=loc.key, Range=f"bytes={position}-{end - 1}")
        except Exception as exc:
            if _status(exc) == 416:  # the range starts at or past the end of the object
                return
            raise _s3_error(loc, "read", exc) from None
        try:
            for chunk in response["Body"].iter_chunks(chunk_size):
                position += len(chunk)
                yield chunk
            return
        except s3.transient_errors() as exc:
            failures += 1
            if failures >= _READ_ATTEMPTS:
                raise LmforgeError(f"reading {loc.uri} failed at byte {position} after {failures} attempts: {exc}") from None


def read_text(uri: str | Path, *, endpoint_url: str | None = None) -> str:
    """A small text file (a manifest, a summary) read whole."""
    return read_range(uri, 0, size(uri, endpoint_url=endpoint_url), endpoint_url=endpoint_url).decode("utf-8")


def get_file(uri: str | Path, dest: str | Path, *, endpoint_url: str | None = None) -> dict[str, Any]:
    """Copy `uri` to the local file `dest` atomically; verify size (and sha256 where it was recorded)."""
    loc, dest = _parse(uri), Path(dest)
    expected_size, expected_sha = None, None
    if loc.kind == S3:
        head = _head(loc, endpoint_url)
        expected_size = int(head["ContentLength"])
        expected_sha = head.get("Metadata", {}).get(SHA256_METADATA)
    else:
        expected_size = _existing(loc).stat().st_size
    with writing(dest, needed=expected_size):
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
        digest, written = hashlib.sha256(), 0
        try:
            with os.fdopen(fd, "wb") as out:
                for chunk in iter_range(uri, 0, expected_size, endpoint_url=endpoint_url):
                    out.write(chunk)
                    digest.update(chunk)
                    written += len(chunk)
                out.flush()
                os.fsync(out.fileno())
            _verify(loc.uri, expected_size, expected_sha, written, digest.hexdigest())
            os.replace(tmp, dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return {"size": written, "sha256": digest.hexdigest()}


def list_files(uri: str | Path, *, endpoint_url: str | None = None) -> list[str]:
    """Names (relative, '/'-separated, sorted) of the files under the directory or prefix `uri`."""
    loc = _parse(uri)
    if loc.kind != S3:
        assert loc.path is not None
        if not loc.path.is_dir():
            return []
        return sorted(p.relative_to(loc.path).as_posix() for p in loc.path.rglob("*") if p.is_file())
    prefix = loc.key.rstrip("/") + "/"
    names = []
    try:
        for page in s3_client(endpoint_url).get_paginator("list_objects_v2").paginate(Bucket=loc.bucket, Prefix=prefix):
            names.extend(item["Key"][len(prefix):] for item in page.get("Contents", []))
    except Exception as exc:
        raise _s3_error(loc, "list", exc) from None
    return sorted(names)


def get_dir(uri: str | Path, dest: str | Path, *, endpoint_url: str | None = None) -> list[str]:
    """Copy every file under `uri` into `dest` (each atomically and verified); returns their names."""
    names = list_files(uri, endpoint_url=endpoint_url)
    if not names:
        raise LmforgeError(f"{uri} holds no files; check the location (a finished upstream step writes it)")
    for name in names:
        get_file(join(uri, *name.split("/")), Path(dest).joinpath(*name.split("/")), endpoint_url=endpoint_url)
    return names


# ------------------------------------------------------------------ writing


def put_file(src: str | Path, uri: str | Path, *, endpoint_url: str | None = None) -> dict[str, Any]:
    """Copy the local file `src` to `uri` atomically and verify the copy; returns its size and sha256."""
    src, loc = Path(src), _parse(uri)
    sha, nbytes = hash_file(src)
    if loc.kind != S3:
        assert loc.path is not None
        if loc.path.resolve() == src.resolve():
            return {"size": nbytes, "sha256": sha}
        with writing(loc.path, needed=nbytes):
            loc.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{loc.path.name}.", suffix=".part", dir=loc.path.parent)
            os.close(fd)
            try:
                shutil.copyfile(src, tmp)
                with open(tmp, "rb+") as f:
                    os.fsync(f.fileno())
                copied_sha, copied_size = hash_file(Path(tmp))
                _verify(loc.uri, nbytes, sha, copied_size, copied_sha)
                os.replace(tmp, loc.path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        return {"size": nbytes, "sha256": sha}
    client = s3_client(endpoint_url)
    try:
        client.upload_file(str(src), loc.bucket, loc.key, ExtraArgs={"Metadata": {SHA256_METADATA: sha}})
    except Exception as exc:
        raise _s3_error(loc, "write", exc) from None
    head = _head(loc, endpoint_url)
    _verify(loc.uri, nbytes, sha, int(head["ContentLength"]), head.get("Metadata", {}).get(SHA256_METADATA))
    return {"size": nbytes, "sha256": sha}


def put_dir(src: str | Path, uri: str | Path, *, last: str | None = None, endpoint_url: str | None = None) -> list[str]:
    """Copy every file under the local directory `src` to `uri`; returns their names.

    `last` (a name relative to `src`) is copied after all the others, so that its
    presence tells a reader the rest is there (a manifest, a summary).
    """
    src = Path(src)
    names = sorted(p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file())
    for name in sorted(names, key=lambda n: n == last):
        put_file(src / name, join(uri, *name.split("/")), endpoint_url=endpoint_url)
    return names


def put_text(text: str, uri: str | Path, *, endpoint_url: str | None = None) -> dict[str, Any]:
    """Write `text` (UTF-8) to the file `uri`: a temporary file, then `put_file` (locally an atomic write)."""
    with tempfile.TemporaryDirectory(prefix="lmforge-text-") as tmp:
        local = Path(tmp) / "text"
        with writing(uri, where=tmp):
            local.write_text(text, encoding="utf-8")
        return put_file(local, uri, endpoint_url=endpoint_url)


def delete(uri: str | Path, *, endpoint_url: str | None = None) -> None:
    """Remove a file or object; a missing one is not an error."""
    loc = _parse(uri)
    if loc.kind != S3:
        assert loc.path is not None
        loc.path.unlink(missing_ok=True)
        return
    try:
        s3_client(endpoint_url).delete_object(Bucket=loc.bucket, Key=loc.key)
    except Exception as exc:
        raise _s3_error(loc, "delete", exc) from None


# ------------------------------------------------------------------ helpers


@functools.lru_cache(maxsize=8)
def _client(endpoint_url: str | None) -> Any:
    return s3.make_client(endpoint_url)


def s3_client(endpoint_url: str | None = None) -> Any:
    """One boto3 client per endpoint per process (adaptive retries; see lmforge.io.s3.make_client)."""
    return _client(endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None)


def _parse(uri: str | Path) -> Location:
    loc = parse_location(uri)
    if loc.kind not in (S3, "local"):
        raise LmforgeError(f"{loc.display}: storage locations are local paths, file:// or s3://bucket/key")
    return loc


def _existing(loc: Location) -> Path:
    assert loc.path is not None
    if not loc.path.is_file():
        raise LmforgeError(f"{loc.uri} does not exist or is not a file")
    return loc.path


def _head(loc: Location, endpoint_url: str | None) -> dict[str, Any]:
    try:
        return s3_client(endpoint_url).head_object(Bucket=loc.bucket, Key=loc.key)
    except Exception as exc:
        raise _s3_error(loc, "find", exc) from None


def _status(exc: Exception) -> int | None:
    response = getattr(exc, "response", None) or {}
    return response.get("ResponseMetadata", {}).get("HTTPStatusCode")


def _s3_error(loc: Location, action: str, exc: Exception) -> LmforgeError:
    status = _status(exc)
    if status == 404:
        return LmforgeError(f"{loc.uri} does not exist (S3 said 404); check the bucket and key")
    if status == 403:
        return LmforgeError(f"cannot {action} {loc.uri}: access denied; check the S3 credentials (AWS_ACCESS_KEY_ID)")
    return LmforgeError(f"cannot {action} {loc.uri}: {exc}")


def _verify(uri: str, expected_size: int, expected_sha: str | None, actual_size: int, actual_sha: str | None) -> None:
    if actual_size != expected_size:
        raise IntegrityError(f"{uri}: copied {actual_size} bytes, expected {expected_size}; the copy was discarded")
    if expected_sha and actual_sha and actual_sha != expected_sha:
        raise IntegrityError(f"{uri}: sha256 {actual_sha} does not match {expected_sha}; the copy was discarded")
