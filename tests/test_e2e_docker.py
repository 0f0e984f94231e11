"""`lmforge run --runner docker` against `--runner subprocess`: the tiny config on one small corpus,
run once with each runner. Every step in a container of the steps image gives the same data-bin
bytes, the same test perplexity and a registered model that loads and scores the same; the
files the containers wrote are the invoking user's, and no container is left, after a success,
a failing step or a SIGTERM. The wall time of both runs is printed (pytest -s shows it).

    PYTHONPATH=src .venv/bin/python -m pytest -s tests/test_e2e_docker.py
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import TINY_CONFIG, lmforge_run, registered_model_scores, write_corpus
from lmforge.pipeline.docker_run import LABEL

pytestmark = [pytest.mark.docker, pytest.mark.slow, pytest.mark.e2e]
# Few updates: 300 lines are ~4 updates an epoch of 2 processes x 2048 tokens.
OVERRIDES = ("train.max_epoch=2",)
MODEL_URI = "models:/tiny-transformer-lm@champion"
TEXTS = ["the album was released in the united states on 12 may 2009 .", "the game was"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"), train_lines=300)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, corpus, steps_image) -> dict[str, dict]:
    """runner -> its storage root, printed summary and wall time."""
    results = {}
    for runner in ("subprocess", "docker"):
        tmp = tmp_path_factory.mktemp(runner)
        start = time.monotonic()
        summary = lmforge_run(tmp, corpus, tmp / "runs", *OVERRIDES, runner=runner)
        results[runner] = {"root": tmp / "runs", "summary": summary, "seconds": time.monotonic() - start}
    seconds = {runner: round(r["seconds"], 1) for runner, r in results.items()}
    print(f"\ntiny run wall time: {seconds} s; docker/subprocess {seconds['docker'] / seconds['subprocess']:.2f}")
    return results


def data_bin_digests(root: Path) -> dict[str, str]:
    [data_bin] = (root / "data" / "data-bin").iterdir()
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(data_bin.iterdir()) if p.is_file()}


def test_same_data_bin_bytes(runs) -> None:
    subprocess_bin, docker_bin = (data_bin_digests(runs[r]["root"]) for r in ("subprocess", "docker"))
    assert {"dict.txt", "train.bin", "train.idx", "test.bin", "test.idx"} <= set(docker_bin)
    assert docker_bin == subprocess_bin


def test_same_test_perplexity(runs) -> None:
    def perplexity(runner: str) -> float:
        result = json.loads((Path(runs[runner]["summary"]["outputs"]) / "eval" / "metrics.json").read_text())
        assert result["split"] == "test"
        return result["perplexity"]

    assert perplexity("docker") == pytest.approx(perplexity("subprocess"), abs=1e-4)


def test_the_registered_model_loads_and_scores_as_the_subprocess_runs(runs) -> None:
    scores = {}
    for runner in ("subprocess", "docker"):
        assert runs[runner]["summary"]["model"] == MODEL_URI
        scores[runner] = registered_model_scores(f"sqlite:///{runs[runner]['root'] / 'mlflow.db'}", MODEL_URI, TEXTS)
    assert [row["tokens"] for row in scores["docker"]] == [len(text.split()) for text in TEXTS]
    for docker_row, subprocess_row in zip(scores["docker"], scores["subprocess"]):
        assert docker_row["log_prob"] == pytest.approx(subprocess_row["log_prob"], abs=1e-4)


def test_what_the_containers_wrote_is_the_users(runs) -> None:
    root = runs["docker"]["root"]
    owners = {(p.stat().st_uid, p.stat().st_gid) for p in root.rglob("*")}
    assert owners == {(os.getuid(), os.getgid())}
    assert list(root.glob("tiny/*/checkpoints/checkpoint_best.pt")), "the train step wrote its checkpoint"


def leftover_containers(client, root: Path) -> list[str]:
    """Step containers (of any run) that have something under `root` mounted."""
    return [c.name for c in client.containers.list(all=True, filters={"label": LABEL})
            if any(m["Source"].startswith(str(root)) for m in c.attrs["Mounts"])]


def test_no_container_outlives_the_run(runs, docker_client) -> None:
    assert leftover_containers(docker_client, runs["docker"]["root"]) == []


def lmforge_docker_run(cwd: Path, corpus: Path, *overrides: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "lmforge.cli", "run", "--config", str(TINY_CONFIG), "--corpus", str(corpus),
         "--set", f"storage.root={cwd / 'runs'}", *(x for o in overrides for x in ("--set", o)), "--runner", "docker"],
        cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def test_a_failing_step_is_its_one_line_error(tmp_path, corpus, docker_client, steps_image) -> None:
    """The download step (in its container) refuses a corpus without test.txt: its line, written to the
    error file under the mounted pipeline root, is what `lmforge run` prints; the status is the step's,
    not the 0 kfp 2.17.3's DockerRunner reads for a removed container."""
    broken = tmp_path / "corpus"
    broken.mkdir()
    for split in ("train", "valid"):
        (broken / f"{split}.txt").write_bytes((corpus / f"{split}.txt").read_bytes())
    proc = lmforge_docker_run(tmp_path, broken)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 1, stdout[-2000:] + stderr[-2000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("lmforge: error: download step: ") and "test" in last, last
    assert leftover_containers(docker_client, tmp_path) == []


def train_container(client, root: Path):
    """The running train step's container of the run under `root`, or None."""
    names = set(leftover_containers(client, root))
    return next((c for c in client.containers.list(filters={"label": LABEL})
                 if c.name in names and "lmforge.steps import train" in str(c.attrs["Config"]["Cmd"])), None)


def processes(container) -> list[str]:
    top = container.top(ps_args="-eo pid,args")  # the engine needs the pid column to pick the container's
    return [" ".join(row) for row in top["Processes"]]


def test_sigterm_removes_the_running_step_containers(tmp_path, corpus, docker_client, steps_image) -> None:
    """SIGTERM while the train step's container runs torchrun and its 2 workers: the container goes,
    the run exits 143."""
    proc = lmforge_docker_run(tmp_path, corpus, "train.max_epoch=50")
    try:
        deadline = time.monotonic() + 420
        while (train := train_container(docker_client, tmp_path)) is None or \
                sum("-m lmforge.worker" in p and "torch.distributed.run" not in p for p in processes(train)) < 2:
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the train step's torchrun never started 2 workers"
            time.sleep(0.5)
        assert any("torch.distributed.run --standalone --nnodes 1 --nproc-per-node 2" in p for p in processes(train))
        proc.send_signal(signal.SIGTERM)
        proc.send_signal(signal.SIGTERM)  # a second one (as `timeout` sends) must not cut the removal short
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    # On stdout: KFP's local runner logs there while a task runs.
    assert "SIGTERM: stopping the run; removed 1 step container(s)" in stdout
    assert leftover_containers(docker_client, tmp_path) == []
