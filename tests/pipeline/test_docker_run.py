"""`lmforge run --runner docker` (lmforge.pipeline.docker_run): what each step container is given,
the one-line refusals, and, with a Docker engine, the step containers themselves: their exit
status, their user, their removal. The whole tiny run in containers is tests/test_e2e_docker.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import REPO, TINY_CONFIG
from lmforge import config as config_mod
from lmforge.errors import LmforgeError
from lmforge.pipeline import docker_run
from lmforge.pipeline.docker_run import Bind


def tiny(*overrides: str):
    return config_mod.load(TINY_CONFIG, list(overrides))


def by_path(binds: list[Bind]) -> dict[str, bool]:
    """path -> read_only."""
    return {str(b.path): b.read_only for b in binds}


# --------------------------------------------------------------------------- what a container is given


def test_binds_are_the_storage_root_and_the_corpus_read_only(tmp_path: Path) -> None:
    cfg = tiny(f"storage.root={tmp_path / 'runs'}", f"corpus.source={tmp_path / 'corpus'}")
    # KFP's pipeline root (under the root here) is KFP's to mount; the embedded MLflow file is under the root.
    assert by_path(docker_run.binds(cfg, tmp_path / "runs" / "kfp-local", {})) == {
        str(tmp_path / "runs"): False, str(tmp_path / "corpus"): True,
    }


def test_a_path_under_a_read_write_bind_gets_none_of_its_own(tmp_path: Path) -> None:
    cfg = tiny(f"storage.root={tmp_path}", f"corpus.source={tmp_path / 'corpus'}",
               f"train.cache_dir={tmp_path / 'cache'}", f"tracking.uri=sqlite:///{tmp_path / 'db' / 'm.db'}")
    assert by_path(docker_run.binds(cfg, tmp_path / "kfp-local", {})) == {str(tmp_path): False}


def test_binds_for_tracking_caches_tokenizer_and_scratch_outside_the_root(tmp_path: Path) -> None:
    cfg = tiny(
        f"storage.root={tmp_path / 'runs'}", f"corpus.source=file://{tmp_path / 'corpus.txt'}",
        f"tracking.uri=sqlite:///{tmp_path / 'db' / 'mlflow.db'}", f"train.cache_dir={tmp_path / 'cache'}",
        "preprocess.tokenizer=bpe", f"preprocess.tokenizer_file={tmp_path / 'tok.json'}",
    )
    environ = {"LMFORGE_CACHE_DIR": str(tmp_path / "env-cache"), "LMFORGE_SCRATCH": str(tmp_path / "scratch")}
    assert by_path(docker_run.binds(cfg, tmp_path / "kfp", environ)) == {
        str(tmp_path / "runs"): False,
        str(tmp_path / "corpus.txt"): True,
        str(tmp_path / "tok.json"): True,
        str(tmp_path / "db"): False,  # SQLite writes its journal beside the file
        str(tmp_path / "cache"): False,
        str(tmp_path / "env-cache"): False,
        str(tmp_path / "scratch"): False,
    }


def test_nothing_is_mounted_for_remote_corpus_storage_and_tracking(tmp_path: Path) -> None:
    cfg = tiny("storage.root=s3://bucket/runs", "corpus.source=wikitext-2", "tracking.uri=http://127.0.0.1:5000")
    assert docker_run.binds(cfg, tmp_path / "kfp", {}) == []
    cfg = tiny("storage.root=s3://bucket/runs", "corpus.source=https://example.org/c.zip",
               "tracking.uri=postgresql://u@127.0.0.1/mlflow")
    assert docker_run.binds(cfg, tmp_path / "kfp", {}) == []


def test_a_relative_path_is_refused_naming_its_setting(tmp_path: Path) -> None:
    cfg = tiny(f"storage.root={tmp_path}", f"corpus.source={tmp_path}", "train.cache_dir=cache")
    with pytest.raises(LmforgeError, match=r"^train.cache_dir: cache is relative; with --runner docker give an absolute"):
        docker_run.binds(cfg, tmp_path / "kfp", {})
    cfg = tiny(f"storage.root={tmp_path}", f"corpus.source={tmp_path}", "tracking.uri=sqlite:///mlflow.db")
    with pytest.raises(LmforgeError, match=r"^tracking.uri: sqlite:///mlflow.db names a relative SQLite file"):
        docker_run.binds(cfg, tmp_path / "kfp", {})


def test_the_environment_is_mlflow_aws_lmforge_and_loglevel_only() -> None:
    environ = {
        "MLFLOW_TRACKING_URI": "http://127.0.0.1:5000", "AWS_ENDPOINT_URL": "http://127.0.0.1:9000",
        "AWS_ACCESS_KEY_ID": "k", "LMFORGE_ERROR_FILE": "/r/kfp-local/e/error", "LOGLEVEL": "DEBUG",
        "PATH": "/usr/bin", "HOME": "/root", "PYTHONPATH": "/src", "VIRTUAL_ENV": "/venv", "SECRET": "x",
        "DOCKER_HOST": "unix:///d.sock",
    }
    assert docker_run.container_environment(environ, "alice") == {
        "MLFLOW_TRACKING_URI": "http://127.0.0.1:5000", "AWS_ENDPOINT_URL": "http://127.0.0.1:9000",
        "AWS_ACCESS_KEY_ID": "k", "LMFORGE_ERROR_FILE": "/r/kfp-local/e/error", "LOGLEVEL": "DEBUG",
        "HOME": "/tmp", "USER": "alice",
    }


@pytest.mark.parametrize("quantity, expected", [("2Gi", 2 * 2**30), ("64Mi", 64 * 2**20), ("1G", 10**9), ("512", 512)])
def test_shm_size_reads_a_kubernetes_quantity(quantity: str, expected: int) -> None:
    assert docker_run.quantity_bytes(quantity) == expected


def test_run_arguments_host_network_invoking_user_same_path_mounts(tmp_path: Path) -> None:
    cfg = tiny(f"storage.root={tmp_path / 'runs'}", f"corpus.source={tmp_path / 'corpus'}")
    mounts = docker_run.binds(cfg, tmp_path / "runs" / "kfp-local", {})
    args = docker_run.run_arguments(cfg, mounts, {"LOGLEVEL": "INFO", "TERM": "xterm"}, uid=1234, gid=567,
                                    user_name="alice")
    assert args["network_mode"] == "host" and args["user"] == "1234:567"
    assert args["environment"] == {"LOGLEVEL": "INFO", "HOME": "/tmp", "USER": "alice"}
    assert args["shm_size"] == 2 * 2**30  # cluster.shm_size, as the cluster's pods get
    assert [(m["Source"], m["Target"], m["ReadOnly"]) for m in args["mounts"]] == [
        (str(tmp_path / "runs"), str(tmp_path / "runs"), False),
        (str(tmp_path / "corpus"), str(tmp_path / "corpus"), True),
    ]
    from kfp import local

    local.DockerRunner(**args)  # every argument is one DockerRunner passes on to containers.run


def test_docker_runner_refuses_a_pytorchjob_launcher(tmp_path: Path) -> None:
    from lmforge.pipeline.local_run import check_runner

    with pytest.raises(LmforgeError, match="set train.launcher=local"):
        check_runner(tiny("train.launcher=pytorchjob"), "docker")


def lmforge_run_docker(tmp_path: Path, docker_host: str) -> subprocess.CompletedProcess:
    corpus = tmp_path / "corpus"
    corpus.mkdir(exist_ok=True)
    env = {**os.environ, "DOCKER_HOST": docker_host, "PYTHONPATH": str(REPO / "src")}
    return subprocess.run(
        [sys.executable, "-m", "lmforge.cli", "run", "--config", str(TINY_CONFIG), "--corpus", str(corpus),
         "--set", f"storage.root={tmp_path / 'runs'}", "--runner", "docker"],
        cwd=tmp_path, capture_output=True, text=True, env=env, timeout=120,
    )


def test_no_engine_is_one_line_before_anything_runs(tmp_path: Path) -> None:
    result = lmforge_run_docker(tmp_path, f"unix://{tmp_path / 'no-engine.sock'}")
    assert result.returncode == 1
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"lmforge: error: --runner docker: no Docker engine answers at unix://{tmp_path}/no-engine.sock (")
    assert line.endswith("); start one or set DOCKER_HOST, or use --runner subprocess")
    assert not (tmp_path / "runs").exists()


# --------------------------------------------------------------------------- with an engine


@pytest.mark.docker
def test_a_missing_steps_image_names_the_command_that_builds_it(docker_client) -> None:
    with pytest.raises(LmforgeError) as raised:
        docker_run.require_images(docker_client, ["ghcr.io/lmforge/lmforge-steps:0.0.0-dockerrun-absent"])
    assert str(raised.value) == (
        "--runner docker: the steps image ghcr.io/lmforge/lmforge-steps:0.0.0-dockerrun-absent is not in the "
        "Docker engine; build it with `lmforge images build --role steps`"
    )


def run_containers(docker_client) -> list:
    return docker_client.containers.list(all=True, filters={"label": docker_run.LABEL})


@pytest.mark.docker
@pytest.mark.slow
def test_a_failing_step_container_reports_its_status(docker_client, steps_image) -> None:
    """kfp 2.17.3's own run_docker_container returned 0 for 4 of 5 such containers here."""
    containers = docker_run.StepContainers(docker_client)
    try:
        statuses = [containers.run(docker_client, steps_image, ["python3", "-c", "import sys; sys.exit(3)"], {},
                                   network_mode="host") for _ in range(10)]
        assert statuses == [3] * 10
        assert containers.run(docker_client, steps_image, ["true"], {}, network_mode="host") == 0
        assert [c for c in run_containers(docker_client) if c.labels[docker_run.LABEL] == containers.token] == []
    finally:
        containers.remove_all()


@pytest.mark.docker
@pytest.mark.slow
def test_stop_kills_a_running_step_and_its_status_says_killed(docker_client, steps_image) -> None:
    containers = docker_run.StepContainers(docker_client)
    status: list[int] = []
    step = threading.Thread(target=lambda: status.append(
        containers.run(docker_client, steps_image, ["sleep", "300"], {}, network_mode="host")))
    try:
        step.start()
        deadline = time.monotonic() + 60
        while not docker_client.containers.list(filters={"label": f"{docker_run.LABEL}={containers.token}"}):
            assert time.monotonic() < deadline, "the step container never started"
            time.sleep(0.2)
        assert containers.stop() == 1
        step.join(60)
        assert status == [docker_run.KILLED]
        assert containers.run(docker_client, steps_image, ["true"], {}) == docker_run.KILLED, \
            "a stopping run starts no further step"
    finally:
        containers.stop()


@pytest.mark.docker
@pytest.mark.slow
def test_a_step_container_runs_as_the_given_user_with_a_home(docker_client, steps_image, tmp_path) -> None:
    """Any uid, known to the image or not: it writes the mounted root as itself, has a writable HOME,
    and getpass names its user (MLflow's run context calls it and catches only ImportError). The tests
    run as root, so the host's uid would not show it."""
    root = tmp_path / "runs"
    root.mkdir()
    (tmp_path / "corpus").mkdir()
    os.chown(root, 23456, 23456)
    cfg = tiny(f"storage.root={root}", f"corpus.source={tmp_path / 'corpus'}")
    args = docker_run.run_arguments(cfg, docker_run.binds(cfg, tmp_path / "kfp", {}), {}, uid=23456, gid=23456,
                                    user_name="alice")
    code = (
        "import getpass, os, pathlib; "
        "pathlib.Path(os.path.expanduser('~/.cache/lmforge')).mkdir(parents=True); "
        f"pathlib.Path('{root}/out').write_text(getpass.getuser())"
    )
    containers = docker_run.StepContainers(docker_client)
    try:
        assert containers.run(docker_client, steps_image, ["python3", "-c", code], {}, **args) == 0
    finally:
        containers.remove_all()
    assert (root / "out").read_text() == "alice"  # what MLflow records as the run's user
    assert ((root / "out").stat().st_uid, (root / "out").stat().st_gid) == (23456, 23456)
