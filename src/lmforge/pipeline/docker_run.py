"""`lmforge run --runner docker`: every step of the local run in a container of the steps image.

In: the validated run config (absolute local paths), KFP's pipeline root and the host's
environment. Out: a `kfp.local.DockerRunner` whose containers see what the subprocess
runner's steps see, at the same paths, and a guarantee that none of them outlives the run.

- Mounts (`binds`): the local storage root (outputs, the embedded MLflow SQLite file and
  its artifacts), KFP's pipeline root (KFP mounts it itself), the local corpus and
  tokenizer file read-only, a SQLite or file tracking store outside the root, and the
  cache directories the config or LMFORGE_CACHE_DIR / LMFORGE_SCRATCH name. Nothing else
  (but KFP's own workspace, a temporary directory it mounts at /kfp-workspace).
- Environment (`container_environment`): MLFLOW_*, AWS_*, LMFORGE_* and LOGLEVEL of the
  host, nothing else of it.
- Network: the host's (there may be no bridge; an MLflow server, moto or MinIO on
  127.0.0.1 is reached as from the host). The train step runs torchrun inside its
  container, on the host's loopback, like any other process of the step.
- Containers (`StepContainers`): named `lmforge-<run>-<n>`, labelled `lmforge.local-run`,
  removed when their step ends, and all removed on SIGINT/SIGTERM/SIGHUP or a failure.

    lmforge images build --role steps      # once: the image every step runs in
    lmforge run --config pipelines/configs/tiny.yaml --runner docker
"""

from __future__ import annotations

import contextlib
import getpass
import itertools
import logging
import os
import re
import signal
import threading
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge import tracking
from lmforge.config import RunConfig
from lmforge.errors import LmforgeError
from lmforge.interrupts import Interrupted, stop_signals_handled_by
from lmforge.io import storage
from lmforge.io.uris import parse_location

log = logging.getLogger(__name__)

LABEL = "lmforge.local-run"
PASSED_PREFIXES = ("MLFLOW_", "AWS_", "LMFORGE_")
PASSED_NAMES = ("LOGLEVEL",)
# Directories the steps use when these name them (the training cache, the scratch space of S3 runs).
CACHE_VARIABLES = ("LMFORGE_CACHE_DIR", "LMFORGE_SCRATCH")
# Writable for any uid inside the image; the image's own HOME (/home/lmforge) belongs to its uid 10001.
CONTAINER_HOME = "/tmp"
# The status a step gets when its container was removed under it (what SIGKILL gives).
KILLED = 137
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_DECIMAL = {"K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18}


@dataclass(frozen=True)
class Bind:
    """A host path mounted at the same path in every step container; a read-write one is a
    directory (created when missing: Docker refuses a bind whose source does not exist)."""

    path: Path
    what: str  # the setting that names it, for messages
    read_only: bool = False


# --------------------------------------------------------------------------- pure: what a container gets


def _local(location: str) -> Path | None:
    """The path of a local location (a path or file://), None for a remote one or an empty string."""
    if not location or ("://" in location and not location.startswith("file:")):
        return None
    return parse_location(location).path


def tracking_binds(uri: str) -> list[Bind]:
    """What a tracking URI needs mounted: a SQLite file's directory (SQLite writes its journal
    beside the file), a file store's directory (file:// or an absolute path); nothing for a
    server (host networking) or another store (databricks, a database server)."""
    database = tracking.sqlite_file(uri)
    if database is not None:
        if not database.is_absolute():
            raise LmforgeError(
                f"tracking.uri: {uri} names a relative SQLite file; with --runner docker give an absolute path "
                "(sqlite:////abs/path/mlflow.db)"
            )
        return [Bind(database.parent, "tracking.uri")]
    if uri.startswith(("file:", "/")):
        return [Bind(parse_location(uri).path, "tracking.uri")]
    return []


def binds(cfg: RunConfig, pipeline_root: Path, environ: Mapping[str, str]) -> list[Bind]:
    """Every host path a step may read or write, each mounted once (a path under a read-write
    bind needs no bind of its own). `pipeline_root` is KFP's: DockerRunner mounts it itself,
    so it is left out. Pure: it looks at no file."""
    from lmforge.data import catalog

    wanted: list[Bind] = []
    if (root := storage.local_path(cfg.storage.root)) is not None:
        wanted.append(Bind(root, "storage.root"))
    if catalog.lookup(cfg.corpus.source) is None and (path := _local(cfg.corpus.source)) is not None:
        wanted.append(Bind(path, "corpus.source", read_only=True))
    if (path := _local(cfg.preprocess.tokenizer_file)) is not None:
        wanted.append(Bind(path, "preprocess.tokenizer_file", read_only=True))
    wanted += tracking_binds(tracking.resolve_tracking_uri(cfg.tracking.uri, cfg.storage.root))
    directories = {"train.cache_dir": cfg.train.cache_dir, **{k: environ.get(k, "") for k in CACHE_VARIABLES}}
    wanted += [Bind(Path(d).expanduser(), what) for what, d in directories.items() if d]
    for bind in wanted:
        if not bind.path.is_absolute():
            raise LmforgeError(f"{bind.what}: {bind.path} is relative; with --runner docker give an absolute path")
    return _without_covered(wanted, covered_by=[Bind(pipeline_root, "KFP's pipeline root")])


def _without_covered(wanted: list[Bind], covered_by: list[Bind]) -> list[Bind]:
    """`wanted` less the binds another one already gives (same path or below it, with at least its access)."""
    kept: list[Bind] = []
    for bind in sorted(wanted, key=lambda b: (len(b.path.parts), b.read_only)):
        if not any(bind.path.is_relative_to(other.path) and (other.read_only <= bind.read_only)
                   for other in [*covered_by, *kept]):
            kept.append(bind)
    return kept


def container_environment(environ: Mapping[str, str], user_name: str) -> dict[str, str]:
    """The steps' environment: the host's MLFLOW_*, AWS_*, LMFORGE_* and LOGLEVEL, nothing else of it,
    plus a writable HOME and USER (getpass, which MLflow asks for the run's user, finds no
    passwd entry for a host uid the image does not know)."""
    passed = {k: v for k, v in environ.items() if k.startswith(PASSED_PREFIXES) or k in PASSED_NAMES}
    return {**passed, "HOME": CONTAINER_HOME, "USER": user_name}


def quantity_bytes(quantity: str) -> int:
    """A Kubernetes quantity (cluster.shm_size, e.g. 2Gi) in bytes, as Docker's shm_size takes it."""
    match = re.fullmatch(r"([0-9]+)([KMGTPE]i?)?", quantity)
    if match is None:
        raise LmforgeError(f"cluster.shm_size: {quantity!r} is not a Kubernetes quantity (e.g. 2Gi)")
    number, unit = int(match.group(1)), match.group(2) or ""
    return number * (_BINARY.get(unit) or _DECIMAL.get(unit) or 1)


def run_arguments(cfg: RunConfig, mounts: list[Bind], environ: Mapping[str, str], *, uid: int, gid: int,
                  user_name: str) -> dict[str, Any]:
    """The `containers.run` arguments of every step container (DockerRunner passes them on)."""
    from docker.types import Mount

    return {
        "network_mode": "host",
        # The invoking user, not the image's 10001: the files a step writes into the storage root
        # are then the user's to read, move and delete afterwards, as with the subprocess runner.
        "user": f"{uid}:{gid}",
        "working_dir": CONTAINER_HOME,
        "environment": container_environment(environ, user_name),
        "mounts": [Mount(target=str(b.path), source=str(b.path), type="bind", read_only=b.read_only) for b in mounts],
        # What the cluster's pods get for DataLoader workers (a container's default /dev/shm is 64 MiB).
        "shm_size": quantity_bytes(cfg.cluster.shm_size),
    }


# --------------------------------------------------------------------------- the engine


def engine() -> Any:
    """A client of the engine DOCKER_HOST names (the docker SDK's default otherwise), or one line saying none answers."""
    import docker
    import requests
    from docker.errors import DockerException

    where = os.environ.get("DOCKER_HOST") or "the default socket (unix:///var/run/docker.sock)"
    try:
        client = docker.from_env()
        client.ping()
    except (DockerException, requests.RequestException) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise LmforgeError(
            f"--runner docker: no Docker engine answers at {where} ({reason}); start one or set DOCKER_HOST, "
            "or use --runner subprocess"
        ) from None
    return client


def step_images() -> list[str]:
    """The images the pipeline's components name (the steps image)."""
    from lmforge.pipeline import components

    return sorted({c.component_spec.implementation.container.image for c in components.ALL})


def require_images(client: Any, images: list[str]) -> None:
    """Every image (the steps image) present in the engine: KFP would try to pull a missing one,
    from a registry that may not answer and would not hold this checkout's code anyway."""
    from docker.errors import ImageNotFound

    for image in images:
        try:
            client.images.get(image)
        except ImageNotFound:
            raise LmforgeError(
                f"--runner docker: the steps image {image} is not in the Docker engine; build it with "
                "`lmforge images build --role steps`"
            ) from None


def checked_engine() -> Any:
    """What `--runner docker` needs before anything runs: an engine that answers, the steps image in it."""
    client = engine()
    try:
        require_images(client, step_images())
    except LmforgeError:
        client.close()
        raise
    return client


# --------------------------------------------------------------------------- the containers


class StepContainers:
    """Starts the step containers in place of kfp.local's `run_docker_container`, and removes them.

    kfp 2.17.3 starts each container with auto_remove=True and reads its exit status after the
    log stream ends; by then the engine has often removed the container, and KFP counts the
    NotFound as success (kubeflow/pipelines#13332, unfixed upstream; measured here: 3 of 10
    fast-failing shell containers and 4 of 5 Python ones reported 0). Here a container is kept
    until its status is read, then removed; each has a unique name and the run's label, so
    `remove_all` finds every one.
    """

    def __init__(self, client: Any) -> None:
        self.client = client
        self.token = uuid.uuid4().hex[:12]
        self.stopping = False
        self._count = itertools.count(1)
        # Held while a container is started and while stopping begins, so that none starts after
        # stop() has listed the run's containers. Re-entrant: stop() runs from a signal handler,
        # which may interrupt this very thread while it holds the lock.
        self._starting = threading.RLock()

    def run(self, client: Any, image: str, command: list[str], volumes: dict[str, Any], **run_args: Any) -> int:
        """One step: its container's log printed as it comes, its exit status returned."""
        from docker.errors import NotFound

        with self._starting:
            if self.stopping:  # the run is being stopped: a step the local runner still starts does not run
                return KILLED
            name = f"lmforge-{self.token}-{next(self._count)}"
            container = client.containers.run(image=image, command=command, volumes=volumes, detach=True, name=name,
                                              labels={LABEL: self.token}, **run_args)
        try:
            for chunk in container.logs(stream=True, follow=True):
                print(chunk.decode(errors="replace"), end="")
            return int(container.wait()["StatusCode"])
        except NotFound:  # removed by remove_all while it ran
            return KILLED
        finally:
            self._remove(container)

    def stop(self) -> int:
        """No further step starts; every container of this run is removed (killed); how many there were."""
        with self._starting:
            self.stopping = True
        return self.remove_all()

    def remove_all(self) -> int:
        """Remove (killing) every container of this run; how many there were."""
        containers = self.client.containers.list(all=True, filters={"label": f"{LABEL}={self.token}"})
        for container in containers:
            self._remove(container)
        return len(containers)

    @staticmethod
    def _remove(container: Any) -> None:
        from docker.errors import APIError, NotFound

        try:
            container.remove(force=True)
        except NotFound:
            pass
        except APIError as exc:  # "removal already in progress" (remove_all and the step's own finally)
            if exc.status_code != 409:
                raise


@contextlib.contextmanager
def kfp_runs_containers_with(containers: StepContainers) -> Iterator[None]:
    """kfp.local's DockerRunner starts its containers through `containers.run` for the duration."""
    from kfp.local import docker_task_handler

    original = docker_task_handler.run_docker_container
    # Replaced, not wrapped: its auto_remove loses a failing step's status (see StepContainers).
    docker_task_handler.run_docker_container = containers.run
    try:
        yield
    finally:
        docker_task_handler.run_docker_container = original


@contextlib.contextmanager
def removed_on_signal(containers: StepContainers) -> Iterator[None]:
    """A stop signal removes the run's containers, then stops the run (KeyboardInterrupt for SIGINT,
    exit 128 + signal otherwise). The local runner waits for the step threads of a fan-out before
    it unwinds, and they return only once their containers are gone, so they go first, from the
    handler. Further signals are ignored until the run has unwound: a second SIGTERM (as `timeout`
    and some supervisors send) must not cut the removal short."""
    def stop(signum: int, frame: Any) -> None:
        if containers.stopping:
            return
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        removed = containers.stop()
        log.warning("%s: stopping the run; removed %d step container(s)", signal.Signals(signum).name, removed)
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise Interrupted(signum)

    with stop_signals_handled_by(stop, STOP_SIGNALS):
        yield


@contextlib.contextmanager
def docker_runner(cfg: RunConfig, pipeline_root: Path) -> Iterator[Any]:
    """A configured kfp.local.DockerRunner for the duration; afterwards no container of the run is left."""
    from kfp import local

    mounts = binds(cfg, pipeline_root, os.environ)
    client = checked_engine()
    for bind in mounts:
        if not bind.read_only:
            bind.path.mkdir(parents=True, exist_ok=True)
    arguments = run_arguments(cfg, mounts, os.environ, uid=os.getuid(), gid=os.getgid(), user_name=_user_name())
    containers = StepContainers(client)
    log.info("steps run in containers of %s (label %s=%s)", ", ".join(step_images()), LABEL, containers.token)
    try:
        with kfp_runs_containers_with(containers), removed_on_signal(containers):
            yield local.DockerRunner(**arguments)
    finally:
        containers.stop()  # what a failure left behind: the steps a fan-out still ran
        client.close()


def check_engine() -> None:
    """One line, before anything runs, when `--runner docker` cannot run (see checked_engine)."""
    checked_engine().close()


def _user_name() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no USER variable and no passwd entry: the uid stands for it
        return str(os.getuid())
