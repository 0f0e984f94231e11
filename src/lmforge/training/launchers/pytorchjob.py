"""PyTorchJob launcher: training as a Kubeflow Training Operator job (kubeflow.org/v1).

In: the run config (train.pytorchjob, cluster sections), the worker's arguments and a job name
derived from the pipeline run. Out: the job's success, or an LmforgeError carrying the job's
own failure reason. On the way:

- `render` builds the manifest with kubeflow-training's and kubernetes' models: a Master and
  nnodes - 1 Workers running `lmforge worker` in a container named `pytorch`, nvidia.com/gpu and
  nprocPerNode (from which the operator derives each pod's variables, as
  `lmforge.training.distributed` reads them), /dev/shm as a memory emptyDir, node selectors and
  tolerations, credentials from the cluster section's Secrets (envFrom), runPolicy and
  `restartPolicy: ExitCode` (the worker's exit codes >= 128 are the retryable ones);
- `launch` creates the job, or attaches to the one an earlier attempt of the same step created
  (same name: KFP retries a failed step with the same pipeline run id), streams the Master's log
  into this step's log, waits for Succeeded or Failed with a timeout, and deletes the job when
  this step times out or is stopped: the first SIGTERM or SIGINT starts the delete, any signal
  after it is ignored until the delete is done, and the process then exits 128 + the first
  signal's number (143 after SIGTERM, 130 after SIGINT);
- the API's errors (k8s_api): 401/403 end the step at once with one line naming k8s/rbac.yaml,
  transient ones (429, 5xx, no answer) are waited out with exponential back-off, logged once each.

k8s/pytorchjob.yaml is `render`'s output for example inputs (a golden test keeps them equal).

    lmforge train --config wikitext-2.yaml --set train.launcher=pytorchjob --data-bin s3://... --checkpoints s3://...
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import signal
import sys
import threading
import time
from typing import Any

from lmforge.config import RunConfig
from lmforge.errors import LmforgeError
from lmforge.interrupts import Interrupted
from lmforge.training.distributed import OPERATOR_PORT, OPERATOR_PORT_NAME
from lmforge.training.launchers import k8s_api
from lmforge.training.worker import CACHE_ENV

log = logging.getLogger(__name__)

CONTAINER = "pytorch"  # the operator finds the training container by this name
CACHE_MOUNT = "/tmp"
# Time between SIGTERM and SIGKILL for a training pod: the worker saves and uploads a checkpoint in it.
TERMINATION_GRACE_S = 300
LABELS = {"app.kubernetes.io/name": "lmforge-trainer", "app.kubernetes.io/part-of": "lmforge"}
RUN_ANNOTATION = "lmforge.io/run"
_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


class StepTerminated(BaseException):
    """SIGTERM or SIGINT reached the launcher (the pipeline run was stopped, or Ctrl-C)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class StopSignals:
    """SIGTERM and SIGINT while a job is watched: the first raises StepTerminated in the main thread;
    every later one is only counted, so that nothing (a second SIGTERM from `timeout` or a
    supervisor, a Ctrl-C) interrupts the delete. Handlers log nothing: a write from a signal
    handler into a stream the main thread is writing raises (a reentrant call)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.first: int | None = None
        self.ignored = 0
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.first is not None:
            self.ignored += 1
            return
        self.first = signum
        raise StepTerminated(signum)

    def install(self) -> None:
        for signum in self.SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()


def job_name(run: str) -> str:
    """A DNS-1035 job name, the same for every attempt of one pipeline run.

    Pods are named <job>-worker-<i>, so the name stays under 47 characters; a run id that does
    not fit (or is not name-safe) is shortened with a digest of the whole.
    """
    slug = re.sub(r"[^a-z0-9]+", "-", run.lower()).strip("-")
    if slug == run and len(slug) <= 38:  # a KFP run id (a UUID) is used as it is
        return f"lmforge-{slug}"
    # lossy or long: a digest of the whole keeps different runs apart
    short = slug[:24].rstrip("-")
    return f"lmforge-{short}-{hashlib.sha256(run.encode()).hexdigest()[:12]}" if short else \
        f"lmforge-{hashlib.sha256(run.encode()).hexdigest()[:12]}"


# ------------------------------------------------------------------ the manifest


def _from_dict(model_cls: Any, data: dict[str, Any]) -> Any:
    """A kubernetes model from its Kubernetes (camelCase) form, e.g. a toleration from the config."""
    names = {json_key: attr for attr, json_key in model_cls.attribute_map.items()}
    unknown = set(data) - set(names)
    if unknown:
        raise LmforgeError(f"{model_cls.__name__}: unknown field(s) {', '.join(sorted(unknown))}")
    return model_cls(**{names[key]: value for key, value in data.items()})


def gpus_per_node(cfg: RunConfig) -> int:
    j = cfg.train.pytorchjob
    return cfg.train.nproc if j.gpus_per_node is None else j.gpus_per_node


def build(cfg: RunConfig, worker_args: list[str], name: str, *, run: str = "") -> Any:
    """The PyTorchJob as a kubeflow-training model (KubeflowOrgV1PyTorchJob)."""
    from kubeflow.training import models as kf
    from kubernetes import client as k8s

    t, j, c = cfg.train, cfg.train.pytorchjob, cfg.cluster
    gpus = gpus_per_node(cfg)
    requests: dict[str, Any] = {"cpu": j.cpu, "memory": j.memory}
    limits: dict[str, Any] = {"memory": j.memory}
    if gpus:
        requests["nvidia.com/gpu"] = limits["nvidia.com/gpu"] = gpus
    env_from = [k8s.V1EnvFromSource(secret_ref=k8s.V1SecretEnvSource(name=secret))
                for secret in (c.s3_secret, c.mlflow_secret) if secret]
    container = k8s.V1Container(
        name=CONTAINER,
        image=j.image,
        image_pull_policy="IfNotPresent",
        command=["lmforge", "worker", *worker_args],
        env=[
            # The root filesystem is read-only: caches (torch, the data-bin copy, checkpoints
            # before upload) go to the scratch volume.
            k8s.V1EnvVar(name="HOME", value=CACHE_MOUNT),
            k8s.V1EnvVar(name=CACHE_ENV, value=f"{CACHE_MOUNT}/lmforge-cache"),
            k8s.V1EnvVar(name="LOGLEVEL", value="INFO"),
            k8s.V1EnvVar(name="NCCL_DEBUG", value="WARN"),
        ],
        env_from=env_from or None,
        ports=[k8s.V1ContainerPort(name=OPERATOR_PORT_NAME, container_port=OPERATOR_PORT, protocol="TCP")],
        resources=k8s.V1ResourceRequirements(requests=requests, limits=limits),
        security_context=k8s.V1SecurityContext(
            allow_privilege_escalation=False, read_only_root_filesystem=True,
            capabilities=k8s.V1Capabilities(drop=["ALL"]),
        ),
        volume_mounts=[k8s.V1VolumeMount(name="dshm", mount_path="/dev/shm"),
                       k8s.V1VolumeMount(name="scratch", mount_path=CACHE_MOUNT)]
        # the shared volume of a cluster without S3 (cluster.pvc_name), where data and checkpoints live
        + ([k8s.V1VolumeMount(name="shared", mount_path=c.pvc_mount_path)] if c.pvc_name else []),
    )
    pod = k8s.V1PodSpec(
        service_account_name=c.service_account or None,
        # Training pods never call the Kubernetes API.
        automount_service_account_token=False,
        termination_grace_period_seconds=TERMINATION_GRACE_S,
        security_context=k8s.V1PodSecurityContext(
            run_as_non_root=True, run_as_user=10001, run_as_group=10001, fs_group=10001,
            seccomp_profile=k8s.V1SeccompProfile(type="RuntimeDefault"),
        ),
        node_selector=dict(j.node_selector) or None,
        tolerations=[_from_dict(k8s.V1Toleration, tol) for tol in j.tolerations] or None,
        containers=[container],
        volumes=[
            # The container runtime's 64 MiB /dev/shm is too small for NCCL and DataLoader
            # workers; this one counts against the memory limit.
            k8s.V1Volume(name="dshm", empty_dir=k8s.V1EmptyDirVolumeSource(medium="Memory", size_limit=j.shm_size)),
            k8s.V1Volume(name="scratch", empty_dir=k8s.V1EmptyDirVolumeSource(size_limit=j.cache_size)),
        ] + ([k8s.V1Volume(name="shared", persistent_volume_claim=k8s.V1PersistentVolumeClaimVolumeSource(
            claim_name=c.pvc_name))] if c.pvc_name else []),
    )
    template = k8s.V1PodTemplateSpec(
        metadata=k8s.V1ObjectMeta(
            labels=dict(LABELS),
            # Kubeflow profile namespaces inject Istio sidecars; one would keep the pod running
            # after training exits and sit in the path of the NCCL/gloo rendezvous.
            annotations={"sidecar.istio.io/inject": "false"},
        ),
        spec=pod,
    )
    replicas = {"Master": kf.KubeflowOrgV1ReplicaSpec(replicas=1, restart_policy="ExitCode", template=template)}
    if t.nnodes > 1:
        replicas["Worker"] = kf.KubeflowOrgV1ReplicaSpec(replicas=t.nnodes - 1, restart_policy="ExitCode", template=template)
    return kf.KubeflowOrgV1PyTorchJob(
        api_version="kubeflow.org/v1",
        kind="PyTorchJob",
        metadata=k8s.V1ObjectMeta(name=name, labels=dict(LABELS), annotations={RUN_ANNOTATION: run} if run else None),
        spec=kf.KubeflowOrgV1PyTorchJobSpec(
            nproc_per_node=str(t.nproc),
            pytorch_replica_specs=replicas,
            run_policy=kf.KubeflowOrgV1RunPolicy(
                backoff_limit=j.backoff_limit,
                active_deadline_seconds=j.active_deadline_seconds,
                ttl_seconds_after_finished=j.ttl_seconds_after_finished,
                clean_pod_policy=j.clean_pod_policy,
            ),
        ),
    )


def render(cfg: RunConfig, worker_args: list[str], name: str, *, run: str = "") -> dict[str, Any]:
    """The PyTorchJob manifest as plain data (what `kubectl create -f` would take)."""
    from kubernetes.client import ApiClient

    return ApiClient().sanitize_for_serialization(build(cfg, worker_args, name, run=run))


def admission_problems(job: dict[str, Any]) -> list[str]:
    """The Training Operator's admission rules for a PyTorchJob (its validating webhook,
    pkg/webhooks/pytorch/pytorchjob_webhook.go of release 1.9), as problems. A job without a
    Master is admitted (elastic jobs have none); `render` always writes one."""
    problems = []
    name = job.get("metadata", {}).get("name", "")
    if len(name) > 63 or not _DNS1035.match(name):
        problems.append(f"metadata.name: {name!r} is not a DNS-1035 label")
    spec = job.get("spec", {})
    specs = spec.get("pytorchReplicaSpecs")
    if specs is None:
        problems.append("spec.pytorchReplicaSpecs: required")
    specs = specs or {}
    if set(specs) - {"Master", "Worker"}:
        problems.append(f"spec.pytorchReplicaSpecs: only Master and Worker, not {sorted(set(specs) - {'Master', 'Worker'})}")
    if "Master" in specs and specs["Master"].get("replicas") != 1:
        problems.append("spec.pytorchReplicaSpecs.Master.replicas: must be set, to exactly 1")
    if "elasticPolicy" in spec:
        if "Worker" not in specs:
            problems.append("spec.pytorchReplicaSpecs.Worker: required with an elasticPolicy")
        if "nProcPerNode" in (spec["elasticPolicy"] or {}) and "nprocPerNode" in spec:
            problems.append("spec.elasticPolicy.nProcPerNode: not with spec.nprocPerNode")
    for role, replica in specs.items():
        if role == "Worker" and replica.get("replicas", 1) < 1:
            problems.append("spec.pytorchReplicaSpecs.Worker.replicas: must be at least 1")
        containers = replica.get("template", {}).get("spec", {}).get("containers") or []
        if not containers:
            problems.append(f"spec.pytorchReplicaSpecs.{role}: at least one container")
        if not any(c.get("name") == CONTAINER for c in containers):
            problems.append(f"spec.pytorchReplicaSpecs.{role}: no container named {CONTAINER!r}")
        for container in containers:
            if not container.get("image"):
                problems.append(f"spec.pytorchReplicaSpecs.{role}: container {container.get('name')!r} has no image")
    policy = spec.get("runPolicy") or {}  # refused by later releases' webhook (ValidateRunPolicy)
    for field in ("backoffLimit", "activeDeadlineSeconds", "ttlSecondsAfterFinished"):
        if field in policy and policy[field] < 0:
            problems.append(f"spec.runPolicy.{field}: must be >= 0")
    return problems


# ------------------------------------------------------------------ talking to the cluster


def credentials_problem() -> str | None:
    """Why no Kubernetes API can be reached with this process's credentials; None when it can."""
    from kubeflow.training.utils import utils as kf_utils
    from kubernetes import config

    try:
        if kf_utils.is_running_in_k8s() and not os.environ.get("KUBECONFIG"):
            config.load_incluster_config()
        else:
            # named explicitly: the client reads KUBECONFIG once, when it is imported
            config.load_kube_config(config_file=os.environ.get("KUBECONFIG"))
    except config.ConfigException as exc:
        return f"train.launcher: pytorchjob needs Kubernetes credentials (in-cluster or KUBECONFIG): {exc}"
    return None


def _client(namespace: str) -> Any:
    from kubeflow.training import TrainingClient
    from kubernetes.client import Configuration

    problem = credentials_problem()
    if problem:
        raise LmforgeError(problem)
    configuration = Configuration.get_default_copy()  # what credentials_problem loaded
    # k8s_api.Backoff is the one retry policy: urllib3's own 3 immediate retries would log a warning
    # each, at every poll of an unreachable API server.
    configuration.retries = 0
    return TrainingClient(client_configuration=configuration, namespace=namespace, job_kind="PyTorchJob")


def terminal_condition(job: Any) -> Any | None:
    """The job's Succeeded or Failed condition when it has finished, else None."""
    conditions = (job.status.conditions if job.status else None) or []
    for condition in reversed(conditions):
        if condition.type in ("Succeeded", "Failed") and condition.status == "True":
            return condition
    return None


def create_or_attach(client: Any, job: Any, namespace: str) -> str:
    """Create the job; when it exists (an earlier attempt of this step), attach to it, unless it
    failed: then it is replaced (a retried step means: try training again, resuming). Returns
    'created' or 'attached'."""
    name = job.metadata.name
    for _ in range(3):
        try:
            client.create_job(job=job, namespace=namespace)
            log.info("created PyTorchJob %s/%s", namespace, name)
            return "created"
        except (RuntimeError, TimeoutError) as exc:
            if k8s_api.status_code(exc) != 409:
                raise k8s_api.refusal(exc, f"create PyTorchJob {namespace}/{name}", namespace) or LmforgeError(
                    f"cannot create PyTorchJob {namespace}/{name}: {k8s_api.describe(exc)}") from None
        try:
            existing = client.get_job(name, namespace)
        except (RuntimeError, TimeoutError) as exc:
            if k8s_api.status_code(exc) == 404:
                continue  # deleted meanwhile: create it
            raise k8s_api.refusal(exc, f"get PyTorchJob {namespace}/{name}", namespace) or LmforgeError(
                f"cannot read PyTorchJob {namespace}/{name}: {k8s_api.describe(exc)}") from None
        condition = terminal_condition(existing)
        if condition is None or condition.type == "Succeeded":
            log.info("attaching to PyTorchJob %s/%s, created by an earlier attempt of this step", namespace, name)
            return "attached"
        log.info("PyTorchJob %s/%s of an earlier attempt failed (%s); replacing it", namespace, name, condition.reason)
        k8s_api.delete_job(client, name, namespace)
        k8s_api.wait_gone(client, name, namespace)
    raise LmforgeError(f"PyTorchJob {namespace}/{name} keeps reappearing; delete it by hand")


def _stamp_key(stamp: str) -> str:
    """An RFC 3339 timestamp as the log API writes it (fraction without trailing zeros), made comparable as text."""
    base, _, fraction = stamp.rstrip("Z").partition(".")
    return f"{base}.{fraction.ljust(9, '0')}"


class MasterLog(threading.Thread):
    """Follows the Master pod's `pytorch` container log into this process's stdout.

    The pod may not exist yet, may be pending, or may be replaced after a retryable exit (the
    operator recreates it under the same name): the stream is reopened until `stop()`, and lines
    already shown (by their timestamps) are skipped after a reopen.
    """

    def __init__(self, client: Any, job: str, namespace: str, *, poll_s: float, out: Any = None) -> None:
        super().__init__(name=f"log-{job}", daemon=True)
        self.client, self.pod, self.namespace, self.poll_s = client, f"{job}-master-0", namespace, poll_s
        self.out = out or sys.stdout
        self._stop_event = threading.Event()
        self._last = ""
        self.lines = 0
        self.refused = False

    def stop(self) -> None:
        self._stop_event.set()

    def finish(self, timeout_s: float = 10.0) -> None:
        """Stop following, after the rest of the log as far as it arrives within timeout_s."""
        self.stop()
        if self.is_alive():
            self.join(timeout=timeout_s)

    def run(self) -> None:
        from kubernetes import watch

        while not self._stop_event.is_set():
            try:
                pod = self.client.core_api.read_namespaced_pod(self.pod, self.namespace)
                if pod.status is not None and pod.status.phase not in ("Pending", None):
                    for line in watch.Watch().stream(
                        self.client.core_api.read_namespaced_pod_log, name=self.pod, namespace=self.namespace,
                        container=CONTAINER, timestamps=True,
                    ):
                        stamp, _, text = line.partition(" ")
                        key = _stamp_key(stamp)
                        if key <= self._last:
                            continue  # shown before the stream was reopened
                        self._last = key
                        self.out.write(f"[{self.pod}] {text}\n")
                        self.out.flush()
                        self.lines += 1
            except Exception as exc:  # not there yet, or the connection dropped: try again
                if k8s_api.status_code(exc) in k8s_api.AUTHORIZATION and not self.refused:
                    self.refused = True  # training goes on; say once why its log does not
                    log.warning("cannot follow the log of %s: %s; the train step needs %s", self.pod,
                                k8s_api.describe(exc), k8s_api.RBAC)
                log.debug("log of %s not available yet: %s", self.pod, exc)
            self._stop_event.wait(self.poll_s)


def _given_up(client: Any, name: str, namespace: str, why: str) -> LmforgeError:
    """The step stops watching the job: delete it (nothing left running that nobody watches), and say why."""
    try:
        k8s_api.delete_job(client, name, namespace)
    except LmforgeError as exc:
        return LmforgeError(f"{why}; {exc}")
    return LmforgeError(f"{why}; the job was deleted")


def wait_for_end(client: Any, name: str, namespace: str, *, timeout_s: float, poll_s: float) -> Any:
    """The job's terminal condition; deletes the job and raises when it has not finished in time, or
    cannot be read (401/403 at once; transient errors are waited out with back-off until then)."""
    what = f"PyTorchJob {namespace}/{name}"
    deadline = time.monotonic() + timeout_s
    backoff = k8s_api.Backoff(f"read {what}", base_s=poll_s)
    while True:
        delay = poll_s
        try:
            condition = terminal_condition(client.get_job(name, namespace))
            backoff.succeeded()
        except (RuntimeError, TimeoutError) as exc:
            if k8s_api.status_code(exc) == 404:
                raise LmforgeError(f"{what} disappeared (deleted by someone else?)") from None
            if not k8s_api.is_transient(exc):
                why = k8s_api.refusal(exc, f"get {what}", namespace) or f"cannot read {what}: {k8s_api.describe(exc)}"
                raise _given_up(client, name, namespace, str(why)) from None
            condition, delay = None, backoff.failed(exc)
        if condition is not None:
            return condition
        if time.monotonic() > deadline:
            raise _given_up(client, name, namespace,
                            f"{what} did not finish within {timeout_s:.0f} s (train.pytorchjob.timeout_s)")
        time.sleep(delay)


def launch(cfg: RunConfig, worker_args: list[str], *, job_name: str, run: str = "") -> None:
    """Run training as a PyTorchJob to its end; raise LmforgeError with the job's reason when it fails."""
    from kubernetes.client import ApiClient

    j, namespace = cfg.train.pytorchjob, cfg.cluster.namespace
    job = build(cfg, worker_args, job_name, run=run)
    problems = admission_problems(ApiClient().sanitize_for_serialization(job))
    assert not problems, problems  # render's own invariant
    client = _client(namespace)
    timeout_s = j.timeout_s or j.active_deadline_seconds + 3600
    follower = MasterLog(client, job_name, namespace, poll_s=min(j.poll_s, 5.0))
    signals = StopSignals()
    try:
        signals.install()  # inside the try: a signal right after it is already the delete's
        create_or_attach(client, job, namespace)
        follower.start()
        condition = wait_for_end(client, job_name, namespace, timeout_s=timeout_s, poll_s=j.poll_s)
        follower.finish()
    except StepTerminated as stop:
        # From here on signals are only counted (StopSignals): nothing stops the delete.
        log.warning("%s: deleting PyTorchJob %s/%s", signal.Signals(stop.signum).name, namespace, job_name)
        k8s_api.delete_job(client, job_name, namespace)
        follower.finish()
        if signals.ignored:
            log.warning("%d more signal(s) arrived while deleting; ignored", signals.ignored)
        raise Interrupted(stop.signum) from None  # exit 128 + signal; the train step's MLflow run: KILLED
    finally:
        follower.stop()  # when wait_for_end raised
        signals.restore()
    if condition.type == "Failed":
        raise LmforgeError(f"PyTorchJob {namespace}/{job_name} failed: {condition.reason}: {condition.message}")
    log.info("PyTorchJob %s/%s succeeded", namespace, job_name)


# ------------------------------------------------------------------ the reference manifest in k8s/

REFERENCE_HEADER = """\
# Reference PyTorchJob: what the train step creates on a cluster
# (train.launcher: pytorchjob), rendered by
# lmforge.training.launchers.pytorchjob.render for the example inputs in
# reference_manifest_yaml(): the shipped wikitext-2 config on 2 nodes x 1 GPU,
# data and checkpoints on S3. GENERATED; a golden test keeps it equal to the
# renderer (regenerate: LMFORGE_REGENERATE=1 pytest tests/training/launchers).
# Not part of the kustomization; `kubectl create -f` it after
# replacing the URIs.
#
# - The operator sets MASTER_ADDR/MASTER_PORT (the Master's service),
#   WORLD_SIZE = replicas x nprocPerNode, RANK = the pod's index and PET_*;
#   `lmforge worker` checks them, starts nprocPerNode processes per pod with
#   --device-id from LOCAL_RANK (fairseq ignores LOCAL_RANK), NCCL on GPUs.
# - restartPolicy ExitCode: the operator restarts a pod that exits >= 128:
#   137 (killed, e.g. OOM or preemption), 138 (lmforge's transient failures:
#   storage, network, a lost peer), 143 (SIGTERM: the worker saved and uploaded
#   a checkpoint first); 1 and 2 (a bad config or data-bin) fail the job. Every
#   restart resumes from the newest checkpoint at --save-dir that loads.
# - runPolicy: backoffLimit restarts; activeDeadlineSeconds (48 h) fails a job
#   that runs too long; finished jobs stay ttlSecondsAfterFinished (1 day) for
#   their logs; cleanPodPolicy Running kills the peers of a failed rank, which
#   would otherwise hang in NCCL.
# - Credentials: envFrom the cluster section's Secrets (lmforge-s3 for S3,
#   lmforge-mlflow for MLFLOW_TRACKING_URI; see secrets.example.yaml).
# - /dev/shm is a memory emptyDir (the runtime's 64 MiB is too small for NCCL);
#   /tmp (HOME, the data-bin copy, checkpoints before upload) a scratch one, as
#   the root filesystem is read-only. No Istio sidecar (it would sit in the
#   rendezvous and keep the pod alive after training). Only rank 0 logs to
#   MLflow.
"""


def reference_manifest_yaml() -> str:
    """k8s/pytorchjob.yaml: `render` for example inputs, as yamllint-clean YAML."""
    import yaml

    from lmforge import config as config_mod

    cfg = config_mod.default_config()
    cfg = config_mod.from_dict({
        **cfg.to_dict(),
        "train": {**cfg.to_dict()["train"], "launcher": "pytorchjob", "nnodes": 2, "nproc": 1},
        "storage": {"root": "s3://lmforge/runs", "s3_endpoint": ""},
        "tracking": {**cfg.to_dict()["tracking"], "uri": "http://mlflow:5000"},
    })
    checkpoints = "s3://lmforge/runs/wikitext-2/RUN_ID/checkpoints"
    args = ["--config", f"{checkpoints}/run-config.json", "--data", "s3://lmforge/runs/data/data-bin/DATA_KEY",
            "--save-dir", checkpoints, "--tracking-uri", "http://mlflow:5000", "--mlflow-run-id", "MLFLOW_RUN_ID"]
    manifest = render(cfg, args, job_name("run-id"), run="RUN_ID")

    class IndentedDumper(yaml.SafeDumper):
        """Block sequences indented under their key, as yamllint's default rules want."""

        def increase_indent(self, flow: bool = False, indentless: bool = False) -> Any:
            return super().increase_indent(flow, False)

    body = yaml.dump(manifest, Dumper=IndentedDumper, sort_keys=False, default_flow_style=False,
                     explicit_start=True, width=78)
    return body.replace("---\n", "---\n" + REFERENCE_HEADER, 1)
