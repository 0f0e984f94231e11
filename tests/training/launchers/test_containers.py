"""The emulated PyTorchJob whose replicas are containers (lmforge.training.launchers.containers).

Without Docker: the ExitCode policy (`decide`), the replicas' names and environments, and what
the launcher refuses before it starts anything. With the real engine (`docker`, `slow`):

- the supervisor on the bare base image, with replicas that are Python one-liners: the backoff
  limit, a permanent failure stopping the other replicas, SIGTERM to the launcher, success with
  the Master; no container outlives a test;
- training in containers of the trainer image (`trainer_image`, CPU), 2 replicas x 1 process,
  data-bin and checkpoints in moto's S3, metrics on a real `mlflow server`: an uninterrupted run;
  its peer as local processes (the same losses); the same run with its Worker `docker kill`ed
  after a checkpoint upload, restarted by the supervisor, resuming with the same per-update
  losses; a bad argument failing in one line.

    DOCKER_HOST=unix:///run/lmforge-docker/docker.sock pytest tests/training/launchers/test_containers.py
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import os
import re
import signal
import threading
import time
import uuid

import pytest

from conftest import FAST_TRAINING, TINY_CONFIG, train_inner_losses
from lmforge import config
from lmforge.errors import ConfigError, LmforgeError
from lmforge.training.distributed import OPERATOR_VARIABLES, operator_env
from lmforge.training.launchers import containers
from lmforge.training.launchers.containers import Action, decide, replica_env, replica_names
from lmforge.training.worker import CACHE_ENV, EXIT_TERMINATED, EXIT_TRANSIENT, retryable

# ------------------------------------------------------------------ the policy, names, environments


def test_exit_codes_128_to_255_are_retried_within_the_backoff_limit():
    assert decide(0, restarts=0, backoff_limit=3) is Action.DONE
    for code in (137, EXIT_TRANSIENT, EXIT_TERMINATED, 128, 255):  # killed, transient, SIGTERM, the range's ends
        assert decide(code, restarts=0, backoff_limit=3) is Action.RESTART, code
        assert decide(code, restarts=2, backoff_limit=3) is Action.RESTART, code
        assert decide(code, restarts=3, backoff_limit=3) is Action.FAIL, "the limit is spent"
    assert decide(137, restarts=0, backoff_limit=0) is Action.FAIL, "backoff_limit 0: no restart at all"


def test_exit_codes_1_to_127_fail_the_job_at_once():
    for code in (1, 2, 127, 256, -1):  # a mistake, argparse, the range's end, and what no process exits with
        assert decide(code, restarts=0, backoff_limit=3) is Action.FAIL, code
    assert [code for code in range(256) if retryable(code)] == list(range(128, 256))


def test_replicas_are_named_as_the_operator_names_pods():
    assert replica_names("lmforge-run-1", 3) == ["lmforge-run-1-master-0", "lmforge-run-1-worker-0",
                                                 "lmforge-run-1-worker-1"]
    assert replica_names("j", 1) == ["j-master-0"]


def test_a_replica_gets_the_operators_variables_and_only_the_workers_credentials():
    launcher = {
        "PATH": "/usr/bin", "HOME": "/root", "PYTHONPATH": "/src", "LMFORGE_CACHE_DIR": "/host/cache",
        "AWS_ACCESS_KEY_ID": "id", "AWS_SECRET_ACCESS_KEY": "secret", "AWS_ENDPOINT_URL": "http://127.0.0.1:9000",
        "AWS_PROFILE": "dev", "AWS_SHARED_CREDENTIALS_FILE": "/root/.aws/credentials",
        "MLFLOW_TRACKING_TOKEN": "token", "LOGLEVEL": "DEBUG", "RANK": "7",
    }
    operator = operator_env(2, 1, 1, 23456)
    env = replica_env(launcher, operator)
    assert {name: env[name] for name in operator} == operator, "the operator's variables, exactly"
    assert env["RANK"] == "1" and env["MASTER_ADDR"] == "127.0.0.1"
    assert set(env) - set(operator) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL",
                                        "MLFLOW_TRACKING_TOKEN", "LOGLEVEL", CACHE_ENV}
    assert env[CACHE_ENV] == containers.REPLICA_CACHE, "the container's own disk, not this machine's cache"
    assert set(OPERATOR_VARIABLES) <= set(env)


def test_containers_need_s3_locations_and_a_tracking_server():
    problems = containers.sharing_problems("/data/data-bin", "s3://b/ckpt", "sqlite:///mlflow.db")
    assert [p.split(":")[0] for p in problems] == ["train.local_replicas", "tracking.uri"]
    assert "data-bin /data/data-bin must be in S3" in problems[0]
    assert containers.sharing_problems("s3://b/data", "file:///ckpt", None)[0].startswith(
        "train.local_replicas: containers share no disk with this machine, so the checkpoint location")
    assert containers.sharing_problems("s3://b/data", "s3://b/ckpt", "http://127.0.0.1:5000") == []
    assert containers.sharing_problems("s3://b/data", "s3://b/ckpt", None) == [], "no metrics: no server needed"


def test_the_config_names_how_replicas_run():
    assert config.load(TINY_CONFIG).train.local_replicas == "processes"
    with pytest.raises(ConfigError, match=r"train\.local_replicas: 'pods' is not supported \(use processes or contai"):
        config.load(TINY_CONFIG, ["train.local_replicas=pods"])
    with pytest.raises(ConfigError, match=r"train\.local_replicas: containers get no GPU; use train\.precision fp32"):
        config.load(TINY_CONFIG, ["train.local_replicas=containers", "train.precision=bf16"])
    with pytest.raises(ConfigError, match=r"train\.pytorchjob\.image: empty"):
        config.load(TINY_CONFIG, ["train.local_replicas=containers", "train.pytorchjob.image="])


def test_preflight_refuses_local_locations_in_one_line(fast_data_bin, tmp_path):
    from lmforge.training.train import preflight

    cfg = config.load(TINY_CONFIG, ["train.local_replicas=containers", "train.launcher=local"])
    with pytest.raises(LmforgeError) as info:
        preflight(cfg, str(fast_data_bin), str(tmp_path / "ckpt"), tracking_uri=f"sqlite:///{tmp_path}/m.db")
    message = str(info.value)
    assert "\n" not in message
    assert f"the data-bin {fast_data_bin} must be in S3" in message and "tracking.uri:" in message


def test_no_engine_is_named_before_anything_starts(monkeypatch):
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/replicas-docker.sock")
    [problem] = containers.engine_problems("any:image")
    assert problem.startswith("train.local_replicas: containers need a Docker engine; none answers at "
                              "unix:///nonexistent/replicas-docker.sock") and "\n" not in problem


@pytest.mark.docker
def test_an_image_the_engine_lacks_is_named(docker_client):
    assert containers.engine_problems("lmforge-replicas-absent:0") == [
        "train.pytorchjob.image: lmforge-replicas-absent:0 is not in the Docker engine at "
        f"{os.environ['DOCKER_HOST']}; build it with `lmforge images build --role trainer --trainer-variant cpu`"]


# ------------------------------------------------------------------ the supervisor on the real engine
# These replicas run on the bare base image, as root: it has no user of its own, and they only
# print and sleep (no mount, no port). The training replicas below run as the trainer's user.


def job_name() -> str:
    return f"lmforge-replicas-{uuid.uuid4().hex[:8]}"


def leftovers(client, job: str) -> list[str]:
    return [c.name for c in client.containers.list(all=True, filters={"label": f"{containers.JOB_LABEL}={job}"})]


# A replica as a one-liner of the base image's python3: behaviour by RANK (MODE_<rank>), SIGTERM -> 143.
REPLICA = """
import os, signal, sys, time
signal.signal(signal.SIGTERM, lambda *a: (print('got SIGTERM', flush=True), sys.exit(143)))
mode = os.environ['MODE_' + os.environ['RANK']]
print('replica', os.environ['RANK'], 'of', os.environ['WORLD_SIZE'], 'mode', mode, flush=True)
if mode.startswith('exit-'):
    sys.exit(int(mode[5:]))
time.sleep(float(mode[6:]) if mode.startswith('sleep-') else 120)
"""


def supervise(client, image, job, modes, *, backoff_limit=3, out=None, grace_s=20.0):
    envs = [{**operator_env(len(modes), 1, node, 23456), **{f"MODE_{i}": mode for i, mode in enumerate(modes)}}
            for node in range(len(modes))]
    supervisor = containers.Supervisor(client, image, job, ["python3", "-c", REPLICA], backoff_limit,
                                       out=out or io.StringIO(), grace_s=grace_s, poll_s=0.2)
    return supervisor.run(envs)


@pytest.mark.docker
@pytest.mark.slow
def test_a_replica_that_keeps_being_killed_spends_the_backoff_limit(docker_client, base_image, caplog):
    job, out = job_name(), io.StringIO()
    caplog.set_level(logging.WARNING, logger=containers.__name__)
    try:
        outcome = supervise(docker_client, base_image, job, ["sleep", "exit-137"], backoff_limit=2, out=out)
    finally:
        assert leftovers(docker_client, job) == []
    assert outcome.status == 137 and outcome.restarts == 2
    assert outcome.reason.startswith(f"{job}-worker-0 exited with 137, the backoff limit of 2 restart(s) is spent")
    restarts = [r.getMessage() for r in caplog.records if "restarting it" in r.getMessage()]
    assert restarts == [f"{job}-worker-0 exited with 137 (retryable): restarting it (restart {k} of 2)" for k in (1, 2)]
    log = out.getvalue()
    assert log.count(f"[{job}-worker-0] replica 1 of 2 mode exit-137") == 3, "a fresh container each time"
    assert f"[{job}-master-0] got SIGTERM" in log, "the Master was stopped, as cleanPodPolicy Running does"


@pytest.mark.docker
@pytest.mark.slow
def test_a_permanent_failure_stops_the_others_at_once(docker_client, base_image):
    job = job_name()
    started = time.monotonic()
    try:
        outcome = supervise(docker_client, base_image, job, ["sleep", "exit-2"])
    finally:
        assert leftovers(docker_client, job) == []
    assert outcome.status == 2 and outcome.restarts == 0
    assert outcome.reason == f"{job}-worker-0 exited with 2, a permanent failure: replica 1 of 2 mode exit-2"
    assert time.monotonic() - started < 60, "the Master's 120 s sleep was cut short"


@pytest.mark.docker
@pytest.mark.slow
def test_the_job_succeeds_with_its_master_and_nothing_is_left(docker_client, base_image):
    job = job_name()
    try:
        outcome = supervise(docker_client, base_image, job, ["sleep-1", "sleep", "sleep"])
    finally:
        assert leftovers(docker_client, job) == []
    assert outcome.status == 0 and outcome.reason == ""


@pytest.mark.docker
@pytest.mark.slow
def test_sigterm_to_the_launcher_stops_and_removes_every_replica(docker_client, base_image):
    """SIGTERM (twice: the second must not cut the cleanup short) once both replicas run."""
    job, out = job_name(), io.StringIO()

    def terminate_once_running():
        deadline = time.monotonic() + 120
        while out.getvalue().count("mode sleep") < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGTERM)

    late = []  # a SIGTERM that lands after the supervisor has restored the handler before it

    def recorder(signum, frame):
        late.append(signum)

    previous = signal.signal(signal.SIGTERM, recorder)
    killer = threading.Thread(target=terminate_once_running)
    killer.start()
    try:
        outcome = supervise(docker_client, base_image, job, ["sleep", "sleep"], out=out)
        killer.join()
        assert signal.getsignal(signal.SIGTERM) is recorder, "the handler before it is back"
    finally:
        killer.join()
        signal.signal(signal.SIGTERM, previous)
        assert leftovers(docker_client, job) == []
    assert outcome.status == EXIT_TERMINATED and outcome.reason == "stopped by SIGTERM"
    log = out.getvalue()
    assert f"[{job}-master-0] got SIGTERM" in log and f"[{job}-worker-0] got SIGTERM" in log, \
        "each replica was asked to stop (the worker saves a checkpoint then)"


# ------------------------------------------------------------------ training in containers of the trainer image

MAX_UPDATE = 24
SAVE_EVERY = 4


@pytest.fixture(scope="module")
def s3_training(moto_s3, fast_data_bin, tmp_path_factory):
    """A bucket holding the fast data-bin, and the config of a 2-replica x 1-process container job on it."""
    import boto3

    from lmforge.io import storage

    bucket = f"replicas-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=moto_s3).create_bucket(Bucket=bucket)
    data_bin = f"s3://{bucket}/data/data-bin"
    storage.put_dir(fast_data_bin, data_bin, endpoint_url=moto_s3)
    corpus = tmp_path_factory.mktemp("replicas-corpus")
    (corpus / "manifest.json").write_text(json.dumps({"sha256": "0" * 64, "splits": {}}))
    return {"bucket": bucket, "data_bin": data_bin, "corpus": corpus, "endpoint": moto_s3}


def container_config(s3_training, tracking_uri):
    return config.load(TINY_CONFIG, [
        *FAST_TRAINING, "train.launcher=local", "train.local_replicas=containers", "train.nnodes=2",
        f"train.max_update={MAX_UPDATE}", f"train.save_interval_updates={SAVE_EVERY}",
        "train.pytorchjob.backoff_limit=4",
        f"storage.root=s3://{s3_training['bucket']}/runs", f"storage.s3_endpoint={s3_training['endpoint']}",
        f"tracking.uri={tracking_uri}",
    ])


def train_in_containers(cfg, s3_training, run_id):
    """The train step, as `lmforge run` runs it; (best checkpoint, wall seconds, the replicas' log)."""
    from lmforge import steps

    log_text = io.StringIO()  # where the supervisor streams the replicas' logs (its stderr)
    started = time.monotonic()
    try:
        with contextlib.redirect_stderr(log_text):
            best = steps.train(cfg.to_json(), run_id, str(s3_training["corpus"]), s3_training["data_bin"])
    except BaseException:
        print(log_text.getvalue()[-6000:])
        raise
    return best, time.monotonic() - started, log_text.getvalue()


def replica_lines(log_text: str, name: str) -> str:
    prefix = f"[{name}] "
    return "".join(line[len(prefix):] + "\n" for line in log_text.splitlines() if line.startswith(prefix))


def train_loss_steps(tracking_uri, experiment, run_id):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id],
                                f"tags.`lmforge.pipeline_run_id` = '{run_id}'")
    return [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")]


@pytest.fixture(scope="module")
def uninterrupted(docker_client, trainer_image, s3_training, mlflow_server):
    """Run (a): the 2-replica container job to its end, nothing interrupted."""
    cfg = container_config(s3_training, mlflow_server.url)
    run_id = f"replicas-{uuid.uuid4().hex[:8]}"
    best, wall_s, log_text = train_in_containers(cfg, s3_training, run_id)
    return {"cfg": cfg, "run_id": run_id, "job": f"lmforge-{run_id}", "best": best, "log": log_text, "wall_s": wall_s}


@pytest.mark.docker
@pytest.mark.slow
def test_two_replica_containers_train_from_s3_and_only_rank_0_logs(uninterrupted, docker_client, mlflow_server):
    from lmforge.io import storage
    from lmforge.training import checkpoints

    job, log_text = uninterrupted["job"], uninterrupted["log"]
    assert leftovers(docker_client, job) == []
    checkpoint_uri = uninterrupted["best"].rsplit("/", 1)[0]
    names = storage.list_files(checkpoint_uri)
    assert {"checkpoint_best.pt", "checkpoint_last.pt", "checkpoints.json", "run-config.json"} <= set(names)
    assert [name for name in names if re.fullmatch(r"checkpoint_\d+_\d+\.pt", name)], f"no interval checkpoint: {names}"
    assert checkpoints.summary(checkpoint_uri)["num_updates"] == MAX_UPDATE
    master, worker = (replica_lines(log_text, f"{job}-{role}") for role in ("master-0", "worker-0"))
    assert "rank 0/2" in master and "rank 1/2" in worker, "each replica ran as its pod would"
    assert sorted(train_inner_losses(master)) == list(range(1, MAX_UPDATE + 1))
    assert train_inner_losses(worker) == {}, "fairseq prints progress on rank 0 only"
    cfg = uninterrupted["cfg"]
    steps_logged = train_loss_steps(mlflow_server.url, cfg.tracking.experiment, uninterrupted["run_id"])
    assert sorted(steps_logged) == list(range(1, MAX_UPDATE + 1)), "one value per update: rank 1 logged nothing"
    print(f"containers: 2 replicas x 1 process, {MAX_UPDATE} updates in {uninterrupted['wall_s']:.1f} s")


@pytest.mark.docker
@pytest.mark.slow
def test_container_replicas_train_exactly_as_process_replicas(uninterrupted, s3_training, tmp_path, capfd):
    """The peer: the same job with train.local_replicas: processes (the same seed, data and world
    size) logs the same loss at every update; the wall times of both, in the same session."""
    from lmforge import steps

    cfg = uninterrupted["cfg"]
    cfg = cfg.replace(train=dataclasses.replace(cfg.train, local_replicas="processes",
                                                cache_dir=str(tmp_path / "cache")))
    capfd.readouterr()
    started = time.monotonic()
    steps.train(cfg.to_json(), f"replicas-{uuid.uuid4().hex[:8]}", str(s3_training["corpus"]), s3_training["data_bin"])
    wall_s = time.monotonic() - started
    processes = train_inner_losses("".join(capfd.readouterr()))
    containers_losses = train_inner_losses(replica_lines(uninterrupted["log"], f"{uninterrupted['job']}-master-0"))
    assert processes == containers_losses and sorted(processes) == list(range(1, MAX_UPDATE + 1))
    print(f"2 replicas x 1 process, {MAX_UPDATE} updates: containers {uninterrupted['wall_s']:.1f} s, "
          f"processes {wall_s:.1f} s (ratio {uninterrupted['wall_s'] / wall_s:.2f})")


@contextlib.contextmanager
def supervisor_messages():
    """The supervisor's log messages (caplog's handler on the root logger does not survive the train
    step's logging setup)."""
    messages: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = logging.getLogger(containers.__name__)
    logger.addHandler(handler)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)


@pytest.mark.docker
@pytest.mark.slow
def test_a_killed_worker_is_restarted_and_training_resumes_with_the_same_losses(
    uninterrupted, docker_client, s3_training, mlflow_server,
):
    """`docker kill` of the Worker after the second checkpoint upload: it exits 137, the Master's
    collective breaks (it exits 138), the supervisor restarts both, and they resume from the
    newest uploaded checkpoint with the uninterrupted run's losses."""
    from lmforge.io import storage

    cfg = uninterrupted["cfg"]
    run_id = f"replicas-{uuid.uuid4().hex[:8]}"
    job = f"lmforge-{run_id}"
    manifest = f"s3://{s3_training['bucket']}/runs/{cfg.name}/{run_id}/checkpoints/checkpoints.json"
    killed: dict = {}

    def kill_after_second_upload():
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            try:
                text = storage.read_text(manifest, endpoint_url=s3_training["endpoint"])
                entry = json.loads(text)["checkpoints"].get("checkpoint_last.pt", {})
            except (LmforgeError, ValueError):
                # not there yet, or rewritten between read_text's size and its read (a cut JSON):
                # the next poll reads it whole; an exception here would end the killer silently
                entry = {}
            if entry.get("num_updates", 0) >= 2 * SAVE_EVERY:
                docker_client.containers.get(f"{job}-worker-0").kill()
                killed["after_upload_of"] = entry["num_updates"]
                return
            time.sleep(0.3)

    killer = threading.Thread(target=kill_after_second_upload, daemon=True)
    killer.start()
    with supervisor_messages() as messages:
        _, wall_s, log_text = train_in_containers(cfg, s3_training, run_id)
    killer.join(timeout=5)
    assert leftovers(docker_client, job) == []
    assert killed and killed["after_upload_of"] < MAX_UPDATE, "the Worker was killed mid-training"

    restarts = [message for message in messages if "restarting it" in message]
    assert any(m.startswith(f"{job}-worker-0 exited with 137 (retryable)") for m in restarts), restarts
    assert any(m.startswith(f"{job}-master-0 exited with {EXIT_TRANSIENT} (retryable)") for m in restarts), \
        f"the surviving rank exits retryable, so an operator restarts it: {restarts}"

    master = replica_lines(log_text, f"{job}-master-0")
    marker = "resuming from "
    resumed_text = master[master.rindex(marker):]
    resumed_at = int(resumed_text.split("(", 1)[1].split(" updates)", 1)[0])
    assert resumed_text.startswith(f"{marker}s3://{s3_training['bucket']}/runs/{cfg.name}/{run_id}/checkpoints/")
    assert killed["after_upload_of"] <= resumed_at < MAX_UPDATE
    losses = train_inner_losses(resumed_text)
    assert sorted(losses) == list(range(resumed_at + 1, MAX_UPDATE + 1)), "on from the uploaded checkpoint"
    reference = train_inner_losses(replica_lines(uninterrupted["log"], f"{uninterrupted['job']}-master-0"))
    expected = {u: loss for u, loss in reference.items() if u > resumed_at}
    assert losses == expected
    steps_logged = train_loss_steps(mlflow_server.url, cfg.tracking.experiment, run_id)
    assert set(steps_logged) == set(range(1, MAX_UPDATE + 1))
    print(f"kill-and-resume in containers: Worker killed after the upload at {killed['after_upload_of']} updates, "
          f"resumed at {resumed_at}; {wall_s:.1f} s (uninterrupted: {uninterrupted['wall_s']:.1f} s); "
          f"losses after the resume: {losses}; uninterrupted: {expected}; restarts: {restarts}")


@pytest.mark.docker
@pytest.mark.slow
def test_a_bad_argument_fails_fast_in_one_line_with_no_container_left(docker_client, trainer_image, s3_training,
                                                                      tmp_path, monkeypatch):
    from lmforge.training.launchers import local
    from lmforge.training.worker import worker_args

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_training["endpoint"])  # what the replicas are given

    cfg = config.load(TINY_CONFIG, [*FAST_TRAINING, "train.max_update=2", "train.local_replicas=containers",
                                    "train.nnodes=2"])
    absent = f"s3://{s3_training['bucket']}/absent/run-config.json"
    job = job_name()
    started = time.monotonic()
    with pytest.raises(LmforgeError) as info:
        local.launch(cfg, worker_args(absent, s3_training["data_bin"], f"s3://{s3_training['bucket']}/absent"),
                     cache_dir=tmp_path, job_name=job)
    wall_s = time.monotonic() - started
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"training failed: the emulated PyTorchJob {job} (2 replica container(s) x 1 "
                              f"process(es)): {job}-master-0 exited with 1, a permanent failure: lmforge: error: config {absent} "
                              "does not exist"), message
    assert leftovers(docker_client, job) == []
    assert wall_s < 120
    print(f"a permanent failure in containers: {wall_s:.1f} s to the error")
