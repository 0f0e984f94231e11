"""`lmforge run` end to end on this machine: KFP's local runner, torchrun with 2 CPU
processes, MLflow on SQLite, and the registered model loaded back from the registry."""

import os

import pytest
from mlflow import MlflowClient

from conftest import lmforge_run, registered_model_scores, write_corpus

pytestmark = pytest.mark.e2e
HELD_OUT = "the album was released in the united states on 12 may 2009 ."


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """The run, with a fresh TMPDIR beside `root` (system-tmp): the system temporary directory it sees."""
    tmp = tmp_path_factory.mktemp("e2e")
    corpus = write_corpus(tmp / "corpus", train_lines=1500)
    root = tmp / "runs"
    (tmp / "system-tmp").mkdir()
    env = {**os.environ, "TMPDIR": str(tmp / "system-tmp")}
    return root, lmforge_run(tmp, corpus, root, "train.max_epoch=2", env=env)


def test_a_run_leaves_nothing_in_the_system_temp_dir(finished_run):
    """KFP's local runner made a tmp.* folder (ephemeral_component.py) there for every task, and torchrun
    and multiprocessing theirs (issue 16): the steps' TMPDIR is now the run's scratch, removed at its end."""
    root, _ = finished_run
    assert sorted(p.name for p in (root.parent / "system-tmp").iterdir()) == []
    assert not list((root / "kfp-local").glob("run-*"))


def test_run_prints_perplexity_outputs_and_model_uri(finished_run):
    root, summary = finished_run
    assert summary["model"] == "models:/tiny-transformer-lm@champion"
    assert 1 < float(summary["test perplexity"]) < 10_000
    run_dir = root / "tiny"
    assert summary["outputs"].startswith(str(run_dir))
    for name in ("checkpoints/checkpoint_best.pt", "eval/metrics.json"):
        assert list(run_dir.glob(f"*/{name}")), f"{name} missing"
    # The data stages' outputs are named by content and shared between runs (KFP caches them).
    for name in ("corpus/*/manifest.json", "data-bin/*/dict.txt", "data-bin/*/train.bin"):
        assert list((root / "data").glob(name)), f"{name} missing"


def test_one_mlflow_run_with_training_curves_and_falling_valid_loss(finished_run):
    root, summary = finished_run
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("lmforge-tiny")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1, "every step must log into the one run of the pipeline run"
    run = runs[0]
    assert run.info.run_id in summary["MLflow"]
    assert run.info.status == "FINISHED" and not {"lmforge.failed_step", "lmforge.error"} & set(run.data.tags)
    for metric in ("train_loss", "lr", "train_wps", "valid_ppl", "eval_test_perplexity", "vocab_size"):
        assert metric in run.data.metrics, metric
    valid = client.get_metric_history(run.info.run_id, "valid_loss")
    assert len(valid) == 2, "one validation per epoch"
    steps = [m.step for m in sorted(valid, key=lambda m: m.step)]
    assert steps[0] > 0 and steps[1] > steps[0], "logged at step = number of updates"
    first, last = (m.value for m in sorted(valid, key=lambda m: m.step))
    assert last < first
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")}
    assert artifacts == {"checkpoints/checkpoint_best.pt", "checkpoints/checkpoint_last.pt"}
    version = client.get_model_version_by_alias("tiny-transformer-lm", "champion")
    for tag in ("corpus_sha256", "dict_sha256", "config_hash", "pipeline_run_id"):
        assert version.tags.get(tag), tag
    assert version.tags["corpus_sha256"] == run.data.tags["lmforge.corpus_sha256"]


def test_registered_model_scores_like_fairseq_hub(finished_run):
    root, _ = finished_run
    run_dir = next((root / "tiny").iterdir())
    from fairseq.models.transformer_lm import TransformerLanguageModel

    hub = TransformerLanguageModel.from_pretrained(
        str(run_dir / "checkpoints"), "checkpoint_best.pt", data_name_or_path=str(next((root / "data" / "data-bin").iterdir()))
    ).eval()
    expected = float(hub.score(HELD_OUT)["positional_scores"].sum())

    # Loaded by alias in a fresh process, as a user would.
    [row] = registered_model_scores(f"sqlite:///{root / 'mlflow.db'}", "models:/tiny-transformer-lm@champion", [HELD_OUT])
    assert row["log_prob"] == pytest.approx(expected, abs=1e-4)
    assert row["tokens"] == len(HELD_OUT.split())
