"""The embedded default: the compiled DAG executed by KFP's local runner on this machine.

In: a validated run config with absolute local paths, and the runner. Out: the pipeline's
outputs (model URI, perplexity, MLflow run) plus where everything landed.

- `subprocess` (the default): KFP's SubprocessRunner runs each lightweight component in a
  subprocess of this Python (no Docker, no venv per task);
- `docker`: KFP's DockerRunner runs each one in a container of the steps image
  (lmforge.pipeline.docker_run says what the containers see).

KFP's working files are under `<storage.root>/kfp-local` either way.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lmforge import steps
from lmforge.io import storage
from lmforge.config import RunConfig
from lmforge.errors import LmforgeError

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
    # A failing step writes its one-line reason here; the runner itself only says "FAILURE". Under KFP's
    # pipeline root, which a step container has mounted at the same path.
    with tempfile.TemporaryDirectory(prefix="errors-", dir=kfp_root) as tmp, \
            _environment(steps.ERROR_FILE_ENV, str(Path(tmp) / "error")) as error_file, \
            _kfp_runner(runner, cfg, kfp_root) as kfp_runner:
        local.init(runner=kfp_runner, pipeline_root=str(kfp_root))
        try:
            outputs = lmforge_pipeline(config_json=cfg.to_json()).outputs
        except RuntimeError as exc:
            if Path(error_file).is_file():
                raise LmforgeError(Path(error_file).read_text().strip()) from None
            raise LmforgeError(f"the pipeline failed ({exc}); the step's log above says why") from None
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


@contextlib.contextmanager
def _environment(name: str, value: str) -> Iterator[str]:
    """`name` set to `value` in this process's environment (what the steps inherit) for the duration."""
    previous = os.environ.get(name)
    os.environ[name] = value
    try:
        yield value
    finally:
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous


def _run_dir_of(cfg: RunConfig, mlflow_run_id: str) -> str:
    """The run's output directory, read from the MLflow run's pipeline-run tag."""
    from mlflow import MlflowClient

    from lmforge.tracking import PIPELINE_RUN_TAG

    run = MlflowClient(steps.tracking_uri(cfg)).get_run(mlflow_run_id)
    return steps.run_dir(cfg, run.data.tags[PIPELINE_RUN_TAG])
