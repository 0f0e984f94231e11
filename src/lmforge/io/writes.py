"""Write errors a user can act on: a full disk, a quota, a read-only or forbidden destination.

In:  an `OSError` raised while writing, the destination the user named (a path or URI), the
     local path whose filesystem took the bytes (a staging directory; default: the
     destination) and, where known, the bytes the write needed.
Out: a `WriteError`, one line naming the destination, what the filesystem said, the free
     space left there (`shutil.disk_usage`) and the space needed where known; or None for an
     OSError that is no refused write (a bug, or a read error the caller words itself).

`writing(destination)` is the one way code turns those errors into that line: each write
path of io (storage.put_file/get_file/put_text, staging.staged_dir) and each command of the
data layer (download, preprocess) wraps its writes in it. The outermost one names the
destination: an inner `WriteError` (a stage writing into preprocess's scratch directory)
is named again after what the user asked for (`--out`), its filesystem's free space kept.
The atomic staging around those writes is unchanged: the temporary files are gone before
the error is raised, and earlier output is left as it was.

    lmforge preprocess --corpus DIR --out /full/disk/data-bin    # cannot write /full/disk/data-bin: ...
"""

from __future__ import annotations

import contextlib
import errno
import shutil
from collections.abc import Iterator
from pathlib import Path

from lmforge.errors import LmforgeError

#: What the filesystem said, in words, and what the user can do about it.
_REASONS = {
    errno.ENOSPC: ("no space left on the device", "free space there or choose another destination"),
    errno.EDQUOT: ("disk quota exceeded", "free space there or choose another destination"),
    errno.EROFS: ("read-only file system", "choose a writable destination"),
    errno.EACCES: ("permission denied", "choose a destination you may write to"),
    errno.EPERM: ("operation not permitted", "choose a destination you may write to"),
}
#: Only a write meets these: wherever in a block they come from, the write side failed.
_WRITE_ONLY = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})


class WriteError(LmforgeError):
    """Writing a destination failed for a reason outside lmforge (space, quota, permissions)."""

    def __init__(self, destination: str, code: int, where: Path, needed: int | None) -> None:
        self.destination, self.code, self.where, self.needed = destination, code, where, needed
        self.free = free_bytes(where) if code in (errno.ENOSPC, errno.EDQUOT) else None
        super().__init__(self._message())

    def _message(self) -> str:
        reason, advice = _REASONS[self.code]
        numbers = [f"{human_bytes(self.free)} free"] if self.free is not None else []
        if numbers and self.needed is not None:
            numbers.append(f"{human_bytes(self.needed)} needed")
        detail = f" ({', '.join(numbers)})" if numbers else ""
        # A staging directory next to the destination is an implementation detail; elsewhere (a
        # pod's temporary disk under an s3:// destination) it is the disk that filled up.
        if _ours(self.where, Path(self.destination)):
            return f"cannot write {self.destination}: {reason}{detail}; {advice}"
        if self.free is not None:  # the system's temporary directory filled up, not the destination
            advice = "free space there or point TMPDIR at a larger disk"
        return f"cannot write {self.destination} (staged in {self.where}): {reason}{detail}; {advice}"

    def __reduce__(self) -> tuple:
        # A preprocess worker process raises it; the pool pickles it back to the parent.
        return WriteError, (self.destination, self.code, self.where, self.needed)

    def named(self, destination: str, needed: int | None = None) -> WriteError:
        """The same failure, named after an outer destination (what the user asked for). The bytes an
        inner write needed (one file's) say nothing of the whole: only the outer `needed` is shown."""
        return WriteError(destination, self.code, self.where, needed)


def human_bytes(n: int) -> str:
    """1536 -> '1.5 KiB' (binary units, as df -h counts)."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def free_bytes(path: str | Path) -> int | None:
    """Free bytes (for an unprivileged user) on the filesystem of `path` or its nearest existing parent."""
    path = Path(path).absolute()
    for candidate in (path, *path.parents):
        if candidate.exists():
            try:
                return shutil.disk_usage(candidate).free
            except OSError:
                return None
    return None


def _under(path: str | Path, root: str | Path) -> bool:
    try:
        Path(path).absolute().relative_to(Path(root).absolute())
    except ValueError:
        return False
    return True


def _ours(filename: str | Path, destination: Path) -> bool:
    """A path lmforge writes for `destination`: the destination, a path in it, a parent it creates
    for it, or a path in a hidden sibling where it stages (`.NAME.xxx`, `.preprocess-xxx`: every
    staging directory of lmforge is a dot-name next to its destination)."""
    if _under(filename, destination) or _under(destination, filename):
        return True
    parent = destination.absolute().parent
    if not _under(filename, parent):
        return False
    first = Path(filename).absolute().relative_to(parent).parts
    return bool(first) and first[0].startswith(".")


def write_error(exc: OSError, destination: str | Path, *, where: str | Path | None = None,
                needed: int | None = None) -> WriteError | None:
    """The one-line error for `exc` raised while writing `destination`, or None when `exc` is no
    refused write. ENOSPC, EDQUOT and EROFS only come from writes; EACCES and EPERM count when
    they name a path lmforge writes for the destination (a source it cannot read is the
    caller's to word)."""
    local = Path(where) if where is not None else Path(str(destination))
    if exc.errno not in _REASONS:
        return None
    if exc.errno not in _WRITE_ONLY:
        if exc.filename is None or not (_ours(exc.filename, local) or _ours(exc.filename, Path(str(destination)))):
            return None
    return WriteError(str(destination), exc.errno, local, needed)


@contextlib.contextmanager
def writing(destination: str | Path, *, where: str | Path | None = None, needed: int | None = None) -> Iterator[None]:
    """Turn a refused write inside the block into a `WriteError` naming `destination`.

    `where`: the local path written (default: the destination itself), whose filesystem's free
    space the line reports; `needed`: the bytes the write needs, where known. A `WriteError`
    from an inner block that wrote for this destination (in it, or in its staging directory)
    is named again after `destination`; one about another destination passes unchanged.
    """
    local = Path(where) if where is not None else Path(str(destination))
    try:
        yield
    except WriteError as exc:
        if _ours(exc.where, local) or _ours(exc.where, Path(str(destination))):
            raise exc.named(str(destination), needed) from None
        raise
    except OSError as exc:
        error = write_error(exc, destination, where=where, needed=needed)
        if error is None:
            raise
        raise error from None
