"""MLflow tracking: one MLflow run per pipeline run, shared by every step.

In: the tracking URI, the experiment name and the pipeline run id (KFP's job
id). Out: the MLflow run id. Every step finds the MLflow run tagged with its
pipeline run id, or creates it, so steps need no extra wiring and a retried step
logs into the same run.

`step_run` is the one way a step logs into that run, and what it leaves behind is
one rule: every step leaves the run RUNNING; a step that fails ends it FAILED, one
stopped by a signal (SIGTERM, Ctrl-C) ends it KILLED, either way tagged
`lmforge.failed_step` (the step's name) and `lmforge.error` (the one line that says
why); the last step of the DAG (register) ends it FINISHED. The caller's fluent state
(active run, tracking URI and MLFLOW_TRACKING_URI) is as it was afterwards. What a step
cannot record (it was killed, or failed before the MLflow run existed) the command that
ran the pipeline records: `end_unfinished_run`, `record_failed_pipeline`.

    lmforge run --config pipelines/configs/tiny.yaml    # train, evaluate, register log here
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
from lmforge.interrupts import Interrupted, is_stop

PIPELINE_RUN_TAG = "lmforge.pipeline_run_id"
FAILED_STEP_TAG = "lmforge.failed_step"
ERROR_TAG = "lmforge.error"
#: MLflow keeps tag values of up to 5000 characters in older stores (8000 now); the line is cut long before.
ERROR_CHARS = 500

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


def is_local_store(tracking_uri: str) -> bool:
    """Whether the tracking store is a file on this machine (a SQLite database, an mlruns folder),
    which a pod or container sharing no disk with it cannot reach."""
    return tracking_uri.startswith(("sqlite:", "file:")) or "://" not in tracking_uri


def sqlite_file(tracking_uri: str) -> Path | None:
    """The database file a sqlite:// tracking URI names (relative to the current directory, as
    SQLAlchemy reads sqlite:///x.db); None for other URIs and for an in-memory database."""
    if not tracking_uri.startswith("sqlite:"):
        return None
    from sqlalchemy.engine import make_url

    database = make_url(tracking_uri).database
    return Path(database) if database and database != ":memory:" else None


def existing_registry_client(tracking_uri: str) -> Any:
    """An MlflowClient of a tracking store that must exist already: the commands that only look at
    the registry (`lmforge models`, `lmforge promote`). MLflow creates an empty SQLite database
    at any path it is given, so a mistyped path would read as "no such model"; it is refused here,
    before the client is made (which is when MLflow creates the file)."""
    path = sqlite_file(tracking_uri)
    if path is not None and not path.is_file():
        raise LmforgeError(
            f"no MLflow database at {path.resolve()} (tracking URI {tracking_uri}); pass --tracking-uri "
            "sqlite:///PATH of an existing database (`lmforge run` makes STORAGE_ROOT/mlflow.db) or a server's http(s):// URI"
        )
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def failure_line(exc: BaseException) -> str:
    """One line saying why a step ended early: lmforge's own message, "stopped by SIGTERM", or, for
    a bug, the exception's type and the first line of its message (its traceback is in the log)."""
    if isinstance(exc, KeyboardInterrupt):
        text = "stopped by SIGINT"
    elif isinstance(exc, (LmforgeError, Interrupted)):
        text = str(exc)
    elif isinstance(exc, SystemExit):
        text = f"exited with status {exc.code}"
    else:
        text = f"{type(exc).__name__}: {exc}"
    return next((line.strip() for line in text.splitlines() if line.strip()), type(exc).__name__)


def ended_status(exc: BaseException) -> str:
    """The MLflow run status for a run a step left by `exc`: KILLED after a stop signal, else FAILED."""
    return "KILLED" if is_stop(exc) else "FAILED"


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
    experiment_id = _experiment_of(client, tracking_uri, experiment, storage_root)
    found = client.search_runs(
        [experiment_id], filter_string=f"tags.`{PIPELINE_RUN_TAG}` = '{pipeline_run_id}'", max_results=1
    )
    if found:
        return found[0].info.run_id
    run = client.create_run(experiment_id, run_name=run_name, tags={PIPELINE_RUN_TAG: pipeline_run_id})
    return run.info.run_id


def _experiment_of(client: Any, tracking_uri: str, experiment: str, storage_root: str | Path | None) -> str:
    if tracking_uri.startswith(("http://", "https://")):
        storage_root = None  # a tracking server decides where artifacts go (its --artifacts-destination)
    return _experiment_id(client, experiment, storage_root)


def _tag_failure(client: Any, run_id: str, step: str, error: str) -> None:
    client.set_tag(run_id, FAILED_STEP_TAG, step)
    client.set_tag(run_id, ERROR_TAG, error[:ERROR_CHARS])


def end_unfinished_run(tracking_uri: str, run_id: str, *, status: str, step: str, error: str) -> bool:
    """End run `run_id` `status` (FAILED or KILLED), tagged with the failing step and the error line,
    if it is still RUNNING: a step that was killed, whose container was removed, or that failed in
    KFP's code around lmforge's could not. A run a step has ended keeps its status and its tags
    (they are the step's own, more precise). True when ended here."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    if client.get_run(run_id).info.status != "RUNNING":
        return False
    _tag_failure(client, run_id, step, error)
    client.set_terminated(run_id, status)
    return True


def record_failed_pipeline(
    tracking_uri: str, experiment: str, *, run_name: str, storage_root: str | Path | None, status: str, step: str,
    error: str,
) -> str:
    """A run for a pipeline run that failed or was stopped before any step made its MLflow run (in
    configure, download or preprocessing), ended `status` with the failing step and the error line,
    so that the attempt is on record beside the others. It carries no pipeline-run tag: those steps
    do not know the pipeline run's id. Returns the run's id."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    run = client.create_run(_experiment_of(client, tracking_uri, experiment, storage_root), run_name=run_name)
    _tag_failure(client, run.info.run_id, step, error)
    client.set_terminated(run.info.run_id, status)
    return run.info.run_id


@contextlib.contextmanager
def use_tracking_uri(uri: str) -> Iterator[None]:
    """Use `uri` as the fluent API's tracking URI, then restore the caller's setting exactly.

    mlflow.set_tracking_uri also writes MLFLOW_TRACKING_URI into the environment, and
    resetting it to "unset" deletes that variable, so the variable is saved and put back by
    hand (mlflow's own private `_use_tracking_uri` would drop a caller's variable).
    """
    import mlflow
    from mlflow.tracking._tracking_service import utils

    saved_uri, saved_env = utils._tracking_uri, os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved_uri)
        if saved_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved_env


@contextlib.contextmanager
def step_run(tracking_uri: str, run_id: str, step: str, *, last: bool = False) -> Iterator[Any]:
    """Make `run_id` the fluent API's active run for one step, and leave it in the rule's state.

    On the way out the run is RUNNING, or FINISHED when `last` (the DAG's last step), or, when the
    body raised, FAILED (KILLED when a stop signal ended it: `ended_status`) with the tags
    FAILED_STEP_TAG = `step` and ERROR_TAG = `failure_line`; a step that succeeds after a failed
    attempt removes those tags. When the caller already has `run_id` active (a nested call, or a
    user's own `mlflow.start_run`), it is used as is: its owner decides its status, this only tags.
    Another active run stays active underneath (ours is started nested on top of it).
    """
    import mlflow
    from mlflow import MlflowClient

    with use_tracking_uri(tracking_uri):
        active = mlflow.active_run()
        if active is not None and active.info.run_id == run_id:
            try:
                yield active
            except BaseException as exc:
                _tag_failure(MlflowClient(tracking_uri), run_id, step, failure_line(exc))
                raise
            return
        # nested=True only when another run is active: the fluent API refuses a second run.
        run = mlflow.start_run(run_id=run_id, nested=active is not None)
        client = MlflowClient(tracking_uri)
        status = "FINISHED" if last else "RUNNING"
        try:
            yield run
            tags = client.get_run(run_id).data.tags
            for tag in (FAILED_STEP_TAG, ERROR_TAG):
                if tag in tags:
                    client.delete_tag(run_id, tag)  # this attempt succeeded: the run is no longer failed
        except BaseException as exc:
            status = ended_status(exc)
            _tag_failure(client, run_id, step, failure_line(exc))
            raise
        finally:
            # end_run pops the fluent run off the stack (and stops its system metrics); the
            # status it writes is the one the run is left in.
            mlflow.end_run(status=status)


def adopt_run(client: Any, run_id: str) -> tuple[str, str]:
    """(experiment name, pipeline run id) under which the steps find the existing MLflow run
    `run_id` (`lmforge register --run-id`): its experiment, and its pipeline-run tag (set now
    to `run_id` when it has none)."""
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
        experiment = client.get_experiment(run.info.experiment_id).name
    except MlflowException:
        raise LmforgeError(f"MLflow run {run_id} not found; pass --run-id of an existing run, or leave it out") from None
    pipeline_run_id = run.data.tags.get(PIPELINE_RUN_TAG)
    if not pipeline_run_id:
        pipeline_run_id = run_id
        client.set_tag(run_id, PIPELINE_RUN_TAG, pipeline_run_id)
    return experiment, pipeline_run_id


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
