"""The evaluate stage against the real fairseq-eval-lm CLI on the same checkpoint and settings.

The checkpoint is the session's `trained_checkpoints` (real torchrun training); the text scored
is a small slice of WikiText-2 binarized with that model's dictionary by fairseq-preprocess
itself, so each evaluation takes a second, not a minute.
"""

import json
import math
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import TINY_CONFIG, VENV_BIN, corpus_text
from lmforge import config
from lmforge.errors import LmforgeError
from lmforge.models.evaluate import evaluate, identity_sha256
from lmforge.tasks.language_modeling import TASK as LM
from lmforge.tasks.language_modeling import split_sha256

evaluation_identity = LM.evaluation_identity

CONTEXT = ["evaluate.context_window=64"]


def fairseq_eval_lm(args: list[str]) -> tuple[float, float, int]:
    out = subprocess.run([str(VENV_BIN / "fairseq-eval-lm"), *args], capture_output=True, text=True, check=True)
    log = out.stdout + out.stderr
    match = re.search(r"Loss \(base 2\): ([0-9.]+), Perplexity: ([0-9.]+)", log)
    tokens = int(re.search(r"Evaluated ([\d,]+) tokens", log).group(1).replace(",", ""))
    return float(match.group(1)), float(match.group(2)), tokens


def binarize(dict_txt: Path, texts: dict[str, str], dest: Path) -> Path:
    """fairseq-preprocess (in this process) of `texts` with an existing dictionary."""
    from fairseq import options
    from fairseq_cli import preprocess

    src = dest.parent / "text"
    src.mkdir(parents=True, exist_ok=True)
    argv = ["--only-source", "--srcdict", str(dict_txt), "--destdir", str(dest), "--workers", "1"]
    for split, text in texts.items():
        (src / f"{split}.txt").write_text(text, encoding="utf-8")
        argv += [f"--{split}pref", str(src / f"{split}.txt")]
    preprocess.main(options.get_preprocessing_parser().parse_args(argv))
    shutil.copyfile(dict_txt, dest / "dict.txt")  # byte for byte the model's dictionary
    return dest


@pytest.fixture(scope="module")
def eval_bin(small_data_bin, tmp_path_factory) -> Path:
    lines = (corpus_text() / "test.txt").read_text(encoding="utf-8").splitlines(keepends=True)
    texts = {"test": "".join(lines[-150:]), "valid": "".join(lines[:150])}
    return binarize(small_data_bin / "dict.txt", texts, tmp_path_factory.mktemp("eval") / "data-bin")


@pytest.fixture(scope="module")
def checkpoint(trained_checkpoints) -> Path:
    return trained_checkpoints[0] / "checkpoint_best.pt"


@pytest.fixture(scope="module")
def results(eval_bin, checkpoint):
    """Our evaluation per setting, computed once for the module."""
    return {name: evaluate(config.load(TINY_CONFIG, o), eval_bin, checkpoint) for name, o in (("blocks", []), ("context", CONTEXT))}


@pytest.mark.parametrize("name,overrides", [("blocks", []), ("context", CONTEXT)], ids=["blocks", "context-window"])
def test_numbers_equal_fairseq_eval_lm(results, eval_bin, checkpoint, name, overrides):
    cfg = config.load(TINY_CONFIG, overrides)
    ours = results[name]
    # The valid split too (also scored, not gated), once: each CLI run costs seconds.
    for split in ("test", "valid") if name == "blocks" else ("test",):
        loss, ppl, tokens = fairseq_eval_lm(LM.eval_args(cfg, str(eval_bin), str(checkpoint), split=split))
        numbers = ours["splits"][split]
        assert numbers["loss_base2"] == pytest.approx(loss, abs=1e-4)  # the CLI prints 4 decimals
        assert numbers["perplexity"] == pytest.approx(ppl, abs=0.01)
        assert numbers["tokens"] == tokens > 1000
        assert numbers["loss"] == pytest.approx(numbers["loss_base2"] * math.log(2))
        assert numbers["tokens_per_second"] > 0
    assert ours["split"] == "test" and ours["perplexity"] == ours["splits"]["test"]["perplexity"]


def test_context_window_changes_the_result_and_the_identity(results):
    plain, windowed = results["blocks"], results["context"]
    assert plain["tokens"] == windowed["tokens"]  # every token scored once either way
    assert windowed["loss_base2"] != pytest.approx(plain["loss_base2"], abs=1e-6)
    assert plain["identity"]["context_window"] == 0 and windowed["identity"]["context_window"] == 64
    assert plain["identity_sha256"] != windowed["identity_sha256"]


def test_identity_names_dictionary_split_and_settings(results, eval_bin):
    identity = results["blocks"]["identity"]
    assert identity == {
        "scorer": "fairseq-eval-lm", "split": "test", "split_sha256": split_sha256(eval_bin, "test"),
        "dict_sha256": __import__("hashlib").sha256((eval_bin / "dict.txt").read_bytes()).hexdigest(),
        "tokens_per_sample": 128, "context_window": 0, "sample_break_mode": "none",
    }
    assert results["blocks"]["identity_sha256"] == identity_sha256(identity)
    # Batching does not change eval-lm's numbers, so it is not part of the identity.
    assert evaluation_identity(config.load(TINY_CONFIG, ["evaluate.max_tokens=512"]), eval_bin) == identity


def test_identity_changes_with_the_scored_text(eval_bin, tmp_path):
    other = tmp_path / "data-bin"
    shutil.copytree(eval_bin, other)
    (other / "test.bin").write_bytes((other / "test.bin").read_bytes()[:-2] + b"\0\0")
    cfg = config.load(TINY_CONFIG)
    assert evaluation_identity(cfg, other)["split_sha256"] != evaluation_identity(cfg, eval_bin)["split_sha256"]


def test_missing_checkpoint_is_a_one_line_error(eval_bin, tmp_path):
    with pytest.raises(LmforgeError, match="does not exist") as err:
        evaluate(config.load(TINY_CONFIG), eval_bin, tmp_path / "nope.pt")
    assert "\n" not in str(err.value)


def test_checkpoint_without_its_dictionary_is_a_one_line_error(eval_bin, checkpoint, tmp_path):
    bare = tmp_path / "data-bin"
    shutil.copytree(eval_bin, bare)
    (bare / "dict.txt").unlink()
    with pytest.raises(LmforgeError, match="checkpoint without its dictionary") as err:
        evaluate(config.load(TINY_CONFIG), bare, checkpoint)
    assert "\n" not in str(err.value)


def test_evaluate_and_register_steps(eval_bin, checkpoint, tmp_path, empty_mlflow_db, monkeypatch):
    """The steps as the KFP components call them, with a real kfp.dsl.Metrics artifact and MLflow on
    SQLite: evaluate's result goes to KFP, MLflow and metrics.json; register records it with the model."""
    from kfp.dsl import Metrics
    from mlflow import MlflowClient

    from lmforge import steps

    from mlflow.tracking._tracking_service import utils

    # Unset, as in a fresh step process; the steps must leave it so (restored afterwards either way).
    monkeypatch.setattr(utils, "_tracking_uri", None)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # restored (or removed) afterwards
    shutil.copyfile(empty_mlflow_db, tmp_path / "mlflow.db")  # the step's default store under storage.root
    cfg = config.load(TINY_CONFIG, [f"storage.root={tmp_path}"])
    metrics = Metrics(name="metrics", uri=str(tmp_path / "metrics"))
    out = steps.evaluate(cfg.to_json(), "run-1", str(eval_bin), str(checkpoint), metrics)

    evaluation = json.loads(out.evaluation_json)
    assert out.perplexity == evaluation["perplexity"] > 1
    assert json.loads(Path(out.metrics_file).read_text()) == evaluation
    for split in ("test", "valid"):
        for key in ("loss", "loss_base2", "perplexity", "tokens", "tokens_per_second"):
            assert metrics.metadata[f"eval_{split}_{key}"] == pytest.approx(evaluation["splits"][split][key])
    client = MlflowClient(steps.tracking_uri(cfg))
    run = client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment).experiment_id])[0]
    assert run.data.metrics["eval_test_perplexity"] == pytest.approx(out.perplexity)
    assert run.data.metrics["eval_valid_loss_base2"] == pytest.approx(evaluation["splits"]["valid"]["loss_base2"])
    assert "valid_loss" not in run.data.metrics  # training's name (fairseq's per-epoch loss), not ours
    assert run.data.tags["lmforge.eval_identity"] == evaluation["identity_sha256"]
    assert run.info.status == "RUNNING"  # a step leaves the pipeline's run running

    registered = steps.register(
        cfg.to_json(), "run-1", str(eval_bin), str(checkpoint), "a" * 64, evaluation["identity"]["dict_sha256"],
        out.evaluation_json,
    )
    assert registered.model_uri == "models:/tiny-transformer-lm@champion" and registered.mlflow_run_id == run.info.run_id
    tags = client.get_model_version("tiny-transformer-lm", registered.version).tags
    assert tags["eval_identity"] == evaluation["identity_sha256"]
    assert json.loads(tags["eval_identity_json"]) == evaluation["identity"]
    assert float(tags["eval_perplexity"]) == out.perplexity
    assert (tags["corpus_sha256"], tags["pipeline_run_id"], tags["config_hash"]) == ("a" * 64, "run-1", cfg.config_hash())
    assert client.get_run(run.info.run_id).info.status == "FINISHED"  # register, the DAG's last step, ends it
    assert utils._tracking_uri is None and "MLFLOW_TRACKING_URI" not in os.environ  # the caller's, as before
