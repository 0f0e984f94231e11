"""The PyTorchJob launcher: the manifest it renders (kubernetes-validate, the reference copy in
k8s/; the operator's CRD and admission rules in test_pytorchjob_crd.py), its conversation with the
Kubernetes API (errors: k8s_api) and its cleanup when the step is stopped.

The API server is the one mock of this suite: there is no cluster here, so `StubKubernetes`
answers on 127.0.0.1 the handful of requests the launcher makes (create/get/delete a
PyTorchJob, get a pod, follow its log), with a job that runs, succeeds, fails or never ends, and
errors (401, 403, 429, 5xx) or a slow delete, as a test scripts it. The launcher reaches it
through an ordinary kubeconfig (KUBECONFIG), as it would a real cluster.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import kubernetes_validate
import pytest

from conftest import REPO, TINY_CONFIG
from lmforge import config
from lmforge.errors import LmforgeError
from lmforge.training.distributed import (
    OPERATOR_PORT,
    OPERATOR_PORT_NAME,
    local_process_env,
    operator_env,
    read_environment,
)
from lmforge.training.launchers import k8s_api, pytorchjob

ARGS = ["--config", "s3://b/run/checkpoints/run-config.json", "--data", "s3://b/data-bin", "--save-dir",
        "s3://b/run/checkpoints", "--mlflow-run-id", "abc"]


def job_config(*overrides: str) -> config.RunConfig:
    return config.load(TINY_CONFIG, ["train.launcher=pytorchjob", *overrides])


# ------------------------------------------------------------------ the manifest


CASES = {
    "2 nodes x 2 GPUs": ["train.nnodes=2", "train.nproc=2"],
    "1 CPU node, pinned": ["train.nproc=1", "train.pytorchjob.gpus_per_node=0",
                           "train.pytorchjob.node_selector={pool: cpu}", "train.pytorchjob.tolerations=[]"],
    "4 nodes x 8 GPUs": ["train.nnodes=4", "train.nproc=8", "train.pytorchjob.backoff_limit=10",
                         "train.pytorchjob.clean_pod_policy=All"],
    "shared volume": ["cluster.pvc_name=lmforge-data", "storage.root=/mnt/lmforge/runs"],
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_rendered_job_passes_admission_and_its_pod_templates_validate(case):
    cfg = job_config(*CASES[case])
    job = pytorchjob.render(cfg, ARGS, "lmforge-test-run")
    assert pytorchjob.admission_problems(job) == []
    assert (job["apiVersion"], job["kind"]) == ("kubeflow.org/v1", "PyTorchJob")
    spec = job["spec"]
    assert spec["nprocPerNode"] == str(cfg.train.nproc)
    assert spec["runPolicy"] == {
        "backoffLimit": cfg.train.pytorchjob.backoff_limit, "activeDeadlineSeconds": 172800,
        "ttlSecondsAfterFinished": 86400, "cleanPodPolicy": cfg.train.pytorchjob.clean_pod_policy,
    }
    replicas = spec["pytorchReplicaSpecs"]
    assert replicas["Master"]["replicas"] == 1
    assert replicas.get("Worker", {}).get("replicas", 0) == cfg.train.nnodes - 1
    for role, replica in replicas.items():
        assert replica["restartPolicy"] == "ExitCode"
        template = replica["template"]
        pod = {"apiVersion": "v1", "kind": "Pod", "spec": template["spec"],
               "metadata": {**template["metadata"], "name": f"lmforge-test-run-{role.lower()}-0"}}
        kubernetes_validate.validate(pod, kubernetes_validate.latest_version(), strict=True)
        pod_spec = template["spec"]
        (container,) = pod_spec["containers"]
        assert container["name"] == "pytorch" and container["image"] == cfg.train.pytorchjob.image
        assert container["command"] == ["lmforge", "worker", *ARGS]
        gpus = container["resources"]["limits"].get("nvidia.com/gpu", 0)
        assert gpus == (0 if "CPU" in case else cfg.train.nproc)
        assert [s["secretRef"]["name"] for s in container["envFrom"]] == [cfg.cluster.s3_secret, cfg.cluster.mlflow_secret]
        (shm,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm"]
        (volume,) = [v for v in pod_spec["volumes"] if v["name"] == shm["name"]]
        assert volume["emptyDir"]["medium"] == "Memory"
        assert pod_spec.get("serviceAccountName") == (cfg.cluster.service_account or None)
        assert pod_spec.get("nodeSelector") == (dict(cfg.train.pytorchjob.node_selector) or None)
        assert pod_spec.get("tolerations") == (list(cfg.train.pytorchjob.tolerations) or None)
        claims = [v["persistentVolumeClaim"]["claimName"] for v in pod_spec["volumes"] if "persistentVolumeClaim" in v]
        assert claims == ([cfg.cluster.pvc_name] if cfg.cluster.pvc_name else [])
        if claims:
            assert {"name": "shared", "mountPath": cfg.cluster.pvc_mount_path} in container["volumeMounts"]


def test_the_operators_variables_for_the_rendered_job_give_every_process_one_rank():
    """The manifest (replicas, nprocPerNode, the rendezvous port) as the operator turns it into each
    pod's variables, read by the worker: every process of 3 pods x 2 gets its own rank."""
    job = pytorchjob.render(job_config("train.nnodes=3", "train.nproc=2"), ARGS, "lmforge-x")
    spec = job["spec"]
    nnodes = sum(replica["replicas"] for replica in spec["pytorchReplicaSpecs"].values())
    nproc = int(spec["nprocPerNode"])
    (port,) = spec["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["ports"]
    assert (port["name"], port["containerPort"]) == (OPERATOR_PORT_NAME, OPERATOR_PORT)
    ranks = []
    for pod in range(nnodes):  # the Master is pod 0, Worker i pod i + 1
        pod_env = operator_env(nnodes, nproc, pod, port["containerPort"], master_addr="lmforge-x-master-0")
        node = read_environment(pod_env)
        assert node.spawn_local and node.world_size == 6
        for i in range(nproc):
            process = read_environment(local_process_env(pod_env, node, i))
            ranks.append((process.rank, process.placement(cuda=True).device_id))
    assert ranks == [(0, 0), (1, 1), (2, 0), (3, 1), (4, 0), (5, 1)]


def test_reference_manifest_in_k8s_is_the_renderer_output():
    """k8s/pytorchjob.yaml is generated; LMFORGE_REGENERATE=1 rewrites it."""
    reference = REPO / "k8s" / "pytorchjob.yaml"
    rendered = pytorchjob.reference_manifest_yaml()
    if os.environ.get("LMFORGE_REGENERATE"):
        reference.write_text(rendered)
    assert reference.read_text() == rendered, "k8s/pytorchjob.yaml is stale: rerun with LMFORGE_REGENERATE=1"


def test_job_name_is_the_same_for_every_attempt_of_a_run_and_a_valid_name():
    kfp_run = "3f2b8e1c-5d4a-4c1e-9b7a-2e6f0d8c1a55"
    assert pytorchjob.job_name(kfp_run) == f"lmforge-{kfp_run}"
    assert pytorchjob.job_name("Run_1") != pytorchjob.job_name("run-1"), "lossy names get a digest"
    for run in (kfp_run, "Run_1", "s3://bucket/a/very/long/checkpoint/location/" + "x" * 80, "___"):
        name = pytorchjob.job_name(run)
        assert name == pytorchjob.job_name(run)
        assert len(f"{name}-worker-99") <= 63 and pytorchjob.admission_problems(
            {"metadata": {"name": name}, "spec": {"pytorchReplicaSpecs": {"Master": {"replicas": 1, "template": {
                "spec": {"containers": [{"name": "pytorch", "image": "i"}]}}}}}}) == []


# ------------------------------------------------------------------ the stub API server


class StubKubernetes:
    """Answers the Kubernetes API requests the launcher makes (see the module docstring).

    `outcome` scripts every job: "Succeeded" or "Failed" once the Master's log has been served
    completely, or None to stay Running forever. `job_errors` are the statuses the next reads of a
    job answer with (one each, then the job; `refuse_jobs` answers every read with its status);
    `delete_delay_s` makes a delete take that long (the answer comes after it, as with a
    Foreground deletion). `job_reads` records (time.monotonic(), status) of every read of a job.
    """

    def __init__(self, outcome: str | None = "Succeeded", log_lines: int = 5, *, job_errors: tuple[int, ...] = (),
                 refuse_jobs: int | None = None, delete_delay_s: float = 0.0) -> None:
        self.outcome, self.log_lines = outcome, log_lines
        self.job_errors, self.refuse_jobs, self.delete_delay_s = list(job_errors), refuse_jobs, delete_delay_s
        self.job_reads: list[tuple[float, int]] = []
        self.jobs: dict[str, dict] = {}
        self.created: list[str] = []
        self.create_attempts = 0
        self.deleted: list[str] = []
        self.log_served: set[str] = set()
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def add_job(self, name: str, conditions: list[str]) -> None:
        """A job left by an earlier attempt of the step."""
        self.jobs[name] = {**pytorchjob.render(job_config(), ARGS, name), "preset": conditions}

    def status(self, name: str) -> dict:
        job = self.jobs[name]
        types = list(job.get("preset") or ["Created", "Running"])
        if not job.get("preset") and self.outcome and name in self.log_served:
            types.append(self.outcome)
        reasons = {"Failed": ("PyTorchJobFailed", f"PyTorchJob team-a/{name} is failed because 1 Master replica(s) failed.")}
        return {"conditions": [
            {"type": t, "status": "True", "reason": reasons.get(t, (f"PyTorchJob{t}", ""))[0],
             "message": reasons.get(t, ("", f"PyTorchJob {name} is {t.lower()}."))[1],
             "lastTransitionTime": "2026-01-01T00:00:00Z", "lastUpdateTime": "2026-01-01T00:00:00Z"}
            for t in types
        ]}

    def kubeconfig(self, path: Path) -> Path:
        path.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "stub",
            "clusters": [{"name": "stub", "cluster": {"server": self.url}}],
            "users": [{"name": "stub", "user": {"token": "stub-token"}}],
            "contexts": [{"name": "stub", "context": {"cluster": "stub", "user": "stub", "namespace": "team-a"}}],
        }))
        return path

    def _handler(self):
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def reply(self, code: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def not_found(self, what: str) -> None:
                self.reply(404, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound",
                                 "code": 404, "message": f"{what} not found"})

            def error(self, code: int, name: str) -> None:
                """An error Status as the API server words it (Forbidden names the user and the verb)."""
                reason, message = {
                    401: ("Unauthorized", "Unauthorized"),
                    403: ("Forbidden", f'pytorchjobs.kubeflow.org "{name}" is forbidden: User '
                                       '"system:serviceaccount:team-a:default-editor" cannot get resource "pytorchjobs" '
                                       'in API group "kubeflow.org" in the namespace "team-a"'),
                    429: ("TooManyRequests", "the server has received too many requests and has asked us to try "
                                             "again later"),
                }.get(code, ("InternalError", "etcdserver: request timed out"))
                self.reply(code, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason,
                                  "code": code, "message": message})

            def parts(self) -> list[str]:
                return urlsplit(self.path).path.strip("/").split("/")

            def do_POST(self):
                p = self.parts()
                assert p[:6] == ["apis", "kubeflow.org", "v1", "namespaces", "team-a", "pytorchjobs"], p
                job = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                name = job["metadata"]["name"]
                with stub.lock:
                    stub.create_attempts += 1
                    if name in stub.jobs:
                        return self.reply(409, {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                                "reason": "AlreadyExists", "code": 409,
                                                "message": f'pytorchjobs.kubeflow.org "{name}" already exists'})
                    stub.jobs[name] = job
                    stub.created.append(name)
                self.reply(201, job)

            def do_GET(self):
                p = self.parts()
                if p[:6] == ["apis", "kubeflow.org", "v1", "namespaces", "team-a", "pytorchjobs"]:
                    with stub.lock:
                        code = stub.job_errors.pop(0) if stub.job_errors else stub.refuse_jobs
                        stub.job_reads.append((time.monotonic(), code or (200 if p[6] in stub.jobs else 404)))
                    if code:
                        return self.error(code, p[6])
                    job = stub.jobs.get(p[6])
                    if job is None:
                        return self.not_found(p[6])
                    return self.reply(200, {**{k: v for k, v in job.items() if k != "preset"}, "status": stub.status(p[6])})
                if p[:5] == ["api", "v1", "namespaces", "team-a", "pods"]:
                    pod, job = p[5], p[5].rsplit("-master-0", 1)[0]
                    if job not in stub.jobs or not pod.endswith("-master-0"):
                        return self.not_found(pod)
                    if len(p) == 6:
                        return self.reply(200, {"kind": "Pod", "apiVersion": "v1", "metadata": {"name": pod},
                                                "status": {"phase": "Running"}})
                    assert p[6] == "log" and "container=pytorch" in self.path and "follow=true" in self.path.lower()
                    self.send_response(200)
                    self.send_header("Content-Type", "text/plain")
                    self.end_headers()
                    for i in range(stub.log_lines):
                        self.wfile.write(f"2026-01-01T00:00:0{i}.5Z training line {i}\n".encode())
                        self.wfile.flush()
                        time.sleep(0.05)
                    stub.log_served.add(job)
                    self.close_connection = True
                    return None
                return self.not_found(self.path)

            def do_DELETE(self):
                p = self.parts()
                time.sleep(stub.delete_delay_s)
                with stub.lock:
                    if stub.jobs.pop(p[6], None) is None:
                        return self.not_found(p[6])
                    stub.deleted.append(p[6])
                self.reply(200, {"kind": "Status", "apiVersion": "v1", "status": "Success", "code": 200})

        return Handler

    def close(self) -> None:
        """Stop answering and close the port: a request after it finds nobody (connection refused)."""
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def cluster(tmp_path, monkeypatch):
    """A stub API server and a kubeconfig pointing at it; `cluster(outcome=...)` to script the job."""
    stubs = []

    def make(**kwargs) -> StubKubernetes:
        stub = StubKubernetes(**kwargs)
        stubs.append(stub)
        monkeypatch.setenv("KUBECONFIG", str(stub.kubeconfig(tmp_path / f"kubeconfig-{len(stubs)}")))
        return stub

    yield make
    for stub in stubs:
        stub.close()


FAST = ["cluster.namespace=team-a", "train.pytorchjob.poll_s=0.05", "train.pytorchjob.timeout_s=60"]


def test_launch_creates_the_job_streams_the_master_log_and_returns_on_success(cluster, capsys):
    stub = cluster()
    pytorchjob.launch(job_config(*FAST), ARGS, job_name="lmforge-run-1")
    assert stub.created == ["lmforge-run-1"] and not stub.deleted
    out = capsys.readouterr().out
    assert [line for line in out.splitlines() if "training line" in line] == [
        f"[lmforge-run-1-master-0] training line {i}" for i in range(5)
    ]
    assert stub.jobs["lmforge-run-1"]["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0][
        "command"] == ["lmforge", "worker", *ARGS]
    # what reaches the API server is `render`'s output, which test_pytorchjob_crd.py checks against the operator
    assert stub.jobs["lmforge-run-1"] == pytorchjob.render(job_config(*FAST), ARGS, "lmforge-run-1")


def test_a_retried_step_attaches_to_the_running_job_instead_of_creating_another(cluster, capsys):
    stub = cluster()
    stub.add_job("lmforge-run-2", [])  # created by the first attempt, still running
    pytorchjob.launch(job_config(*FAST), ARGS, job_name="lmforge-run-2")
    assert stub.create_attempts == 1 and stub.created == [], "the create was refused (409) and nothing else created"
    assert "training line 4" in capsys.readouterr().out


def test_a_retried_step_replaces_a_job_that_failed(cluster):
    stub = cluster()
    stub.add_job("lmforge-run-3", ["Created", "Running", "Failed"])
    pytorchjob.launch(job_config(*FAST), ARGS, job_name="lmforge-run-3")
    assert stub.deleted == ["lmforge-run-3"] and stub.created == ["lmforge-run-3"]


def test_a_failed_job_ends_the_step_with_its_reason(cluster):
    cluster(outcome="Failed")
    with pytest.raises(LmforgeError, match=r"failed: PyTorchJobFailed: .*1 Master replica\(s\) failed"):
        pytorchjob.launch(job_config(*FAST), ARGS, job_name="lmforge-run-4")


def test_a_job_that_does_not_finish_in_time_is_deleted(cluster):
    stub = cluster(outcome=None)
    started = time.monotonic()
    with pytest.raises(LmforgeError, match="did not finish within 1 s"):
        pytorchjob.launch(job_config(*FAST[:-1], "train.pytorchjob.timeout_s=1"), ARGS, job_name="lmforge-run-5")
    assert time.monotonic() - started < 30
    assert stub.deleted == ["lmforge-run-5"]


def test_only_the_first_stop_signal_interrupts_later_ones_are_counted():
    """The first SIGTERM raises StepTerminated; a second SIGTERM and a SIGINT while it is handled (the
    delete) do not interrupt it; afterwards the previous handlers are back."""
    before = {s: signal.getsignal(s) for s in pytorchjob.StopSignals.SIGNALS}
    signals = pytorchjob.StopSignals()
    handled = False
    try:
        signals.install()
        os.kill(os.getpid(), signal.SIGTERM)
        pytest.fail("SIGTERM did not stop the step")
    except pytorchjob.StepTerminated as stop:
        assert stop.signum == signal.SIGTERM
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)
        handled = True  # reached: neither raised
    finally:
        signals.restore()
    assert handled and signals.ignored == 2
    assert {s: signal.getsignal(s) for s in pytorchjob.StopSignals.SIGNALS} == before


def _launcher_process(stub: StubKubernetes, tmp_path: Path, name: str) -> subprocess.Popen:
    """`launch` in a process of its own (signals go to it, not to pytest), against the stub, once it
    has created the job and follows the Master's log."""
    config_file = tmp_path / "run.json"
    config_file.write_text(job_config(*FAST).to_json())
    code = (
        "from lmforge import config, logs; from lmforge.training.launchers import pytorchjob; logs.setup_logging(); "
        f"pytorchjob.launch(config.from_json(open({str(config_file)!r}).read()), [], job_name={name!r})"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 60
    while name not in stub.log_served and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert stub.created == [name], proc.communicate()[0] if proc.poll() is not None else "not created"
    return proc


STOPS = {
    # what `timeout` and some supervisors do: SIGTERM, then SIGTERM again before the first is handled
    "SIGTERM twice": (signal.SIGTERM, [signal.SIGTERM], 143),
    # SIGTERM, then every 20 ms SIGTERM or SIGINT (Ctrl-C) until the slow delete has been answered
    "SIGTERM, then a storm": (signal.SIGTERM, [signal.SIGTERM, signal.SIGINT] * 40, 143),
    "Ctrl-C, then a storm": (signal.SIGINT, [signal.SIGINT, signal.SIGTERM] * 40, 130),
}


@pytest.mark.parametrize("stop", STOPS, ids=list(STOPS))
def test_a_stopped_step_deletes_the_job_whatever_signals_follow(cluster, tmp_path, stop):
    """The launcher runs in a subprocess against the stub API server (no cluster here); its delete takes
    1 s, so the later signals arrive while the first one is handled and while the delete is on its way.
    The job is deleted once, and the process exits 128 + the first signal (pytorchjob's docstring)."""
    first, then, status = STOPS[stop]
    stub = cluster(outcome=None, delete_delay_s=1.0)
    proc = _launcher_process(stub, tmp_path, "lmforge-run-6")
    proc.send_signal(first)
    for i, signum in enumerate(then):
        if i and (stub.deleted or proc.poll() is not None):
            break
        proc.send_signal(signum)
        time.sleep(0.02 if len(then) > 1 else 0)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == status, output[-3000:]
    assert stub.deleted == ["lmforge-run-6"]
    assert "Traceback" not in output, output[-3000:]
    assert f"{signal.Signals(first).name}: deleting PyTorchJob team-a/lmforge-run-6" in output


# ------------------------------------------------------------------ errors of the API server


@pytest.mark.parametrize("status", [403, 401])
def test_an_authorization_error_ends_the_step_at_once_with_one_line_naming_the_rbac(cluster, caplog, status):
    stub = cluster(outcome=None, refuse_jobs=status)
    started = time.monotonic()
    with caplog.at_level(logging.INFO), pytest.raises(LmforgeError) as raised:
        pytorchjob.launch(job_config(*FAST), ARGS, job_name="lmforge-run-7")
    message = str(raised.value)
    assert time.monotonic() - started < 10, "not retried until the step's timeout"
    assert "\n" not in message and message.startswith("cannot get PyTorchJob team-a/lmforge-run-7: ")
    assert f"{status} " in message and "k8s/rbac.yaml" in message and "get, list, watch" in message
    if status == 403:  # the API server's own words name the ServiceAccount
        assert 'User "system:serviceaccount:team-a:default-editor" cannot get resource "pytorchjobs"' in message
    assert message.endswith("the job was deleted") and stub.deleted == ["lmforge-run-7"], "nothing left unwatched"
    assert [code for _, code in stub.job_reads] == [status], "one read, no retries"
    assert not [r for r in caplog.records if r.name == k8s_api.__name__ and r.levelno >= logging.WARNING]


def test_transient_errors_are_waited_out_with_exponential_back_off_and_logged_once_each(cluster, caplog):
    """503, 429 and 500 answers in a row: every wait doubles (poll_s 0.05 s: 0.05, 0.1, 0.2, ...) instead
    of polling on; one warning per distinct error, one line when the API answers again; the job's
    success is still seen."""
    errors = (503, 429, 503, 500, 429)
    stub = cluster(job_errors=errors)
    with caplog.at_level(logging.INFO, logger=k8s_api.__name__):
        pytorchjob.launch(job_config(*FAST), ARGS, job_name="lmforge-run-8")
    reads = stub.job_reads
    assert [code for _, code in reads[:len(errors)]] == list(errors) and reads[len(errors)][1] == 200
    waits = [later - earlier for (earlier, _), (later, _) in zip(reads, reads[1:len(errors) + 1])]
    for n, wait in enumerate(waits):
        assert wait >= 0.05 * 2 ** n * 0.95, f"wait {n} was {wait:.3f} s: {waits}"
    records = [r for r in caplog.records if r.name == k8s_api.__name__]
    warnings = [r.getMessage() for r in records if r.levelno == logging.WARNING]
    assert len(warnings) == 3 and [w.split(": ")[1].split()[0] for w in warnings] == ["503", "429", "500"], warnings
    (recovered,) = [r.getMessage() for r in records if r.levelno == logging.INFO]
    assert re.fullmatch(rf"read PyTorchJob team-a/lmforge-run-8: the API server answers again, after {len(errors)} "
                        r"failed tries in \d+ s", recovered), recovered


def test_an_unreachable_api_server_is_waited_for_with_back_off_until_the_deadline(cluster, caplog, monkeypatch):
    """No answer at all (the port closed): reads back off instead of spinning, the error is logged once,
    and at the deadline the step says the job could not be deleted and how to delete it."""
    monkeypatch.setattr(k8s_api, "DELETE_PATIENCE_S", 0.5)
    stub = cluster()
    client = pytorchjob._client("team-a")
    stub.close()
    reads = []
    get_job = client.get_job
    monkeypatch.setattr(client, "get_job", lambda *a, **k: reads.append(time.monotonic()) or get_job(*a, **k))
    with caplog.at_level(logging.WARNING), pytest.raises(LmforgeError) as raised:
        pytorchjob.wait_for_end(client, "lmforge-run-9", "team-a", timeout_s=1.5, poll_s=0.05)
    assert str(raised.value).startswith("PyTorchJob team-a/lmforge-run-9 did not finish within 2 s")
    assert "cannot delete PyTorchJob team-a/lmforge-run-9: no answer (" in str(raised.value)
    assert str(raised.value).endswith("delete it by hand: kubectl -n team-a delete pytorchjob lmforge-run-9")
    assert 4 <= len(reads) <= 7, f"{len(reads)} reads in 1.5 s: polling every 0.05 s would be 30"
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]  # none of urllib3's
    assert warning.startswith("cannot read PyTorchJob team-a/lmforge-run-9: no answer (") and "refused" in warning


def test_the_compiled_pipeline_trains_as_a_pytorchjob_and_lmforge_run_locally():
    """train.launcher 'auto' (the default) is pytorchjob in a pod of the compiled pipeline, local elsewhere;
    `lmforge run` resolves it with no environment at all."""
    compiled = config.from_json(json.dumps(_compiled_default_config()))
    assert compiled.train.launcher == "auto"
    assert compiled.resolve_launcher({"KUBERNETES_SERVICE_HOST": "10.0.0.1"}).train.launcher == "pytorchjob"
    assert compiled.resolve_launcher({}).train.launcher == "local"
    explicit = config.load(TINY_CONFIG, ["train.launcher=local"])
    assert explicit.resolve_launcher({"KUBERNETES_SERVICE_HOST": "10.0.0.1"}).train.launcher == "local"


def _compiled_default_config() -> dict:
    import yaml

    pipeline = next(yaml.safe_load_all((REPO / "pipelines" / "lmforge.yaml").read_text()))
    return json.loads(pipeline["root"]["inputDefinitions"]["parameters"]["config_json"]["defaultValue"])
