"""The embedded default: the compiled DAG executed by KFP's local runner on this machine.

In: a validated run config with absolute local paths. Out: the pipeline's
outputs (model URI, perplexity, MLflow run) plus where everything landed.
KFP's SubprocessRunner runs each lightweight component in a subprocess of
this Python (no Docker, no venv per task), with its working files under
`<storage.root>/kfp-local`.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from lmforge import steps
from lmforge.io import storage
from lmforge.config import RunConfig
from lmforge.errors import LmforgeError

log = logging.getLogger(__name__)


def run_pipeline(cfg: RunConfig) -> dict[str, Any]:
    from kfp import local

    from lmforge.pipeline.definition import lmforge_pipeline

    # KFP's own working files (task outputs) stay on this machine even when storage.root is on S3.
    local_root = storage.local_path(cfg.storage.root)
    kfp_root = local_root / "kfp-local" if local_root is not None else steps.scratch_dir("kfp-local")
    kfp_root.mkdir(parents=True, exist_ok=True)
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(kfp_root))
    # A failing step writes its one-line reason here; the runner itself only says "FAILURE".
    with tempfile.TemporaryDirectory(prefix="lmforge-") as tmp:
        error_file = Path(tmp) / "error"
        previous = os.environ.get(steps.ERROR_FILE_ENV)
        os.environ[steps.ERROR_FILE_ENV] = str(error_file)
        try:
            outputs = lmforge_pipeline(config_json=cfg.to_json()).outputs
        except RuntimeError as exc:
            if error_file.is_file():
                raise LmforgeError(error_file.read_text().strip()) from None
            raise LmforgeError(f"the pipeline failed ({exc}); the step's log above says why") from None
        finally:
            if previous is None:
                os.environ.pop(steps.ERROR_FILE_ENV, None)
            else:
                os.environ[steps.ERROR_FILE_ENV] = previous
    mlflow_run_id = outputs["mlflow_run_id"]
    return {
        "model_uri": outputs["model_uri"],
        "perplexity": float(outputs["perplexity"]),
        "mlflow_run_id": mlflow_run_id,
        "tracking_uri": steps.tracking_uri(cfg),
        "run_dir": str(_run_dir_of(cfg, mlflow_run_id)),
    }


def _run_dir_of(cfg: RunConfig, mlflow_run_id: str) -> str:
    """The run's output directory, read from the MLflow run's pipeline-run tag."""
    from mlflow import MlflowClient

    from lmforge.tracking import PIPELINE_RUN_TAG

    run = MlflowClient(steps.tracking_uri(cfg)).get_run(mlflow_run_id)
    return steps.run_dir(cfg, run.data.tags[PIPELINE_RUN_TAG])
