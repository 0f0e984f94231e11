"""A content-addressed file cache: verified downloads kept under their sha256, so pinned bytes travel once.

In:  a cache directory and a pin (sha256, optionally size); a verified local file
     to keep. Out: `find` gives the cached file for a pin (re-hashed first; a
     corrupt entry is removed) or None; `keep` moves a file in under its digest.
     Layout: `<cache_dir>/sha256/<hex digest>`.

    lmforge download --source wikitext-2 --out data/wikitext-2 --cache-dir ~/.cache/lmforge

(the download stage, lmforge.data.download, is the caller.) The cache knows
nothing of what the files hold: any step that fetches pinned bytes can use it.
"""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path

from lmforge.errors import LmforgeError
from lmforge.io import storage
from lmforge.io.hashing import hash_file

log = logging.getLogger(__name__)


def entry(cache_dir: Path, sha256: str) -> Path:
    """Where the file with this digest lives in the cache."""
    return cache_dir / "sha256" / sha256


def find(cache_dir: Path | None, sha256: str | None, size: int | None = None) -> Path | None:
    """The cached file for a pinned digest, if present and still intact."""
    if cache_dir is None or sha256 is None:
        return None
    path = entry(cache_dir, sha256)
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


def keep(path: Path, cache_dir: Path, sha256: str) -> None:
    """Move the verified file `path` into the cache; a full or read-only cache only costs a warning."""
    dest = entry(cache_dir, sha256)
    try:
        _move(path, dest)
    except (OSError, LmforgeError) as e:  # LmforgeError: the copy did not verify
        log.warning("could not keep %s in the cache (%s); the next run downloads it again", dest, e)


def _move(src: Path, dst: Path) -> None:
    """Move `src` to `dst` atomically, also across filesystems (put_file: a copy under a temp name, then rename)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(src, dst)
        return
    except OSError as e:
        if e.errno != errno.EXDEV:
            raise
    storage.put_file(src, dst)
    src.unlink()
