"""`lmforge images wheelhouse`: the pip commands it runs and when it runs none.

The real fill (about 490 MB from PyPI and the machine's torch wheel) is what the container
tests' `wheelhouse` fixture does before every hermetic build (tests/docker_env.py).

    PYTHONPATH=src .venv/bin/pytest tests/pipeline/test_wheelhouse.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from lmforge import cli
from lmforge.pipeline import wheelhouse

REPO = Path(__file__).resolve().parents[2]


def test_commands_resolve_as_install_sh_does(tmp_path) -> None:
    torch, pins = wheelhouse.download_commands(REPO, tmp_path, variant="cpu", index="https://download.pytorch.org/whl/cpu")
    lock = str(REPO / "requirements.lock")
    assert torch[:3] == [sys.executable, "-m", "pip"] and "download" in torch
    assert torch[-1] == "torch==2.13.0+cpu", "the exact build: a bare torch would be PyPI's CUDA one"
    assert torch[torch.index("-c") + 1] == lock, "torch's own dependencies are held to the lock"
    assert torch[torch.index("--extra-index-url") + 1] == "https://download.pytorch.org/whl/cpu"
    assert "--no-deps" not in torch, "a CUDA build brings its nvidia-* wheels as dependencies"
    assert "--no-deps" in pins and pins[pins.index("-r") + 1] == lock
    assert "ve-fairseq==0.12.3" in pins, "fairseq comes --no-deps: its declared torchaudio is never fetched"
    assert "setuptools>=70.1" in pins, "the build backend of lmforge's own wheel (pyproject's build-system)"
    for command in (torch, pins):
        assert command[command.index("--dest") + 1] == str(tmp_path)


def test_an_empty_index_uses_only_pips_own_sources(tmp_path) -> None:
    torch, _ = wheelhouse.download_commands(REPO, tmp_path, variant="cu126", index="")
    assert "--extra-index-url" not in torch and torch[-1] == "torch==2.13.0+cu126"
    assert wheelhouse.torch_index("cu126") == "https://download.pytorch.org/whl/cu126"


def test_a_stamped_wheelhouse_is_not_filled_again(tmp_path, monkeypatch) -> None:
    ran: list = []
    monkeypatch.setattr(wheelhouse, "_run", lambda command, what: ran.append(command))
    (tmp_path / wheelhouse.STAMP).write_text(json.dumps({"fingerprint": wheelhouse.fill_fingerprint(REPO, "cpu")}))
    said: list[str] = []
    wheelhouse.fill_wheelhouse(REPO, tmp_path, variant="cpu", progress=said.append)
    assert ran == [] and said == [f"wheelhouse {tmp_path} is up to date"]
    # Another torch build, or a changed lock, is another wheelhouse: filled again.
    assert not wheelhouse.is_filled(tmp_path, REPO, "cu126")
    wheelhouse.fill_wheelhouse(REPO, tmp_path, variant="cu126", progress=said.append)
    assert len(ran) == 2 and ran[0][-1] == "torch==2.13.0+cu126"
    assert json.loads((tmp_path / wheelhouse.STAMP).read_text())["torch"] == "torch==2.13.0+cu126"


def test_an_interrupted_fill_has_no_stamp(tmp_path, monkeypatch) -> None:
    def fail(command, what):
        raise wheelhouse.LmforgeError(f"{what} failed (pip exit status 1): ERROR: No matching distribution")

    monkeypatch.setattr(wheelhouse, "_run", fail)
    (tmp_path / wheelhouse.STAMP).write_text(json.dumps({"fingerprint": "an older lock"}))
    with pytest.raises(wheelhouse.LmforgeError, match="downloading wheels failed"):
        wheelhouse.fill_wheelhouse(REPO, tmp_path, variant="cpu")
    assert not (tmp_path / wheelhouse.STAMP).exists(), "a half-filled wheelhouse must not look filled"


def test_sdists_are_built_into_wheels(tmp_path, monkeypatch) -> None:
    ran: list = []
    monkeypatch.setattr(wheelhouse, "_run", lambda command, what: ran.append(command))
    (tmp_path / "antlr4-python3-runtime-4.9.3.tar.gz").write_bytes(b"")
    (tmp_path / "six-1.17.0-py2.py3-none-any.whl").write_bytes(b"")
    wheelhouse.fill_wheelhouse(REPO, tmp_path, variant="cpu", progress=lambda _: None)
    builds = [c for c in ran if "wheel" in c and "--wheel-dir" in c]
    assert len(builds) == 1 and builds[0][-1].endswith("antlr4-python3-runtime-4.9.3.tar.gz")
    assert not (tmp_path / "antlr4-python3-runtime-4.9.3.tar.gz").exists(), "the sdist gives way to its wheel"


def test_cli_errors_are_one_line(tmp_path, capsys) -> None:
    assert cli.main(["images", "wheelhouse"]) == 1
    assert "lmforge images wheelhouse DIR" in capsys.readouterr().err
    assert cli.main(["images", "wheelhouse", str(tmp_path), "--context", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert "no requirements.lock" in err and "\n" not in err
    assert cli.main(["images", "build", str(tmp_path)]) == 1
    assert f"--wheelhouse {tmp_path}" in capsys.readouterr().err
