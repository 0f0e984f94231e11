"""The `lmforge` command as a user meets it: real processes, one-line errors, exit statuses."""

import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, write_corpus

LMFORGE = [sys.executable, "-m", "lmforge.cli"]
TINY = REPO / "pipelines" / "configs" / "tiny.yaml"


def lmforge(*args, cwd=REPO, timeout=300, env=None):
    return subprocess.run([*LMFORGE, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def refused_address() -> str:
    """http://127.0.0.1:PORT where nothing listens: a port bound, then closed, refuses connections."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def assert_one_line_error(result, status, *needles):
    assert result.returncode == status, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("lmforge: error: "), result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in last, last


def assert_nothing_registered(root: Path):
    db = root / "mlflow.db"
    if not db.exists():
        return
    from mlflow import MlflowClient

    assert MlflowClient(f"sqlite:///{db}").search_registered_models() == []


def test_version():
    result = lmforge("--version")
    assert result.returncode == 0 and result.stdout.startswith("lmforge ")


def test_missing_corpus(tmp_path):
    result = lmforge("run", "--config", str(TINY), "--corpus", str(tmp_path / "nope"), "--set", f"storage.root={tmp_path}")
    assert_one_line_error(result, 1, "does not exist", "--corpus")
    assert_nothing_registered(tmp_path)
    assert not (tmp_path / "tiny").exists()


def test_malformed_yaml(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  max_epoch: [3\n")
    assert_one_line_error(lmforge("run", "--config", str(bad)), 2, "malformed YAML", str(bad))


def test_unknown_config_key(tmp_path):
    result = lmforge("run", "--config", str(TINY), "--set", "train.max_epochs=3", "--set", "oops.x=1")
    assert_one_line_error(result, 2, "train.max_epochs: unknown key", "oops: unknown key")


def test_unknown_architecture(tmp_path):
    corpus = write_corpus(tmp_path / "corpus", train_lines=50)  # the tiny config's own source may be absent
    result = lmforge("run", "--config", str(TINY), "--corpus", str(corpus), "--set", "model.arch=transformer_llm",
                     "--set", f"storage.root={tmp_path}")
    assert_one_line_error(result, 2, "model.arch", "transformer_llm")
    assert_nothing_registered(tmp_path)


def test_sha256_mismatch_stops_the_pipeline_with_nothing_registered(tmp_path):
    """The pin is checked inside the download step, so this runs the real DAG on KFP's local runner."""
    import zipfile

    corpus = write_corpus(tmp_path / "corpus", train_lines=50)
    archive = tmp_path / "corpus.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for split in ("train", "valid", "test"):
            zf.write(corpus / f"{split}.txt", f"{split}.txt")
    root = tmp_path / "runs"
    overrides = [f"corpus.source={archive}", "corpus.members={}", f"storage.root={root}"]
    bad = overrides + ["corpus.sha256=" + "0" * 64]
    result = lmforge("run", "--config", str(TINY), *(arg for o in bad for arg in ("--set", o)))
    assert_one_line_error(result, 1, "sha256", "0" * 64)
    assert_nothing_registered(root)
    # Corpora land at <storage.root>/data/corpus/<content key of the download stage>/, manifest.json last.
    assert not corpus_location(bad).exists(), "a corpus was left behind"
    assert not list(root.glob("data/corpus/*")), "a corpus was left behind"

    # The same download with the right pin publishes exactly there: the place watched above is real.
    from lmforge import config, steps

    good = overrides + [f"corpus.sha256={hashlib.sha256(archive.read_bytes()).hexdigest()}"]
    cfg = config.resolve_local_paths(config.load(TINY, good))
    outputs = steps.download(config.stage_json(cfg, "download"))
    assert Path(outputs.corpus_dir) == corpus_location(good)
    assert json.loads((corpus_location(good) / "manifest.json").read_text())["sha256"] == outputs.corpus_sha256


def corpus_location(overrides: list[str]) -> Path:
    """Where the download step publishes the tiny config's corpus under these overrides."""
    from lmforge import config

    cfg = config.resolve_local_paths(config.load(TINY, overrides))
    key = config.content_key(config.stage_json(cfg, "download"))
    return Path(cfg.storage.root) / "data" / "corpus" / key


def test_config_show_applies_overrides():
    result = lmforge("config", "show", "--config", str(TINY), "--set", "train.max_epoch=9")
    assert result.returncode == 0
    assert '"max_epoch": 9' in result.stdout


def test_config_docs_lists_every_section():
    result = lmforge("config", "docs")
    assert result.returncode == 0
    for section in ("corpus.source", "preprocess.threshold", "model.arch", "train.nproc", "evaluate.context_window",
                    "registry.model_name", "tracking.uri", "storage.root"):
        assert section in result.stdout


def test_default_config_offline_names_the_unreachable_source(tmp_path):
    """The default config downloads WikiText-2; offline it must fail in one line that says so and
    how to use a local corpus instead. Offline made deterministic, with or without internet here:
    every HTTP(S) connection goes through a proxy at a 127.0.0.1 port that refuses."""
    proxy = refused_address()
    names = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")
    env = {**os.environ, **{n: proxy for n in names}, **{n.lower(): proxy for n in names},
           "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
    result = lmforge("run", "--set", f"storage.root={tmp_path}", timeout=600, env=env)
    assert_one_line_error(result, 1, "could not reach wikitext-2", "wikitext.smerity.com", "--corpus DIR")
    assert_nothing_registered(tmp_path)


def test_corpora_lists_the_catalog():
    result = lmforge("corpora")
    assert result.returncode == 0
    for name in ("wikitext-2", "wikitext-2-raw", "wikitext-103", "wikitext-103-raw"):
        assert name in result.stdout


def test_train_checks_names_against_fairseq_before_anything(tmp_path, capsys):
    from lmforge.cli import main

    status = main(["train", "--config", str(TINY), "--set", "model.criterion=crossentropy",
                   "--data-bin", str(tmp_path / "absent"), "--checkpoints", str(tmp_path / "ckpt")])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert status == 2 and last.startswith("lmforge: error: invalid config: model.criterion: unknown fairseq criterion")
    assert not (tmp_path / "ckpt").exists()


READ_ONLY = {"models": ["models"], "models-name": ["models", "lm"], "promote": ["promote", "lm", "1", "--reason", "why"]}


@pytest.mark.parametrize("argv", READ_ONLY.values(), ids=READ_ONLY.keys())
def test_a_mistyped_sqlite_tracking_uri_is_refused_not_created(tmp_path, argv):
    typo = tmp_path / "mlfow.db"
    result = lmforge(*argv, "--tracking-uri", f"sqlite:///{typo}", cwd=tmp_path)
    assert_one_line_error(result, 1, f"no MLflow database at {typo} (tracking URI sqlite:///{typo})",
                          "pass --tracking-uri sqlite:///PATH of an existing database")
    assert list(tmp_path.iterdir()) == []


def test_a_relative_sqlite_uri_and_the_configs_default_are_refused_too(tmp_path):
    result = lmforge("models", "--tracking-uri", "sqlite:///mlfow.db", cwd=tmp_path)
    assert_one_line_error(result, 1, f"no MLflow database at {tmp_path / 'mlfow.db'}")
    result = lmforge("models", "--config", str(TINY), "--set", f"storage.root={tmp_path / 'runs'}", cwd=tmp_path)
    assert_one_line_error(result, 1, f"no MLflow database at {tmp_path / 'runs' / 'mlflow.db'}")
    assert list(tmp_path.iterdir()) == []


def test_an_existing_database_is_read(tmp_path, empty_mlflow_db):
    db = tmp_path / "mlflow.db"
    db.write_bytes(empty_mlflow_db.read_bytes())
    result = lmforge("models", "--tracking-uri", f"sqlite:///{db}", cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.strip() == "no registered models", result.stderr[-2000:]
    result = lmforge("promote", "lm", "1", "--reason", "why", "--tracking-uri", "sqlite:///mlflow.db", cwd=tmp_path)
    assert_one_line_error(result, 1, "registered model 'lm' does not exist")


def test_register_runs_the_register_step(tiny_lm, tmp_path, capsys):
    """`lmforge register` is the pipeline's register step: its MLflow run is found by a pipeline run id
    (manual-<checkpoint dir>), and the version carries the step's lineage tags; --run-id adopts a run."""
    from mlflow import MlflowClient

    from lmforge.cli import main
    from lmforge.tracking import PIPELINE_RUN_TAG

    root = tmp_path / "runs"
    argv = ["register", "--config", str(TINY), "--set", f"storage.root={root}", "--set", "evaluate.split=valid",
            "--set", "evaluate.other_splits=[]", "--data-bin", str(tiny_lm.data_bin), "--checkpoint", str(tiny_lm.checkpoint)]
    assert main(argv) == 0  # no --metrics: evaluated first
    out = capsys.readouterr().out
    result = json.loads(out[out.index("{"):])
    assert result["version"] == "1" and result["alias"] == "champion"
    assert result["model_uri"] == "models:/tiny-transformer-lm@champion" and result["reason"] == "first model for this name"
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    pipeline_run_id = f"manual-{tiny_lm.checkpoint.parent.name}"
    version = client.get_model_version("tiny-transformer-lm", "1")
    assert version.run_id == result["run_id"] and version.tags["pipeline_run_id"] == pipeline_run_id
    assert client.get_run(result["run_id"]).data.tags[PIPELINE_RUN_TAG] == pipeline_run_id

    experiment = client.create_experiment("elsewhere", artifact_location=(tmp_path / "elsewhere").as_uri())
    elsewhere = client.create_run(experiment).info.run_id
    assert main([*argv, "--set", "registry.model_name=other-lm", "--run-id", elsewhere]) == 0
    out = capsys.readouterr().out
    assert json.loads(out[out.index("{"):])["run_id"] == elsewhere
    assert client.get_model_version("other-lm", "1").run_id == elsewhere

    assert main([*argv, "--run-id", "0" * 32]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(f"lmforge: error: MLflow run {'0' * 32} not found")
