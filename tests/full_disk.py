"""A small filesystem to fill up for real: a tmpfs mounted for one test, unmounted after it.

Disk-full and read-only behaviour (lmforge.io.writes) is tested against the kernel's own ENOSPC
and EROFS, not a patched `write`. Mounting needs root with CAP_SYS_ADMIN (the test machines'
sandbox has it); elsewhere the tests skip and say why. Import the fixture into a test module:

    from full_disk import small_disk  # noqa: F401 (a fixture)

    def test_x(small_disk):
        disk = small_disk("64k")            # a 64 KiB filesystem, empty
        ro = small_disk("64k", read_only=True)
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


@contextlib.contextmanager
def tmpfs(path: Path, size: str, *, read_only: bool = False) -> Iterator[Path]:
    """`path` as the mount point of a fresh tmpfs of `size` (mount's units: 64k, 1m), for the block."""
    if shutil.which("mount") is None:
        pytest.skip("no mount command here: a tmpfs cannot be mounted to fill a disk for real")
    path.mkdir(parents=True, exist_ok=True)
    options = f"size={size},mode=0755" + (",ro" if read_only else "")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                          capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip() or proc.returncode}): needs root with "
                    "CAP_SYS_ADMIN")
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True, timeout=30).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30)  # busy: detach it


@pytest.fixture
def small_disk(tmp_path: Path):
    """A factory: small_disk(size, name="disk", read_only=False) mounts a tmpfs under tmp_path."""
    with contextlib.ExitStack() as stack:
        def make(size: str, name: str = "disk", *, read_only: bool = False) -> Path:
            return stack.enter_context(tmpfs(tmp_path / name, size, read_only=read_only))

        yield make


def listing(root: Path) -> dict[str, int]:
    """Every file under `root` (hidden ones included) -> its size: what a failed write left behind."""
    return {p.relative_to(root).as_posix(): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}


def contents(root: Path) -> dict[str, bytes]:
    """Every file under `root` -> its bytes: earlier output, to compare after a failed rerun."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
