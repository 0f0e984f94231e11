"""Fill a wheelhouse: every wheel the images install, so that a build needs no network.

In: a source checkout (requirements.lock, pyproject.toml), a destination directory, the torch
variant (`cpu`, or a CUDA build such as `cu126`). Out: the directory holding one wheel per
package and a stamp (`wheelhouse.json`) naming what it was filled from. It resolves exactly as
scripts/install.sh does:

1. torch 2.13.0 of the variant, from PyTorch's index for it (`--torch-index`; empty: only pip's
   configured sources), with its own dependencies held to the lock (a CUDA build brings its
   nvidia-* wheels this way);
2. every pin of requirements.lock, ve-fairseq 0.12.3 (the images install it --no-deps, so its
   declared torchaudio is never fetched) and lmforge's build backend (pyproject's
   build-system.requires), each --no-deps: the lock is already the whole closure;
3. the sdists among them (the lock has a few) built into wheels here, so the image's build
   needs no compiler either.

The stamp is written last: a directory without one (an interrupted fill) is filled again, and
pip skips the files already there. A filled one whose stamp matches returns at once. It is
also what a user with an air-gapped cluster copies next to the checkout.

    lmforge images wheelhouse DIR [--torch-variant cpu] [--torch-index URL]
    lmforge images build --wheelhouse DIR --base-image IMAGE
"""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path

from lmforge.errors import LmforgeError

log = logging.getLogger(__name__)

TORCH_VERSION = "2.13.0"
FAIRSEQ = "ve-fairseq==0.12.3"
STAMP = "wheelhouse.json"
SDIST_SUFFIXES = (".tar.gz", ".zip")


def torch_requirement(variant: str) -> str:
    """The exact torch build: `torch==2.13.0+cpu` matches the CPU wheel and nothing else."""
    return f"torch=={TORCH_VERSION}+{variant}"


def torch_index(variant: str) -> str:
    return f"https://download.pytorch.org/whl/{variant}"


def build_requirements(root: Path) -> list[str]:
    """What building lmforge's own wheel needs (pyproject's build-system.requires)."""
    with (root / "pyproject.toml").open("rb") as f:
        return list(tomllib.load(f)["build-system"]["requires"])


def fill_fingerprint(root: Path, variant: str) -> str:
    """What a wheelhouse was filled from: the lock, the build backend and the torch build."""
    digest = hashlib.sha256((root / "requirements.lock").read_bytes())
    digest.update(json.dumps([build_requirements(root), torch_requirement(variant), FAIRSEQ]).encode())
    return digest.hexdigest()


def download_commands(root: Path, dest: Path, *, variant: str, index: str, python: str = sys.executable
                      ) -> list[list[str]]:
    """The pip commands of steps 1 and 2 (pure, so tests can read exactly what runs)."""
    pip = [python, "-m", "pip", "--disable-pip-version-check", "download", "--dest", str(dest)]
    lock = str(root / "requirements.lock")
    torch = [*pip, "-c", lock, *(["--extra-index-url", index] if index else []), torch_requirement(variant)]
    pins = [*pip, "--no-deps", "-r", lock, FAIRSEQ, *build_requirements(root)]
    return [torch, pins]


def sdists(dest: Path) -> list[Path]:
    return sorted(p for p in dest.iterdir() if p.name.endswith(SDIST_SUFFIXES))


def is_filled(dest: Path, root: Path, variant: str) -> bool:
    stamp = dest / STAMP
    try:
        return json.loads(stamp.read_text()).get("fingerprint") == fill_fingerprint(root, variant)
    except (OSError, ValueError):
        return False


def fill_wheelhouse(root: Path, dest: Path, *, variant: str = "cpu", index: str | None = None,
                    progress: Callable[[str], None] = print) -> Path:
    """Fill `dest` (see the module docstring) unless its stamp says it already is."""
    root, dest = root.resolve(), dest.resolve()
    if not (root / "requirements.lock").is_file():
        raise LmforgeError(f"{root} has no requirements.lock: pass --context with an lmforge source checkout")
    if is_filled(dest, root, variant):
        progress(f"wheelhouse {dest} is up to date")
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    (dest / STAMP).unlink(missing_ok=True)
    for command in download_commands(root, dest, variant=variant, index=torch_index(variant) if index is None
                                      else index):
        progress(f"downloading: {' '.join(command[command.index('--dest') + 2:])}")
        _run(command, "downloading wheels")
    for sdist in sdists(dest):
        progress(f"building a wheel of {sdist.name}")
        _run([sys.executable, "-m", "pip", "--disable-pip-version-check", "wheel", "--no-deps",
              "--wheel-dir", str(dest), str(sdist)], f"building a wheel of {sdist.name}")
        sdist.unlink()
    wheels = sorted(p.name for p in dest.glob("*.whl"))
    stamp = {"fingerprint": fill_fingerprint(root, variant), "torch": torch_requirement(variant), "wheels": wheels}
    tmp = dest / f".{STAMP}.tmp"
    tmp.write_text(json.dumps(stamp, indent=2) + "\n")
    tmp.replace(dest / STAMP)
    progress(f"wheelhouse {dest}: {len(wheels)} wheels, {sum(p.stat().st_size for p in dest.glob('*.whl')) >> 20} MiB")
    return dest


def has_torch(dest: Path, variant: str) -> bool:
    """Whether the wheelhouse holds the torch build an image of `variant` installs."""
    return any(dest.glob(f"torch-{TORCH_VERSION}+{variant}-*.whl"))


def _run(command: list[str], what: str) -> None:
    out = subprocess.run(command, capture_output=True, text=True)
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise LmforgeError(f"{what} failed (pip exit status {out.returncode}): {last}")
