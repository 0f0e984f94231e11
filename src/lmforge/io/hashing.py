"""File digests: the one sha256 every stage uses (pins, manifests, lineage tags).

In: a local file. Out: its sha256 (hex) and size in bytes.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

# 1 MiB reads: per-chunk Python overhead is negligible, memory stays flat.
CHUNK = 1 << 20


def hash_file(path: str | Path) -> tuple[str, int]:
    """(sha256, bytes) of a file, read in CHUNK pieces."""
    digest, n = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
            n += len(chunk)
    return digest.hexdigest(), n


def file_sha256(path: str | Path) -> str:
    return hash_file(path)[0]
