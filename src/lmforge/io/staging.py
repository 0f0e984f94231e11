"""Local directories and files <-> storage locations, atomically: one vocabulary
for every step.

In: a location (local path, file:// or s3://). Out (context managers):
- `fetched_dir(uri, names)` / `fetched_file(uri)`: a local `Path` to read; the
  path itself for local locations, else a verified temporary copy (removed on exit);
- `staged_dir(uri, last=...)`: a local directory to write, which becomes `uri`
  only when the block ends without error (local: a sibling renamed into place;
  S3: files, subfolders included, uploaded and verified one by one
  (storage.put_dir), `last` after all the others, so its presence says the rest
  is there);
- `replace_dir(src, dest)`: the rename that publishes a finished local directory.

A write the filesystem refuses in a staged block (a full disk, a quota, a read-only
destination) becomes one line naming `uri` and the space left (lmforge.io.writes), raised
after the temporary directory is gone.

    lmforge preprocess --corpus s3://bucket/corpus --out s3://bucket/data-bin

Used by the data stages, the download stage, evaluation and registration.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from lmforge.io import storage
from lmforge.io.writes import writing


def replace_dir(src: Path, dest: Path) -> None:
    """Move the complete directory `src` to `dest`, replacing earlier output there.

    A new or empty `dest` takes one atomic rename. Otherwise the old output is
    moved aside, kept until the new one is in place, and put back if that fails.
    """
    try:
        os.replace(src, dest)
        return
    except OSError as e:
        if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
    old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
    os.replace(dest, old / "d")
    try:
        os.replace(src, dest)
    except BaseException:
        os.replace(old / "d", dest)
        shutil.rmtree(old, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def staged_dir(uri: str | Path, last: str | None = None) -> Iterator[Path]:
    """A local directory whose files become the directory `uri` when the block finishes without error."""
    local = storage.local_path(uri)
    if local is not None:
        with writing(local):
            local.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{local.name}.", dir=local.parent))
            try:
                yield tmp
                replace_dir(tmp, local)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        return
    with tempfile.TemporaryDirectory(prefix="lmforge-stage-") as tmp, writing(uri, where=tmp):
        yield Path(tmp)
        storage.put_dir(tmp, uri, last=last)


@contextlib.contextmanager
def fetched_dir(uri: str | Path, names: Sequence[str] | None = None) -> Iterator[Path]:
    """A local directory holding `names` (default: every file, subdirectories included) of the directory `uri`."""
    local = storage.local_path(uri)
    if local is not None:
        yield local
        return
    with tempfile.TemporaryDirectory(prefix="lmforge-fetch-") as tmp:
        if names is None:
            storage.get_dir(uri, tmp)
        for name in names or ():
            storage.get_file(storage.join(uri, name), Path(tmp) / name)
        yield Path(tmp)


@contextlib.contextmanager
def fetched_file(uri: str | Path) -> Iterator[Path]:
    """The file `uri`, locally: itself, or a verified temporary copy under its own name."""
    local = storage.local_path(uri)
    if local is not None:
        yield local
        return
    with tempfile.TemporaryDirectory(prefix="lmforge-fetch-") as tmp:
        dest = Path(tmp) / str(uri).rstrip("/").rsplit("/", 1)[-1]
        storage.get_file(uri, dest)
        yield dest
