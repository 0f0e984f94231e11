"""Local copies of step inputs that may live in S3: a data-bin directory, a checkpoint file.

In: a local path, file:// URI or s3://bucket/key. Out (a context manager): a local `Path`;
the path itself for local inputs, else a temporary copy fetched with `lmforge.storage`
(verified, removed on exit). Used by the evaluate and register steps, which run in pods
where the pipeline's data lives in S3.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path

from lmforge.uris import parse_location


@contextlib.contextmanager
def local_dir(uri: str | Path) -> Iterator[Path]:
    location = parse_location(uri)
    if not location.is_remote:
        yield location.path
        return
    from lmforge import storage  # lazily: only pods reading S3 need it

    with tempfile.TemporaryDirectory(prefix="lmforge-stage-") as tmp:
        storage.get_dir(str(uri), tmp)
        yield Path(tmp)


@contextlib.contextmanager
def local_file(uri: str | Path) -> Iterator[Path]:
    location = parse_location(uri)
    if not location.is_remote:
        yield location.path
        return
    from lmforge import storage

    with tempfile.TemporaryDirectory(prefix="lmforge-stage-") as tmp:
        dest = Path(tmp) / location.name
        storage.get_file(str(uri), str(dest))
        yield dest
