"""What the container tests run on: a Docker engine, a base image made here, a wheelhouse and
the two images built from this checkout, all without a registry (none answers here or in CI).

- The engine: DOCKER_HOST, else the socket scripts/dockerd.sh starts (which .ci/run calls).
  Where no engine answers, every `docker` test skips with one line saying so.
- The base: Debian bookworm with its Python 3.11, made with debootstrap from the Debian
  mirror and imported as `BASE_IMAGE`; it stands in for python:3.11-slim-bookworm.
- The wheelhouse: `lmforge images wheelhouse` into LMFORGE_WHEELHOUSE (default
  ~/.cache/lmforge/wheelhouse-cpu), torch from pip's configured sources (PyTorch's own index
  is not reachable here).
- The images: `lmforge images build --wheelhouse ... --base-image BASE_IMAGE
  --trainer-variant cpu`, tagged with the names the compiled pipeline uses.

All of it is cached: the base and the built layers stay in the engine's data root and the
wheelhouse on disk, so a later run pays only for the layers a source change touches.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
LMFORGE_SOCKET = "unix:///run/lmforge-docker/docker.sock"
BASE_IMAGE = "lmforge-base:bookworm-py311"
DEBIAN_MIRROR = os.environ.get("LMFORGE_DEBIAN_MIRROR", "http://deb.debian.org/debian")
BASE_PACKAGES = "python3,python3-venv,python3-pip,ca-certificates"
# The bare base has no `python` (only python3) and no venv: what the model test installs into.


def docker_host() -> str:
    return os.environ.get("DOCKER_HOST") or LMFORGE_SOCKET


def engine_or_skip() -> Any:
    """A docker SDK client of a live engine, or a skip that says why there is none."""
    import docker
    from docker.errors import DockerException

    try:
        client = docker.DockerClient(base_url=docker_host(), timeout=600)
        client.ping()
    except DockerException as exc:
        pytest.skip(f"no Docker engine at {docker_host()} ({str(exc).splitlines()[0][:120]}); "
                    "start one with scripts/dockerd.sh")
    os.environ["DOCKER_HOST"] = docker_host()  # for kfp's DockerRunner, lmforge and the docker CLI
    return client


def has_image(client: Any, tag: str) -> bool:
    from docker.errors import ImageNotFound

    try:
        client.images.get(tag)
        return True
    except ImageNotFound:
        return False


def make_base_image(client: Any, tag: str = BASE_IMAGE) -> str:
    """Debian bookworm with Python 3.11 from debootstrap, imported as `tag` (once per engine)."""
    if has_image(client, tag):
        return tag
    debootstrap = shutil.which("debootstrap")
    if debootstrap is None:
        pytest.skip("debootstrap is missing (apt-get install debootstrap, or run scripts/dockerd.sh)")
    with tempfile.TemporaryDirectory(prefix="lmforge-base-") as tmp:
        rootfs = Path(tmp) / "rootfs"
        subprocess.run([debootstrap, "--variant=minbase", f"--include={BASE_PACKAGES}", "bookworm", str(rootfs),
                        DEBIAN_MIRROR], check=True, capture_output=True, timeout=1200)
        # The package cache and lists are the image's dead weight (~60 MB).
        for junk in [rootfs / "var/cache/apt/archives", rootfs / "var/lib/apt/lists"]:
            shutil.rmtree(junk, ignore_errors=True)
            junk.mkdir(parents=True)
        archive = subprocess.run(["tar", "-C", str(rootfs), "-c", "."], check=True, capture_output=True).stdout
        repository, _, version = tag.partition(":")
        client.api.import_image_from_data(archive, repository=repository, tag=version or "latest")
    return tag


def wheelhouse_dir() -> Path:
    return Path(os.environ.get("LMFORGE_WHEELHOUSE") or Path.home() / ".cache/lmforge/wheelhouse-cpu")


def filled_wheelhouse() -> Path:
    from lmforge.pipeline.wheelhouse import fill_wheelhouse

    # torch's CPU wheel comes from pip's configured sources here (PyTorch's index is unreachable).
    index = os.environ.get("LMFORGE_TORCH_INDEX", "")
    return fill_wheelhouse(REPO, wheelhouse_dir(), variant="cpu", index=index, progress=lambda _: None)


def build_image(client: Any, role: str) -> str:
    """`role`'s image of this checkout, hermetic, on the local base; the pipeline's tag of it."""
    from lmforge.pipeline.image_build import build_images

    base = make_base_image(client)
    [spec] = build_images(REPO, roles=[role], client=client, base_image=base, wheelhouse=filled_wheelhouse(),
                          trainer_variant="cpu", progress=lambda _: None)
    return spec.tags[0]
