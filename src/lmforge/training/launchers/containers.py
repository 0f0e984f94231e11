"""An emulated PyTorchJob whose replicas are containers of the trainer image (train.local_replicas: containers).

In: the trainer image, the job's name, the worker's arguments, one environment per replica
(`distributed.operator_env`: what the Training Operator injects into pod i) and the job's backoff
limit. Out: the job's `Outcome` (status 0, the failing replica's exit code, or 143 when the
launcher was stopped). What a cluster would do, on one Docker engine:

- replica i is a container named as the operator names its pod (`<job>-master-0`,
  `<job>-worker-<i-1>`), running the image's entrypoint (`lmforge worker`) with host networking
  (MASTER_ADDR is this host), the operator's variables and only the credentials and endpoints a
  worker needs from this process's environment (`replica_env`), no volume: the data-bin, the
  checkpoints and the metrics travel through S3 and the tracking server, as between pods;
- `restartPolicy: ExitCode` (`decide`): a replica that exits 128-255 (137 after `docker kill` or
  an OOM kill, 138 a lost peer, 143 SIGTERM) is replaced by a fresh container of the same name and
  environment, as the operator deletes and recreates the pod, up to the backoff limit (restarts
  counted over the whole job); 1-127 fails the job and the other replicas are stopped
  (cleanPodPolicy Running); the job succeeds when the Master exits 0;
- every container's log is streamed into this process's stderr, each line prefixed `[name]`;
- SIGTERM or SIGINT to this process, a failure, or success: every container is stopped (SIGTERM,
  then SIGKILL after the pod's grace period) and removed. None outlives `run_job`.

    lmforge train --config tiny.yaml --set train.nnodes=2 --set train.nproc=1 --set train.local_replicas=containers \\
        --data-bin s3://... --checkpoints s3://...
"""

from __future__ import annotations

import enum
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

from lmforge.errors import LmforgeError
from lmforge.training.launchers.pytorchjob import TERMINATION_GRACE_S
from lmforge.training.worker import CACHE_ENV, EXIT_TERMINATED, retryable

log = logging.getLogger(__name__)

__all__ = ["Action", "Outcome", "decide", "engine_problems", "replica_env", "replica_names", "run_job",
           "sharing_problems"]

#: Where a replica keeps its data-bin copy and checkpoints before upload: the container's own disk,
#: as a pod's scratch volume (a cache_dir of this machine means nothing inside the container).
REPLICA_CACHE = "/tmp/lmforge-cache"
#: What a worker needs from the launcher's environment: S3 credentials and endpoint, MLflow's
#: credentials and settings, the log level. Variables naming files of this machine are left out.
FORWARDED_PREFIXES = ("AWS_", "MLFLOW_")
FORWARDED_NAMES = ("LOGLEVEL",)
HOST_FILE_VARIABLES = ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_CA_BUNDLE")
JOB_LABEL = "lmforge.io/job"
KILLED = 128 + signal.SIGKILL


# ------------------------------------------------------------------ pure: names, environments, the policy


def replica_names(job: str, nnodes: int) -> list[str]:
    """The operator's pod names: the Master is replica 0, Worker i is replica i + 1."""
    return [f"{job}-master-0"] + [f"{job}-worker-{i}" for i in range(nnodes - 1)]


def replica_env(environ: Mapping[str, str], operator_vars: Mapping[str, str]) -> dict[str, str]:
    """A replica's environment: the operator's variables, the worker's credentials and endpoints
    from `environ` (AWS_*, MLFLOW_*, LOGLEVEL) and its cache on the container's disk; nothing else."""
    forwarded = {
        name: value for name, value in environ.items()
        if (name.startswith(FORWARDED_PREFIXES) or name in FORWARDED_NAMES)
        and name not in HOST_FILE_VARIABLES and not name.endswith("_FILE")
    }
    return {**forwarded, **operator_vars, CACHE_ENV: REPLICA_CACHE}


def sharing_problems(data_bin: str, checkpoint_uri: str, tracking_uri: str | None) -> list[str]:
    """What the replica containers could not reach: a local data-bin or checkpoint location, a
    tracking store in a file (`tracking_uri` None: no metrics are logged)."""
    from lmforge import tracking
    from lmforge.io import storage

    problems = [
        f"train.local_replicas: containers share no disk with this machine, so the {what} {location} must be "
        "in S3 (set storage.root to s3://bucket/prefix)"
        for what, location in (("data-bin", data_bin), ("checkpoint location", checkpoint_uri))
        if storage.local_path(location) is not None
    ]
    if tracking_uri is not None and tracking.is_local_store(tracking_uri):
        problems.append(
            f"tracking.uri: {tracking_uri or '(empty)'} is a file store the replica containers "
            "(train.local_replicas: containers) cannot reach; set it to an MLflow server's http(s):// URI"
        )
    return problems


class Action(enum.Enum):
    DONE = "done"  # exited 0
    RESTART = "restart"  # a retryable exit within the backoff limit: a fresh container
    FAIL = "fail"  # a permanent exit, or the backoff limit is spent: the job fails


def decide(exit_code: int, restarts: int, backoff_limit: int) -> Action:
    """restartPolicy ExitCode for one replica's exit, given the job's restarts so far."""
    if exit_code == 0:
        return Action.DONE
    if retryable(exit_code) and restarts < backoff_limit:
        return Action.RESTART
    return Action.FAIL


@dataclass(frozen=True)
class Outcome:
    """How the job ended: status 0 (the Master succeeded), a replica's exit code, or 143 (stopped)."""

    status: int
    reason: str = ""
    restarts: int = 0
    stopped_by: int = 0  # the signal that stopped the job from outside, if one did


# ------------------------------------------------------------------ the engine


def engine_problems(image: str) -> list[str]:
    """Why the replica containers cannot start here: no Docker engine, or no trainer image in it."""
    import docker
    from docker.errors import DockerException, ImageNotFound

    where = os.environ.get("DOCKER_HOST") or "the default socket"
    try:
        client = docker.from_env()
        client.ping()
    except DockerException as exc:
        first = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        return [f"train.local_replicas: containers need a Docker engine; none answers at {where} ({first}); "
                "set DOCKER_HOST"]
    try:
        client.images.get(image)
    except ImageNotFound:
        return [f"train.pytorchjob.image: {image} is not in the Docker engine at {where}; build it with "
                "`lmforge images build --role trainer --trainer-variant cpu`"]
    finally:
        client.close()
    return []


class LogFollower(threading.Thread):
    """Streams one container's output into `out`, each line prefixed with its name; remembers the last line."""

    def __init__(self, container: Any, name: str, out: TextIO) -> None:
        super().__init__(name=f"log-{name}", daemon=True)
        self.container, self.prefix, self.out = container, f"[{name}] ", out
        self.last_line = ""

    def run(self) -> None:
        pending = b""
        try:
            for chunk in self.container.logs(stream=True, follow=True):
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    self._write(line)
        except Exception as exc:  # the container went away under the stream: its log ends here
            log.debug("log of %s ended: %s", self.prefix, exc)
        if pending:
            self._write(pending)

    def _write(self, raw: bytes) -> None:
        text = raw.decode("utf-8", "replace").rstrip("\r")
        if text.strip():
            self.last_line = text.strip()
        self.out.write(self.prefix + text + "\n")
        self.out.flush()


@dataclass
class Replica:
    name: str
    env: dict[str, str]
    container: Any = None
    follower: LogFollower | None = None
    done: bool = False

    def exit_code(self) -> int | None:
        """The container's exit code once it has stopped; None while it runs."""
        from docker.errors import NotFound

        try:
            self.container.reload()
        except NotFound:  # removed from outside (docker rm -f): a deleted pod, which the operator recreates
            return KILLED
        state = self.container.attrs["State"]
        return None if state["Status"] in ("created", "running", "restarting", "paused") else int(state["ExitCode"])


@dataclass
class Supervisor:
    """Starts the replicas, applies the ExitCode policy to their exits, and cleans up (see the module docstring)."""

    client: Any
    image: str
    job: str
    command: list[str]
    backoff_limit: int
    out: TextIO = field(default_factory=lambda: sys.stderr)
    grace_s: float = TERMINATION_GRACE_S  # the pod's: the worker saves and uploads a checkpoint in it
    poll_s: float = 0.5
    signals: list[int] = field(default_factory=list)

    def run(self, envs: Sequence[dict[str, str]]) -> Outcome:
        replicas = [Replica(name, dict(env)) for name, env in zip(replica_names(self.job, len(envs)), envs)]
        previous = self._catch_signals()
        try:
            outcome = self._supervise(replicas)
        finally:
            self._stop_and_remove(replicas)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if self.signals and outcome.status == 0:  # stopped while the job was ending: still a stop
            return Outcome(EXIT_TERMINATED, f"stopped by {signal.Signals(self.signals[0]).name}", outcome.restarts,
                           stopped_by=self.signals[0])
        return outcome

    def _supervise(self, replicas: list[Replica]) -> Outcome:
        for replica in replicas:
            self._remove_leftover(replica.name)
        for replica in replicas:
            self._start(replica)
        restarts = 0
        while True:
            if self.signals:
                name = signal.Signals(self.signals[0]).name
                log.warning("%s: stopping the replicas of %s", name, self.job)
                return Outcome(EXIT_TERMINATED, f"stopped by {name}", restarts, stopped_by=self.signals[0])
            for index, replica in enumerate(replicas):
                code = None if replica.done else replica.exit_code()
                if code is None:
                    continue
                action = decide(code, restarts, self.backoff_limit)
                if action is Action.DONE:
                    replica.done = True
                    if index == 0:  # the operator's success policy: the job succeeds with its Master
                        log.info("%s succeeded (%d restart(s))", self.job, restarts)
                        return Outcome(0, "", restarts)
                elif action is Action.RESTART:
                    restarts += 1
                    log.warning("%s exited with %d (retryable): restarting it (restart %d of %d)",
                                replica.name, code, restarts, self.backoff_limit)
                    self._remove(replica)
                    self._start(replica)
                else:
                    last = self._last_line(replica)
                    why = (f"the backoff limit of {self.backoff_limit} restart(s) is spent "
                           "(train.pytorchjob.backoff_limit)") if retryable(code) else "a permanent failure"
                    return Outcome(code, f"{replica.name} exited with {code}, {why}" + (f": {last}" if last else ""),
                                   restarts)
            time.sleep(self.poll_s)

    # -------------------------------------------------------------- containers

    def _start(self, replica: Replica) -> None:
        from docker.errors import DockerException

        try:
            replica.container = self.client.containers.run(
                self.image, command=self.command, name=replica.name, environment=replica.env,
                network_mode="host", detach=True, labels={JOB_LABEL: self.job},
            )
        except DockerException as exc:
            raise LmforgeError(f"cannot start replica container {replica.name} of {self.image}: "
                               f"{str(exc).splitlines()[0][:200]}") from None
        replica.follower = LogFollower(replica.container, replica.name, self.out)
        replica.follower.start()

    def _last_line(self, replica: Replica) -> str:
        if replica.follower is None:
            return ""
        replica.follower.join(timeout=10)  # the container has exited: its log ends shortly
        return replica.follower.last_line

    def _remove(self, replica: Replica) -> None:
        """Remove the replica's container (SIGKILL first when it still runs), its log shown to the end."""
        from docker.errors import NotFound

        if replica.exit_code() is not None:
            self._last_line(replica)  # the whole log of an exited container before it goes
        try:
            replica.container.remove(force=True)
        except NotFound:
            pass
        if replica.follower is not None:
            replica.follower.join(timeout=5)

    def _remove_leftover(self, name: str) -> None:
        """A container of this name left by an earlier launcher of the same job (killed with -9): replaced."""
        from docker.errors import NotFound

        try:
            leftover = self.client.containers.get(name)
        except NotFound:
            return
        log.warning("removing container %s left by an earlier attempt of %s", name, self.job)
        leftover.remove(force=True)

    def _stop_and_remove(self, replicas: Sequence[Replica]) -> None:
        """SIGTERM to every running replica (each saves a checkpoint), SIGKILL after the grace period, then
        remove them all. Signals arriving meanwhile are only recorded: nothing interrupts the cleanup."""
        from docker.errors import APIError, NotFound

        started = [replica for replica in replicas if replica.container is not None]
        running = []
        for replica in started:
            try:
                if replica.exit_code() is None:
                    replica.container.kill(signal="SIGTERM")
                    running.append(replica)
            except (NotFound, APIError):  # gone, or exited between the check and the signal
                pass
        deadline = time.monotonic() + self.grace_s
        while running and time.monotonic() < deadline:
            running = [replica for replica in running if replica.exit_code() is None]
            time.sleep(self.poll_s)
        for replica in started:
            try:
                self._remove(replica)  # force: SIGKILL for one still running
            except APIError as exc:
                log.warning("cannot remove container %s: %s", replica.name, exc)

    def _catch_signals(self) -> dict[int, Any]:
        """SIGTERM and SIGINT only recorded (the loop stops the job): a second one cannot cut the cleanup short."""
        if threading.current_thread() is not threading.main_thread():
            return {}
        return {sig: signal.signal(sig, lambda signum, frame: self.signals.append(signum))
                for sig in (signal.SIGTERM, signal.SIGINT)}


def run_job(image: str, job: str, command: list[str], envs: Sequence[dict[str, str]], *, backoff_limit: int,
            out: TextIO | None = None, grace_s: float = TERMINATION_GRACE_S) -> Outcome:
    """Run the replicas to the job's end on the engine of DOCKER_HOST (see the module docstring)."""
    import docker

    client = docker.from_env()
    try:
        supervisor = Supervisor(client, image, job, list(command), backoff_limit, out=out or sys.stderr,
                                grace_s=grace_s)
        return supervisor.run(envs)
    finally:
        client.close()
