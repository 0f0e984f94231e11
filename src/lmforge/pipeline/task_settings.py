"""Per-task Kubernetes settings of the compiled pipeline, one small function per concern.

In: a pipeline task and the `cluster` section of the config `lmforge compile
--config FILE` was given. Out: the same task, configured with the KFP DSL and
kfp-kubernetes (resources, node placement, Secrets as environment variables,
volumes, retries, caching). The pipeline function calls these next to each task:

    task = c.download(...)
    task_settings.data_stage(task, cluster, "download")
    task_settings.uses_storage(task, cluster)

The settings are fixed at compile time. `cluster` is None when the pipeline is
built for KFP's local runner (`lmforge run`): then only caching is set, since
the local runner has no pods to configure and would honour retries with their
back-off on a user's mistake.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

from kfp import kubernetes
from kfp.dsl import PipelineTask

from lmforge.config import ClusterConfig

# The keys of the Secrets (k8s/secrets.example.yaml); each becomes the environment variable of the same name.
S3_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
S3_OPTIONAL_KEYS = ("AWS_ENDPOINT_URL",)  # absent for AWS S3 itself
MLFLOW_OPTIONAL_KEYS = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
                        "MLFLOW_TRACKING_TOKEN")
SHM_VOLUME = "dshm"

_target: contextvars.ContextVar[ClusterConfig | None] = contextvars.ContextVar("lmforge_cluster", default=None)


@contextlib.contextmanager
def compiling_for(cluster: ClusterConfig | None) -> Iterator[None]:
    """The cluster settings the pipeline function sees while KFP builds it (None: the local runner)."""
    token = _target.set(cluster)
    try:
        yield
    finally:
        _target.reset(token)


def cluster() -> ClusterConfig | None:
    return _target.get()


def step_pod(task: PipelineTask, cluster: ClusterConfig | None, step: str) -> PipelineTask:
    """Every step's pod: its CPU and memory requests, node selector and tolerations."""
    if cluster is None:
        return task
    cpu = cluster.cpu_request.get(step, cluster.cpu_request.get("default"))
    memory = cluster.memory_request.get(step, cluster.memory_request.get("default"))
    if cpu:
        task.set_cpu_request(str(cpu))
    if memory:
        task.set_memory_request(str(memory))
    for key, value in sorted(cluster.node_selector.items()):
        kubernetes.add_node_selector(task, label_key=key, label_value=value)
    for t in cluster.tolerations:
        # add_toleration, not add_toleration_json: the latter reads 'toleration_seconds' and silently
        # drops the pod spec's 'tolerationSeconds', the key cluster.tolerations documents.
        kubernetes.add_toleration(task, key=t.get("key"), operator=t.get("operator"), value=t.get("value"),
                                  effect=t.get("effect"), toleration_seconds=t.get("tolerationSeconds"))
    return task


def data_stage(task: PipelineTask, cluster: ClusterConfig | None, step: str) -> PipelineTask:
    """A data stage: cached. Its inputs are its config slice and upstream digests, never the run id, and its
    outputs are named by content, so KFP's cache key is the content: a re-run with the same corpus and
    stage settings reuses the outputs, whatever else changed."""
    task.set_caching_options(True)
    return step_pod(task, cluster, step)


def never_cached(task: PipelineTask, cluster: ClusterConfig | None, step: str) -> PipelineTask:
    """Training, evaluation and registration: a re-run means new weights or a new model version are wanted."""
    task.set_caching_options(False)
    return step_pod(task, cluster, step)


def uses_storage(task: PipelineTask, cluster: ClusterConfig | None) -> PipelineTask:
    """A step that reads or writes storage.root: S3 credentials from their Secret (never a value in the
    YAML) and the shared volume where one is configured."""
    if cluster is None:
        return task
    if cluster.s3_secret:
        kubernetes.use_secret_as_env(task, cluster.s3_secret, {k: k for k in S3_KEYS})
        kubernetes.use_secret_as_env(task, cluster.s3_secret, {k: k for k in S3_OPTIONAL_KEYS}, optional=True)
    if cluster.pvc_name:
        kubernetes.mount_pvc(task, pvc_name=cluster.pvc_name, mount_path=cluster.pvc_mount_path)
    return task


def uses_mlflow(task: PipelineTask, cluster: ClusterConfig | None) -> PipelineTask:
    """A step that logs to MLflow: the server's URL and credentials from their Secret. Every key is
    optional, so a server without authentication needs only MLFLOW_TRACKING_URI (or tracking.uri)."""
    if cluster is None or not cluster.mlflow_secret:
        return task
    return kubernetes.use_secret_as_env(task, cluster.mlflow_secret, {k: k for k in MLFLOW_OPTIONAL_KEYS}, optional=True)


def network_step(task: PipelineTask, cluster: ClusterConfig | None) -> PipelineTask:
    """A step that talks to S3, MLflow, an HTTP server or the API server: retried with exponential back-off
    (30s, 60s, ... by default), for the failures a retry heals (a restarting MinIO or MLflow, an evicted
    pod). Every step is safe to re-run: outputs are written atomically under content-addressed names or
    the run's own directory, the MLflow run is found by the pipeline run id."""
    if cluster is None or cluster.retries == 0:
        return task
    return task.set_retry(
        num_retries=cluster.retries, backoff_duration=f"{cluster.retry_backoff_seconds}s", backoff_factor=2.0,
        backoff_max_duration="3600s",
    )


def torch_step(task: PipelineTask, cluster: ClusterConfig | None) -> PipelineTask:
    """A step that loads data with PyTorch: an in-memory /dev/shm, since DataLoader workers pass batches
    through shared memory and a container's default /dev/shm is 64Mi."""
    if cluster is None:
        return task
    return kubernetes.empty_dir_mount(
        task, volume_name=SHM_VOLUME, mount_path="/dev/shm", medium="Memory", size_limit=cluster.shm_size
    )
