"""File digests: the one sha256 every stage uses (pins, manifests, lineage tags, evaluation identity).

In:  local files. Out: a file's sha256 (hex) and size in bytes (`hash_file`), its
     sha256 alone (`file_sha256`), or one sha256 over several files' bytes in
     order (`files_sha256`: a binarized split's .idx then .bin).

    lmforge download --source wikitext-2 --out data/wikitext-2   # every digest in manifest.json

(download, preprocess, evaluate and register call it; so do storage's verified copies.)
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

# 1 MiB reads: per-chunk Python overhead is negligible, memory stays flat.
CHUNK = 1 << 20


def hash_file(path: str | Path) -> tuple[str, int]:
    """(sha256, bytes) of a file, read in CHUNK pieces."""
    digest = hashlib.sha256()
    n = _feed(digest, path)
    return digest.hexdigest(), n


def file_sha256(path: str | Path) -> str:
    return hash_file(path)[0]


def files_sha256(paths: Iterable[str | Path]) -> str:
    """sha256 of the files' bytes one after another, as if they were one file."""
    digest = hashlib.sha256()
    for path in paths:
        _feed(digest, path)
    return digest.hexdigest()


def _feed(digest: Any, path: str | Path) -> int:
    n = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
            n += len(chunk)
    return n
