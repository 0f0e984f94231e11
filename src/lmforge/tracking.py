"""MLflow tracking: one MLflow run per pipeline run, shared by every step.

In: the tracking URI, the experiment name and the pipeline run id (KFP's job
id). Out: the MLflow run id. Every step finds the MLflow run tagged with its
pipeline run id, or creates it, so steps need no extra wiring and a retried step
logs into the same run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lmforge.errors import LmforgeError

PIPELINE_RUN_TAG = "lmforge.pipeline_run_id"

log = logging.getLogger(__name__)


def default_tracking_uri(storage_root: str | Path) -> str:
    """A SQLite file beside the run outputs; with outputs on S3, the server MLFLOW_TRACKING_URI names."""
    if str(storage_root).startswith("s3://"):
        if os.environ.get("MLFLOW_TRACKING_URI"):
            return os.environ["MLFLOW_TRACKING_URI"]
        raise LmforgeError(
            "storage.root is on S3, so MLflow cannot live beside it: set tracking.uri (or MLFLOW_TRACKING_URI) "
            "to a tracking server or a local sqlite:/// file"
        )
    return f"sqlite:///{Path(storage_root).resolve() / 'mlflow.db'}"


def resolve_tracking_uri(configured: str, storage_root: str | Path) -> str:
    return configured or default_tracking_uri(storage_root)


def _experiment_id(client: Any, name: str, storage_root: str | Path | None) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    location = None
    if storage_root is not None and not str(storage_root).startswith("s3://"):
        # Without it MLflow puts artifacts in ./mlruns of whatever directory the
        # step happens to run in.
        location = (Path(storage_root).resolve() / "mlartifacts").as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except Exception:  # created meanwhile by a parallel step
        return client.get_experiment_by_name(name).experiment_id


def pipeline_run(
    tracking_uri: str, experiment: str, pipeline_run_id: str, *, run_name: str | None = None,
    storage_root: str | Path | None = None,
) -> str:
    """The MLflow run id for this pipeline run, created on first use."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    if tracking_uri.startswith(("http://", "https://")):
        storage_root = None  # a tracking server decides where artifacts go (its --artifacts-destination)
    experiment_id = _experiment_id(client, experiment, storage_root)
    found = client.search_runs(
        [experiment_id], filter_string=f"tags.`{PIPELINE_RUN_TAG}` = '{pipeline_run_id}'", max_results=1
    )
    if found:
        return found[0].info.run_id
    run = client.create_run(experiment_id, run_name=run_name, tags={PIPELINE_RUN_TAG: pipeline_run_id})
    return run.info.run_id


@contextlib.contextmanager
def active_run(tracking_uri: str, run_id: str) -> Iterator[Any]:
    """Make `run_id` mlflow's active run for the duration of a step."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    with mlflow.start_run(run_id=run_id) as run:
        yield run


def log_params_flat(params: dict[str, Any], prefix: str = "") -> None:
    """Log a nested dict as dotted MLflow params (values as compact JSON where not scalar)."""
    import mlflow

    flat: dict[str, str] = {}

    def walk(node: dict[str, Any], path: str) -> None:
        for key, value in node.items():
            name = f"{path}{key}"
            if isinstance(value, dict) and value:
                walk(value, name + ".")
            else:
                flat[name] = value if isinstance(value, str) else json.dumps(value)

    walk(params, prefix)
    mlflow.log_params(flat)


class FairseqMetricsHandler(logging.Handler):
    """Forwards fairseq's JSON progress lines to MLflow, each at step = number of updates.

    fairseq logs stats through `fairseq.logging.progress_bar`, renaming the
    logger to the tag ('train_inner', 'train', 'valid') for the duration of the
    line; with --log-format json the message is the stats dict.
    """

    # fairseq's stat name -> the MLflow metric name for that tag
    KEEP = {
        "train_inner": {"loss": "train_loss", "ppl": "train_ppl", "wps": "train_wps", "lr": "lr"},
        "train": {"train_loss": "train_epoch_loss", "train_ppl": "train_epoch_ppl", "train_wps": "train_epoch_wps"},
        "valid": {"valid_loss": "valid_loss", "valid_ppl": "valid_ppl"},
    }

    def __init__(self, client: Any, run_id: str) -> None:
        super().__init__()
        self.client = client
        self.run_id = run_id

    @staticmethod
    def metrics(tag: str, message: str) -> tuple[int, dict[str, float]] | None:
        """(step, metrics) from one fairseq progress line, None for other lines. Pure."""
        keep = FairseqMetricsHandler.KEEP.get(tag)
        if keep is None:
            return None
        try:
            stats = json.loads(message)
        except ValueError:
            return None
        step_key = "valid_num_updates" if tag == "valid" else ("train_num_updates" if tag == "train" else "num_updates")
        if step_key not in stats:
            return None
        values = {}
        for key, name in keep.items():
            if key in stats:
                try:
                    values[name] = float(stats[key])
                except (TypeError, ValueError):
                    continue
        return int(float(stats[step_key])), values

    def emit(self, record: logging.LogRecord) -> None:
        parsed = self.metrics(record.name, record.getMessage())
        if parsed is None:
            return
        step, values = parsed
        try:
            for name, value in values.items():
                self.client.log_metric(self.run_id, name, value, step=step)
        except Exception:  # tracking must never kill a training job
            log.warning("could not log metrics to MLflow", exc_info=True)


def log_corpus_inputs(source: str, manifest: dict[str, Any], name: str) -> None:
    """Each split as an MLflow dataset input of the active run (Inputs tab), digest = its sha256."""
    import mlflow
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    dataset_source = resolve_dataset_source(source if "://" in source else Path(source).resolve().as_uri())
    for split, info in manifest["splits"].items():
        # MLflow stores at most 36 characters of digest; the full sha256 is in the manifest artifact.
        dataset = MetaDataset(dataset_source, name=f"{name}-{split}", digest=info["sha256"][:36])
        mlflow.log_input(dataset, context=split)
