"""Build (and push) the two images the compiled pipeline names, with the docker SDK.

In: a source checkout (docker/*.Dockerfile, .dockerignore, the package), an
optional registry. Out: `lmforge-steps:<version>` and `lmforge-trainer:<version>`
tagged as src/lmforge/images.py names them (the tags the components
use), plus `<REGISTRY>/lmforge-<role>:<version>` and a push where a registry
is given.

    lmforge images build [--push REGISTRY] [--context DIR] [--base-image IMAGE]
                         [--wheelhouse DIR] [--trainer-variant cpu|cu126|...]

The build context is made here, from the .dockerignore allow-list, exactly as
the Docker CLI would send it, so what enters an image is testable without an
engine. With a wheelhouse (pipeline/wheelhouse.py) its wheels go into the
context under wheelhouse/, pip is told to use nothing else, and the build runs
with no network at all: what an air-gapped cluster's users need, and how the
tests build here, where no registry answers.
"""

from __future__ import annotations

import logging
import subprocess
import tarfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from lmforge import __version__
from lmforge.errors import LmforgeError
from lmforge.images import STEPS_IMAGE, TRAINER_IMAGE
from lmforge.images import image as image_in
from lmforge.pipeline import wheelhouse as wheels

log = logging.getLogger(__name__)

ROLES = {"steps": ("docker/steps.Dockerfile", STEPS_IMAGE), "trainer": ("docker/trainer.Dockerfile", TRAINER_IMAGE)}
# ve-fairseq publishes manylinux x86_64 wheels only.
PLATFORM = "linux/amd64"
# Where the Dockerfiles find the context's wheelhouse/ folder (COPY wheelhouse/ /wheelhouse/).
WHEELHOUSE_IN_IMAGE = "/wheelhouse"
STEPS_VARIANT = "cpu"  # the steps image never needs a GPU
DEFAULT_TRAINER_VARIANT = "cu126"


@dataclass(frozen=True)
class ImageSpec:
    role: str
    dockerfile: str  # relative to the context root
    tags: list[str]  # the first is the name the compiled pipeline uses
    labels: dict[str, str] = field(default_factory=dict)
    buildargs: dict[str, str] = field(default_factory=dict)
    torch_variant: str = STEPS_VARIANT


def split_tag(image: str) -> tuple[str, str]:
    """'ghcr.io/x/y:1.0' -> ('ghcr.io/x/y', '1.0'); the colon of a registry port is not a tag."""
    repository, sep, tag = image.rpartition(":")
    if not sep or "/" in tag:
        return image, "latest"
    return repository, tag


def git_revision(root: Path) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def image_specs(
    root: Path, registry: str | None = None, roles: list[str] | None = None, *, base_image: str | None = None,
    wheelhouse: bool = False, trainer_variant: str = DEFAULT_TRAINER_VARIANT,
) -> list[ImageSpec]:
    """What to build: per role its Dockerfile, tags (the pipeline's name first), OCI labels and
    build arguments (the Dockerfiles' defaults stand wherever nothing is given)."""
    registry = registry.rstrip("/") if registry else None
    revision = git_revision(root)
    specs = []
    for role in roles or list(ROLES):
        dockerfile, image = ROLES[role]
        tags = [image]
        if registry:
            tags.append(image_in(role, registry))
        labels = {"org.opencontainers.image.version": __version__, "org.opencontainers.image.title": f"lmforge-{role}"}
        if revision:
            labels["org.opencontainers.image.revision"] = revision
        variant = trainer_variant if role == "trainer" else STEPS_VARIANT
        labels["io.lmforge.torch-variant"] = variant
        buildargs: dict[str, str] = {}
        if base_image:
            buildargs["BASE_IMAGE"] = base_image
            labels["io.lmforge.base-image"] = base_image
        if wheelhouse:
            buildargs.update(PIP_NO_INDEX="1", PIP_FIND_LINKS=WHEELHOUSE_IN_IMAGE)
        if role == "trainer":
            buildargs["TORCH_VARIANT"] = variant
        specs.append(ImageSpec(role, dockerfile, tags, labels, buildargs, variant))
    return specs


def dockerignore_patterns(root: Path) -> list[str]:
    path = root / ".dockerignore"
    if not path.is_file():
        return []
    lines = (line.strip() for line in path.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def build_context(root: Path, dockerfile: str, wheelhouse: Path | None = None) -> IO[bytes]:
    """The build context as the uncompressed tar the engine receives; a wheelhouse's wheels
    are added under wheelhouse/ (the checkout's own folder holds only its README)."""
    from docker.utils.build import tar

    context = tar(str(root), exclude=dockerignore_patterns(root), dockerfile=(dockerfile, None))
    if wheelhouse is not None:
        with tarfile.open(fileobj=context, mode="a") as archive:
            for wheel in sorted(wheelhouse.glob("*.whl")):
                archive.add(wheel, arcname=f"wheelhouse/{wheel.name}", recursive=False)
        context.seek(0)
    return context


def check_wheelhouse(path: Path, specs: list[ImageSpec]) -> None:
    """A wheelhouse build can only install what is there: refuse one that lacks a torch it needs."""
    if not (path / wheels.STAMP).is_file():
        raise LmforgeError(f"{path} is not a filled wheelhouse (no {wheels.STAMP}); "
                           f"fill it with `lmforge images wheelhouse {path}`")
    for spec in specs:
        if not wheels.has_torch(path, spec.torch_variant):
            raise LmforgeError(
                f"the wheelhouse {path} has no {wheels.torch_requirement(spec.torch_variant)} wheel for the "
                f"{spec.role} image; fill it with `lmforge images wheelhouse {path} --torch-variant "
                f"{spec.torch_variant}` or build with --trainer-variant cpu"
            )


def check_checkout(root: Path) -> None:
    missing = [d for d, _ in ROLES.values() if not (root / d).is_file()]
    if missing or not (root / "pyproject.toml").is_file():
        raise LmforgeError(
            f"{root} is not an lmforge source checkout (no {', '.join(missing) or 'pyproject.toml'}); "
            "run from the repository root or pass --context DIR"
        )


def docker_client() -> Any:
    import docker
    from docker.errors import DockerException

    try:
        client = docker.from_env()
        client.ping()
    except DockerException as exc:
        raise LmforgeError(f"no Docker engine reachable ({str(exc).splitlines()[0]}); start one or set DOCKER_HOST")
    return client


def build_images(
    root: Path, registry: str | None = None, roles: list[str] | None = None, client: Any = None,
    progress: Callable[[str], None] = print, *, base_image: str | None = None, wheelhouse: Path | None = None,
    trainer_variant: str = DEFAULT_TRAINER_VARIANT,
) -> list[ImageSpec]:
    """Build every role's image, tag it, and push the registry tags when a registry is given.

    With a wheelhouse the build has no network (`network_mode="none"`): a package missing
    from it fails the build instead of being fetched from wherever pip finds one.
    """
    from docker.errors import APIError, BuildError

    root = root.resolve()
    check_checkout(root)
    specs = image_specs(root, registry, roles, base_image=base_image, wheelhouse=wheelhouse is not None,
                        trainer_variant=trainer_variant)
    if wheelhouse is not None:
        wheelhouse = wheelhouse.resolve()
        check_wheelhouse(wheelhouse, specs)
    client = client or docker_client()
    for spec in specs:
        progress(f"building {spec.tags[0]} from {spec.dockerfile}")
        context = build_context(root, spec.dockerfile, wheelhouse)
        try:
            image, _ = client.images.build(
                fileobj=context, custom_context=True, dockerfile=spec.dockerfile, tag=spec.tags[0],
                labels=spec.labels, buildargs=spec.buildargs, platform=PLATFORM, rm=True, forcerm=True,
                network_mode="none" if wheelhouse is not None else None,
            )
        except BuildError as exc:
            raise LmforgeError(f"building {spec.tags[0]} failed: {exc.msg}") from None
        finally:
            context.close()
        for tag in spec.tags[1:]:
            image.tag(*split_tag(tag))
            progress(f"pushing {tag}")
            _push(client, tag, APIError)
    return specs


def _push(client: Any, tag: str, api_error: type[Exception]) -> None:
    repository, version = split_tag(tag)
    try:
        for line in client.images.push(repository, tag=version, stream=True, decode=True):
            if "error" in line:  # the engine reports a refused push in the stream, not as an HTTP error
                raise LmforgeError(f"pushing {tag} failed: {line['error']}; log in with `docker login`")
    except api_error as exc:
        raise LmforgeError(f"pushing {tag} failed: {exc}") from None
