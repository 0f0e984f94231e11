"""Local copies of step inputs that may live in S3: a data-bin directory, a checkpoint file.

In: a local path, file:// URI or s3://bucket/key. Out (a context manager): a local `Path`;
the path itself for local inputs, else a temporary copy fetched with `lmforge.io.storage`
(verified, removed on exit). Used by the evaluate and register steps, which run in pods
where the pipeline's data lives in S3.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path

from lmforge.io import storage


@contextlib.contextmanager
def local_dir(uri: str | Path) -> Iterator[Path]:
    path = storage.local_path(uri)
    if path is not None:
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="lmforge-stage-") as tmp:
        storage.get_dir(uri, tmp)
        yield Path(tmp)


@contextlib.contextmanager
def local_file(uri: str | Path) -> Iterator[Path]:
    path = storage.local_path(uri)
    if path is not None:
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="lmforge-stage-") as tmp:
        dest = Path(tmp) / str(uri).rstrip("/").rsplit("/", 1)[-1]
        storage.get_file(uri, dest)
        yield dest
