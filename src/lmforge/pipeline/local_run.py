"""The embedded default: the compiled DAG executed by KFP's local runner on this machine.

In: a validated run config with absolute local paths, and the runner. Out: the pipeline's
outputs (model URI, perplexity, MLflow run) plus where everything landed.

- `subprocess` (the default): KFP's SubprocessRunner runs each lightweight component in a
  subprocess of this Python (no Docker, no venv per task);
- `docker`: KFP's DockerRunner runs each one in a container of the steps image
  (lmforge.pipeline.docker_run says what the containers see).

KFP's working files are under `<storage.root>/kfp-local` either way, and so is the run's
scratch, removed when the run ends: the files the steps report to (`lmforge.steps`). The steps'
temporary directory (TMPDIR) is a short folder of the system's, removed with it, so that KFP's
`tmp.*` folders (ephemeral_component.py), torchrun's and multiprocessing's leave nothing behind.

A run that fails or is stopped ends its MLflow run FAILED or KILLED, tagged with the failing
step and the one-line error (`lmforge.tracking`): the step does it where it can; the run does
it here where the step could not (it was killed, or failed before the MLflow run existed).
SIGTERM or SIGINT stops the run gracefully: the running step stops itself (SIGTERM is passed
on to it; Ctrl-C's SIGINT reached it already), no further step starts, and `lmforge run`
exits 128 + the signal once the step has ended.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge import steps, tracking
from lmforge.io import storage
from lmforge.config import RunConfig
from lmforge.errors import LmforgeError
from lmforge.interrupts import STOP_SIGNALS, Interrupted

log = logging.getLogger(__name__)

RUNNERS = ("subprocess", "docker")


def check_runner(cfg: RunConfig, runner: str) -> None:
    """What `runner` needs, checked before anything runs (one line when it is missing)."""
    if runner not in RUNNERS:
        raise LmforgeError(f"--runner {runner}: unknown; use one of {', '.join(RUNNERS)}")
    if runner == "docker":
        if cfg.train.launcher == "pytorchjob":
            raise LmforgeError(
                "--runner docker trains inside the train step's container: set train.launcher=local "
                "(a PyTorchJob needs a cluster: lmforge submit)"
            )
        from lmforge.pipeline import docker_run

        docker_run.check_engine()


def run_pipeline(cfg: RunConfig, runner: str = "subprocess") -> dict[str, Any]:
    from kfp import local

    from lmforge.pipeline.definition import lmforge_pipeline

    # KFP's own working files (task outputs) stay on this machine even when storage.root is on S3.
    local_root = storage.local_path(cfg.storage.root)
    kfp_root = local_root / "kfp-local" if local_root is not None else steps.scratch_dir("kfp-local")
    kfp_root.mkdir(parents=True, exist_ok=True)
    # This process's own temporary files stay in the system's directory: gettempdir() reads TMPDIR
    # once, so it is read now, before TMPDIR names the run's scratch for the steps.
    tempfile.gettempdir()
    # Under KFP's pipeline root, which a step container has mounted at the same path: the runner itself
    # only says "FAILURE", the steps report here what failed and which MLflow run is the pipeline's.
    # The steps' TMPDIR is a short folder of the system's temporary directory, not one under the
    # storage root: Unix socket paths are limited to 107 bytes, and multiprocessing's listeners
    # (pymp-*, which torch's DataLoader workers use to pass tensors) live in TMPDIR; a deep one
    # makes them fail and training hang. Removed with the run like the rest of the scratch.
    with tempfile.TemporaryDirectory(prefix="run-", dir=kfp_root, ignore_cleanup_errors=True) as tmp, \
            tempfile.TemporaryDirectory(prefix="lmforge-", ignore_cleanup_errors=True) as steps_tmp:
        scratch = RunScratch(Path(tmp), Path(steps_tmp))
        with _environment(scratch.environment()), _print_kept(), _stops_passed_to_steps() as stops, \
                _kfp_runner(runner, cfg, kfp_root) as kfp_runner:
            local.init(runner=kfp_runner, pipeline_root=str(kfp_root))
            try:
                outputs = lmforge_pipeline(config_json=cfg.to_json()).outputs
            except BaseException as exc:
                raise _ended_early(cfg, exc, stops.signum, scratch) from None
    mlflow_run_id = outputs["mlflow_run_id"]
    return {
        "model_uri": outputs["model_uri"],
        "perplexity": float(outputs["perplexity"]),
        "mlflow_run_id": mlflow_run_id,
        "tracking_uri": steps.tracking_uri(cfg),
        "run_dir": str(_run_dir_of(cfg, mlflow_run_id)),
    }


@contextlib.contextmanager
def _kfp_runner(runner: str, cfg: RunConfig, kfp_root: Path) -> Iterator[Any]:
    from kfp import local

    if runner == "docker":
        from lmforge.pipeline.docker_run import docker_runner

        with docker_runner(cfg, kfp_root) as docker:
            yield docker
    else:
        yield local.SubprocessRunner(use_venv=False)


@dataclass(frozen=True)
class RunScratch:
    """The run's scratch directory: the steps' reports and their temporary directory."""

    root: Path
    tmp: Path  # the steps' TMPDIR

    @property
    def error_file(self) -> Path:
        return self.root / "error"

    @property
    def run_file(self) -> Path:
        return self.root / "mlflow-run"

    def environment(self) -> dict[str, str]:
        """What the steps are told (docker_run passes LMFORGE_* into the step containers, and leaves
        TMPDIR out: a container's /tmp goes with it)."""
        return {steps.ERROR_FILE_ENV: str(self.error_file), steps.RUN_FILE_ENV: str(self.run_file),
                "TMPDIR": str(self.tmp)}

    def reported(self, path: Path) -> str:
        return path.read_text(encoding="utf-8").strip() if path.is_file() else ""


@contextlib.contextmanager
def _environment(values: Mapping[str, str]) -> Iterator[None]:
    """`values` set in this process's environment (what the steps inherit) for the duration."""
    previous = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.contextmanager
def _print_kept() -> Iterator[None]:
    """builtins.print as it was afterwards. KFP's local runner indents the task logs by replacing
    builtins.print for each task (kfp.local.logging_utils.indented_print), which is not thread-safe:
    two fan-out tasks that overlap leave an indenting print behind, and "lmforge: error: ..." came
    out 4 spaces in."""
    import builtins

    original = builtins.print
    try:
        yield
    finally:
        builtins.print = original


# --------------------------------------------------------------------------- a run that ends early

#: KFP's last word on a failed run: "Pipeline 'lmforge' finished with status FAILURE. Inner task failed:
#: 'train'." (kfp.local.pipeline_orchestrator, the names in terminal colours), innermost task first.
_KFP_FAILED_TASK = re.compile(r"Inner task failed: '([^']+)'")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _ended_early(cfg: RunConfig, exc: BaseException, signum: int | None, scratch: RunScratch) -> BaseException:
    """What `lmforge run` raises for a pipeline that failed or was stopped, once its MLflow run says so.

    The failing step and its line come from the step's report; without one (the step was killed,
    or KFP's own code around it failed) the step is the task KFP names."""
    if signum is None and isinstance(exc, Interrupted):
        signum = exc.signum  # a stop the docker runner's handler took
    elif signum is None and isinstance(exc, KeyboardInterrupt):
        signum = signal.SIGINT
    report = scratch.reported(scratch.error_file)
    step, line = steps.parse_failure_message(report)
    if step is None:
        said = _ANSI.sub("", str(exc)) or type(exc).__name__
        found = _KFP_FAILED_TASK.search(said)
        step = found.group(1) if found else "lmforge run"
        if signum:
            line = str(Interrupted(signum))
        elif isinstance(exc, LmforgeError):  # lmforge's own code in this process (the docker runner's)
            line = tracking.failure_line(exc)
        elif found:
            line = (f"the {step} task failed without a word from lmforge (it was killed, or KFP's code around "
                    "the step failed); its log above says why")
        else:
            line = f"the pipeline failed ({said}); the log above says why"
        report = line
    _record_in_mlflow(cfg, scratch, status="KILLED" if signum else "FAILED", step=step, line=line)
    return Interrupted(signum) if signum else LmforgeError(report)


def _record_in_mlflow(cfg: RunConfig, scratch: RunScratch, *, status: str, step: str, line: str) -> None:
    """The pipeline's MLflow run ended `status` where no step ended it; a run of its own when the
    failure came before any step made one. Best effort: an MLflow that cannot be reached must not
    hide the failure itself."""
    uri = steps.tracking_uri(cfg)
    try:
        run_id = scratch.reported(scratch.run_file)
        if run_id:
            tracking.end_unfinished_run(uri, run_id, status=status, step=step, error=line)
        else:
            tracking.record_failed_pipeline(uri, cfg.tracking.experiment, run_name=f"{cfg.name}-{status.lower()}",
                                            storage_root=cfg.storage.root, status=status, step=step, error=line)
    except Exception as exc:  # noqa: BLE001 - reported, and the run's own failure raised after it
        log.warning("could not record the run's end in MLflow at %s: %s", uri, tracking.failure_line(exc))


class _Stops:
    signum: int | None = None


@contextlib.contextmanager
def _stops_passed_to_steps() -> Iterator[_Stops]:
    """SIGTERM and SIGINT while the pipeline runs end it gracefully: the first is passed on to the
    running steps (SIGTERM only: Ctrl-C's SIGINT reached them with this process, and a second
    copy would cut their cleanup short), no further step starts (KFP's subprocess call fails at
    once), and KFP sees the stopped step fail, which ends the run. Later signals are ignored.
    The docker runner's own handlers take over while it runs (lmforge.pipeline.docker_run)."""
    from kfp.local import subprocess_task_handler

    stops = _Stops()

    def stop(signum: int, frame: Any) -> None:
        if stops.signum is not None:
            return
        stops.signum = signum
        if signum == signal.SIGTERM:
            for pid in _step_processes():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signum)

    start_step = subprocess_task_handler.run_local_subprocess

    def start_unless_stopped(*args: Any, **kwargs: Any) -> int:
        return 128 + stops.signum if stops.signum is not None else start_step(*args, **kwargs)

    previous = {sig: signal.signal(sig, stop) for sig in STOP_SIGNALS}
    subprocess_task_handler.run_local_subprocess = start_unless_stopped
    try:
        yield stops
    finally:
        subprocess_task_handler.run_local_subprocess = start_step
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _step_processes() -> list[int]:
    """The running steps' processes. KFP's subprocess runner starts each step as `sh -ec '...; python3
    -m kfp.dsl.executor_main ...'`, and a shell that gets SIGTERM dies at once and leaves its child
    running, so the step is the shell's child. Read from /proc (Linux); none found elsewhere, where
    the running step then ends by itself."""
    found = []
    for child in _children(os.getpid()):
        found.extend(_children(child) or [child])
    return found


def _children(pid: int) -> list[int]:
    pids: list[int] = []
    for listing in Path(f"/proc/{pid}/task").glob("*/children"):
        with contextlib.suppress(OSError):
            pids.extend(int(p) for p in listing.read_text().split())
    return pids


def _run_dir_of(cfg: RunConfig, mlflow_run_id: str) -> str:
    """The run's output directory, read from the MLflow run's pipeline-run tag."""
    from mlflow import MlflowClient

    from lmforge.tracking import PIPELINE_RUN_TAG

    run = MlflowClient(steps.tracking_uri(cfg)).get_run(mlflow_run_id)
    return steps.run_dir(cfg, run.data.tags[PIPELINE_RUN_TAG])
