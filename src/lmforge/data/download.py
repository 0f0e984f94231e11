"""The download stage: fetch a corpus and lay it out as the three splits the rest of the pipeline reads.

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

The steps, and where each one's mechanism lives:
1. resolve the source: a catalog name brings its pins, members and locations
   (tried in order); anything else is a location (lmforge.io.uris);
2. obtain the bytes: a local file is hashed in place; remote bytes come from the
   cache (lmforge.io.cache) when their pin is there, else are downloaded with
   resume and retries (lmforge.io.transfer), then checked against the pins;
3. unpack: the archive is inspected before a byte is written and each split is
   copied out, UTF-8 checked and counted (lmforge.data.archives,
   lmforge.data.text_stats);
4. publish: the finished folder replaces DEST in one rename
   (lmforge.io.staging.replace_dir); the verified download goes into the cache.

Manifest: {"source", "sha256", "bytes", "splits": {split: {"sha256", "bytes",
"lines", "tokens"}}}. "sha256"/"bytes" describe the downloaded file (archive or
text); for a directory source, where nothing is downloaded, "sha256" is the sha256
of the three split hex digests concatenated in split order (train, valid, test)
and "bytes" the sum of the split sizes. "lines" and "tokens" count as fairseq
reads the text: Python text-mode lines, whitespace tokens plus one end-of-sentence
per line. For a catalog corpus "source" is its name, whichever location served it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge.config import SPLITS
from lmforge.data import catalog as catalog_mod
from lmforge.data.archives import (
    MAX_BYTES, MAX_MEMBERS, Container, Directory, Limits, extract, find_split_members, normalize_member, open_file,
    preview,
)
from lmforge.errors import IntegrityError, LmforgeError
from lmforge.io import cache as cache_mod
from lmforge.io.hashing import hash_file
from lmforge.io.s3 import READ_TIMEOUT_S
from lmforge.io.staging import replace_dir
from lmforge.io.transfer import BACKOFF_S, MAX_BACKOFF_S, RETRIES, Unreachable, check_pins, fetch
from lmforge.io.uris import LOCAL, Location, parse_location
from lmforge.io.writes import WriteError, writing

__all__ = ["download_corpus", "combined_digest", "Unreachable"]

log = logging.getLogger(__name__)

OUTPUT_NAMES = frozenset([*(f"{s}.txt" for s in SPLITS), "manifest.json"])
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class _Request:
    """A source resolved before any transfer: where to look, which bytes, which members."""

    shown: str  # what the manifest and messages call the source (a catalog name, or the redacted location)
    locations: list[Location]  # tried in order
    sha256: str | None
    size: int | None
    members: dict[str, str]
    named: bool  # a catalog corpus: each failing location is logged and the next one tried
    directory: Path | None  # a local directory source: read in place, nothing downloaded


@dataclass
class _Blob:
    """The downloaded (or local, or cached) file a corpus is unpacked from."""

    path: Path
    name: str  # the file name its location gives (decides .gz member names, error wording)
    sha256: str
    size: int
    temporary: bool  # ours to move into the cache or delete
    where: str  # the location it came from, as messages show it


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
    WriteError when DEST's disk fills up (or refuses the write), LmforgeError for every
    other user-fixable problem; in every failure case
    nothing is left at `dest_dir` and no temporary file stays behind.
    """
    request = _resolve(source, sha256=sha256, size=size, members=members, locations=locations, catalog=catalog)
    limits = Limits(max_bytes=max_bytes, max_members=max_members)
    transfer = {
        "retries": retries, "backoff_s": backoff_s, "max_backoff_s": max_backoff_s,
        "timeout_s": timeout_s, "endpoint_url": endpoint_url,
    }
    cache = Path(cache_dir).expanduser() if cache_dir is not None else None
    dest = Path(dest_dir).expanduser()
    _check_dest(dest)
    with writing(dest):  # a full disk or a read-only DEST: one line naming it, after the cleanup below
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp_dir = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
        try:
            blob = None if request.directory is not None else _obtain(request, tmp_dir, cache, transfer)
            with _open(request, blob, limits) as container:
                splits = _extract_splits(container, request.members, tmp_dir)
            manifest = {"source": request.shown, **_identity(blob, splits), "splits": splits}
            (tmp_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
            if blob is not None and blob.temporary:
                _set_aside(blob, cache)
            _publish(tmp_dir, dest)
        finally:
            shutil.rmtree(tmp_dir, ignore_errors=True)
    log.info(
        "%s -> %s: %s",
        request.shown,
        dest,
        ", ".join(f"{s} {splits[s]['lines']} lines {splits[s]['tokens']} tokens" for s in SPLITS),
    )
    return manifest


def combined_digest(split_digests: Iterable[str]) -> str:
    """sha256 of the split hex digests concatenated in split order (a directory source's identity)."""
    return hashlib.sha256("".join(split_digests).encode("ascii")).hexdigest()


# ------------------------------------------------------------------ 1. resolve


def _resolve(
    source: str | Path,
    *,
    sha256: str | None,
    size: int | None,
    members: Mapping[str, str] | None,
    locations: Sequence[str] | None,
    catalog: Mapping[str, catalog_mod.CatalogEntry] | None,
) -> _Request:
    """What `source` names, with its pins and members; raises LmforgeError for what can be refused before a transfer.

    The download step's pins and member splits were checked by config validation;
    `lmforge download` passes --sha256 and --size as typed, hence the pin check here.
    """
    if sha256 is not None:
        sha256 = sha256.strip().lower()
        if not _SHA256_RE.match(sha256):
            raise LmforgeError(f"corpus.sha256: {sha256!r} is not 64 hex digits")
    if size is not None and size < 0:
        raise LmforgeError(f"corpus.size: {size} must not be negative")
    members = dict(members or {})
    for split, member in members.items():  # an unsafe name is refused before the transfer, not after it
        try:
            normalize_member(member)
        except LmforgeError as e:
            raise LmforgeError(f"corpus.members.{split}: {e}") from None
    entry = None if isinstance(source, Path) else catalog_mod.lookup(source.strip(), catalog)
    if entry is not None:
        return _catalog_request(entry, sha256, size, members, locations)
    return _location_request(source, sha256, size, members, locations, catalog)


def _catalog_request(
    entry: catalog_mod.CatalogEntry, sha256: str | None, size: int | None, members: dict[str, str],
    locations: Sequence[str] | None,
) -> _Request:
    problems = catalog_mod.check_entry(entry)  # a catalog passed in by a library caller
    if problems:
        raise LmforgeError(f"catalog: {'; '.join(problems)}")
    if sha256 is not None and sha256 != entry.sha256:
        raise LmforgeError(
            f"corpus.sha256: {entry.name} is pinned by the catalog to {entry.sha256}, not {sha256}; remove corpus.sha256"
        )
    if size is not None and size != entry.size:
        raise LmforgeError(
            f"corpus.size: {entry.name} is pinned by the catalog to {entry.size} bytes, not {size}; remove corpus.size"
        )
    if Path(entry.name).exists():
        log.warning("%s: using the catalog corpus; for the local path of that name pass ./%s", entry.name, entry.name)
    return _Request(
        shown=entry.name,
        locations=[parse_location(u) for u in (locations or entry.locations)],
        sha256=entry.sha256,
        size=entry.size,
        members={**entry.members, **members},
        named=True,
        directory=None,
    )


def _location_request(
    source: str | Path, sha256: str | None, size: int | None, members: dict[str, str],
    locations: Sequence[str] | None, catalog: Mapping[str, catalog_mod.CatalogEntry] | None,
) -> _Request:
    first = source if isinstance(source, Path) else source.strip()  # a Path is always a local path, whatever its text
    locs = [parse_location(u) for u in [first, *(locations or [])]]
    directory = None
    if len(locs) == 1 and locs[0].kind == LOCAL:
        path = locs[0].path
        assert path is not None
        if not path.exists():
            hint = catalog_mod.suggest(str(first), catalog)
            also = f", or the catalog corpus {hint!r}" if hint else ""
            raise LmforgeError(f"corpus not found: {path}; pass --corpus DIR or set corpus.source{also}")
        if path.is_dir():
            if sha256 is not None or size is not None:
                raise LmforgeError(
                    f"{first}: corpus.sha256/corpus.size pin a downloaded file, and a directory is not one; remove them"
                )
            directory = path
    return _Request(locs[0].display, locs, sha256, size, members, named=False, directory=directory)


# ------------------------------------------------------------------ 2. obtain


def _obtain(request: _Request, scratch: Path, cache: Path | None, transfer: dict[str, Any]) -> _Blob:
    """The file to unpack: cached for its pin, else from the first location that serves the pinned bytes.

    A lone location of a plain source raises its own error. Otherwise (a
    catalog name, or mirrors) each failure is logged and the next location
    tried; when all fail, an IntegrityError if some location served other bytes
    (a mirror out of date, a captive portal), else one line saying none could be
    reached.
    """
    locs, name = request.locations, request.shown
    cached = cache_mod.find(cache, request.sha256, request.size) if any(loc.is_remote for loc in locs) else None
    if cached is not None:
        log.info("%s: using cached %s", name, cached)
        assert request.sha256 is not None  # the cache only finds pinned files
        return _Blob(cached, locs[0].name, request.sha256, cached.stat().st_size, False, name)
    if len(locs) == 1 and not request.named:
        return _obtain_one(locs[0], name, request, scratch, transfer)
    integrity: list[str] = []
    for i, loc in enumerate(locs):
        try:
            return _obtain_one(loc, f"{name} ({loc.display})", request, scratch, transfer)
        except IntegrityError as e:
            integrity.append(str(e))
            err: Exception = e
        except WriteError:
            raise  # our disk, not the location: the next one would fill it just the same
        except LmforgeError as e:
            err = e
        nxt = f"; trying {locs[i + 1].display}" if i + 1 < len(locs) else ""
        log.warning("%s: location %d of %d failed: %s%s", name, i + 1, len(locs), err, nxt)
    if integrity:
        raise IntegrityError(
            integrity[0] + (f" (and {len(integrity) - 1} other location(s) likewise)" if len(integrity) > 1 else "")
        )
    raise Unreachable(catalog_mod.unreachable_message(name, [loc.display for loc in locs]))


def _obtain_one(loc: Location, where: str, request: _Request, scratch: Path, transfer: dict[str, Any]) -> _Blob:
    """The bytes at `loc`, checked against the pins: a local file is hashed in place, a remote one downloaded."""
    if loc.kind == LOCAL:
        assert loc.path is not None
        if not loc.path.is_file():
            raise LmforgeError(f"corpus not found: {loc.path}")
        digest, n = hash_file(loc.path)
        check_pins(where, request.sha256, request.size, digest, n)
        return _Blob(loc.path, loc.name, digest, n, False, where)
    path = scratch / ".download"
    log.info("downloading %s", loc.display)
    digest, n = fetch(loc, path, sha256=request.sha256, size=request.size, where=where, **transfer)
    if request.sha256 is None:
        # Unpinned remote bytes: print what to pin so the next run is checked.
        log.warning(
            "%s is not pinned: it served sha256 %s, %d bytes; pin them (corpus.sha256, corpus.size)"
            " so a changed or tampered file is caught",
            where, digest, n,
        )
    return _Blob(path, loc.name, digest, n, True, where)


# ------------------------------------------------------------------ 3. unpack


def _open(request: _Request, blob: _Blob | None, limits: Limits) -> Container:
    if blob is None:
        assert request.directory is not None
        return Directory(request.directory, request.shown)
    return open_file(blob.path, blob.name, blob.where, request.members, limits)


def _extract_splits(container: Container, members: Mapping[str, str], out_dir: Path) -> dict[str, dict[str, Any]]:
    """Each split's member copied to `out_dir/<split>.txt`; their TextStats by split."""
    chosen = find_split_members(container.names(members), members, container.where)
    splits = {}
    for split in SPLITS:
        log.info("%s: %s <- %s", container.where, split, chosen[split])
        splits[split] = extract(container, chosen[split], out_dir / f"{split}.txt")
        if splits[split]["bytes"] == 0:
            log.warning("%s: the %s split (%s) is empty", container.where, split, chosen[split])
    return splits


def _identity(blob: _Blob | None, splits: Mapping[str, dict[str, Any]]) -> dict[str, Any]:
    """The manifest's "sha256" and "bytes": the downloaded file's, or a directory's combined ones."""
    if blob is not None:
        return {"sha256": blob.sha256, "bytes": blob.size}
    return {
        "sha256": combined_digest(splits[s]["sha256"] for s in SPLITS),
        "bytes": sum(splits[s]["bytes"] for s in SPLITS),
    }


# ------------------------------------------------------------------ 4. publish


def _set_aside(blob: _Blob, cache: Path | None) -> None:
    """The download, out of the folder about to be published: into the cache, or gone."""
    if cache is not None:
        cache_mod.keep(blob.path, cache, blob.sha256)
    blob.path.unlink(missing_ok=True)


def _check_dest(dest: Path) -> None:
    """DEST may be new, empty, or a previous download's output; anything else is kept safe."""
    if dest.is_symlink() or (dest.exists() and not dest.is_dir()):
        raise LmforgeError(f"{dest} exists and is not a directory; choose another output directory (--out)")
    if dest.is_dir():
        extra = {p.name for p in dest.iterdir()} - OUTPUT_NAMES
        if extra:
            raise LmforgeError(
                f"{dest} already holds other files ({preview(extra, 4)}); choose an empty or new output directory (--out)"
            )


def _publish(tmp_dir: Path, dest: Path) -> None:
    """Rename the finished `tmp_dir` to `dest`, replacing an earlier download's output there."""
    _check_dest(dest)  # again: someone may have written there while we downloaded
    replace_dir(tmp_dir, dest)
