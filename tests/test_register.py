"""lmforge.register: a real MLflow registry (SQLite in tmp_path) and a real tiny fairseq LM.

The tiny LM, the texts and fairseq's own scores for them (`hub_expected`) come from
tests/conftest.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from lmforge.errors import LmforgeError
from lmforge.register import register_model, serving_requirements

NAME, ALIAS = "tiny-lm", "champion"
TAGS = {
    "corpus_sha256": "a" * 64,
    "dict_sha256": "b" * 64,
    "config_hash": "c" * 64,
    "pipeline_run_id": "pipeline-123",
}


def assert_scores_like_fairseq(out: pd.DataFrame, expected: pd.DataFrame) -> None:
    """`out` (a loaded model's predictions) against fairseq's scores of the same texts."""
    assert out.columns.tolist() == ["log_prob", "tokens", "perplexity", "eos_log_prob"]
    assert out.tokens.tolist() == expected.tokens.tolist()  # hub.score()'s positional_scores.numel()
    # log_prob is hub.score(text)["positional_scores"].sum()
    assert out.log_prob.tolist() == pytest.approx(expected.log_prob.tolist(), abs=1e-4)
    assert out.eos_log_prob.tolist() == pytest.approx(expected.eos_log_prob.tolist(), abs=1e-4)


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory) -> Path:
    """An initialized, empty MLflow SQLite store: creating the tables takes seconds, copying ms."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("store") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def tracking(tmp_path, monkeypatch, empty_store):
    """A SQLite tracking store with artifacts under tmp_path, and a RUNNING pipeline run."""
    from mlflow.tracking import MlflowClient

    shutil.copyfile(empty_store, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # The process default points at the same store: register_model must leave it as it was.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("lmforge", artifact_location=(tmp_path / "artifacts").as_uri())
    run = client.create_run(experiment)
    return uri, client, run.info.run_id


def register(lm, tracking, **overrides):
    uri, _, run_id = tracking
    kwargs = dict(
        checkpoint=lm.checkpoint, dict_path=lm.dict_path, model_name=NAME, alias=ALIAS,
        tracking_uri=uri, run_id=run_id, tags=TAGS,
    )
    return register_model(**{**kwargs, **overrides})


def test_registers_a_model_that_scores_like_fairseq(tiny_lm, tracking, hub_expected, scored_texts):
    import mlflow
    import torch

    uri, client, run_id = tracking
    result = register(tiny_lm, tracking)
    assert result == {"model_uri": f"models:/{NAME}@{ALIAS}", "version": "1", "run_id": run_id}
    assert os.environ["MLFLOW_TRACKING_URI"] == uri

    version = client.get_model_version_by_alias(NAME, ALIAS)
    assert str(version.version) == "1" and version.run_id == run_id
    assert {k: version.tags[k] for k in TAGS} == TAGS
    assert "transformer_lm" in version.description
    # The run still belongs to the pipeline: registering must not close it.
    assert client.get_run(run_id).info.status == "RUNNING"

    model = mlflow.pyfunc.load_model(result["model_uri"])
    # A plain list and a DataFrame with a text column: both pass the signature.
    from_list = model.predict(scored_texts)
    assert_scores_like_fairseq(from_list, hub_expected)
    pd.testing.assert_frame_equal(model.predict(pd.DataFrame({"text": scored_texts})), from_list)
    assert model.metadata.get_input_schema().to_dict() == [{"type": "string", "required": True}]

    # The registered checkpoint is the weights without the optimizer state.
    local = Path(mlflow.artifacts.download_artifacts(result["model_uri"]))
    registered = torch.load(local / "artifacts" / "model.pt", map_location="cpu", weights_only=False)
    assert "last_optimizer_state" not in registered
    assert (local / "artifacts" / "model.pt").stat().st_size < tiny_lm.checkpoint.stat().st_size / 2
    requirements = (local / "requirements.txt").read_text()
    for pin in serving_requirements():
        assert pin in requirements
    assert "ve-fairseq==0.12.3" in requirements and "+cpu" not in requirements


@pytest.mark.slow
def test_a_fresh_process_loads_the_model_by_alias(tiny_lm, tracking, hub_expected, scored_texts, tmp_path):
    uri, _, _ = tracking
    result = register(tiny_lm, tracking)
    # As a user would: a plain list, then a DataFrame with a text column.
    code = (
        "import json, sys, mlflow, pandas as pd\n"
        "model = mlflow.pyfunc.load_model(sys.argv[1])\n"
        "texts = json.loads(sys.argv[2])\n"
        "from_list = model.predict(texts)\n"
        "from_frame = model.predict(pd.DataFrame({'text': texts}))\n"
        "print(json.dumps([from_list.to_dict('list'), from_frame.to_dict('list')]))\n"
    )
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    proc = subprocess.run(
        [sys.executable, "-c", code, result["model_uri"], json.dumps(scored_texts)],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    from_list, from_frame = (pd.DataFrame(d) for d in json.loads(proc.stdout.strip().splitlines()[-1]))
    assert_scores_like_fairseq(from_list, hub_expected)
    assert_scores_like_fairseq(from_frame, hub_expected)


def test_registering_twice_makes_version_2_and_moves_the_alias(tiny_lm, tracking):
    _, client, _ = tracking
    first = register(tiny_lm, tracking)
    second = register(tiny_lm, tracking, tags={**TAGS, "config_hash": "d" * 64})
    assert (first["version"], second["version"]) == ("1", "2")
    assert str(client.get_model_version_by_alias(NAME, ALIAS).version) == "2"
    assert client.get_model_version(NAME, "1").tags["config_hash"] == "c" * 64
    assert client.get_model_version(NAME, "2").tags["config_hash"] == "d" * 64


def _assert_nothing_registered(client):
    assert client.search_registered_models() == []


def test_a_missing_checkpoint_is_a_one_line_error(tiny_lm, tracking, tmp_path):
    _, client, _ = tracking
    with pytest.raises(LmforgeError) as err:
        register(tiny_lm, tracking, checkpoint=tmp_path / "nope.pt")
    assert "\n" not in str(err.value) and "nope.pt does not exist" in str(err.value)
    _assert_nothing_registered(client)


def test_a_missing_dictionary_is_a_one_line_error(tiny_lm, tracking, tmp_path):
    _, client, _ = tracking
    with pytest.raises(LmforgeError) as err:
        register(tiny_lm, tracking, dict_path=tmp_path / "dict.txt")
    assert "\n" not in str(err.value) and "checkpoint without its dictionary" in str(err.value)
    _assert_nothing_registered(client)


def test_a_dictionary_of_another_model_is_a_one_line_error(tiny_lm, tracking, tmp_path):
    _, client, _ = tracking
    other = tmp_path / "other" / "dict.txt"
    other.parent.mkdir()
    lines = tiny_lm.dict_path.read_text(encoding="utf-8").splitlines()
    other.write_text("\n".join(lines + [f"extra{i} 1" for i in range(8)]) + "\n", encoding="utf-8")
    with pytest.raises(LmforgeError) as err:
        register(tiny_lm, tracking, dict_path=other)
    assert "\n" not in str(err.value) and "does not load with" in str(err.value)
    _assert_nothing_registered(client)


def test_an_unknown_run_id_is_a_one_line_error(tiny_lm, tracking):
    _, client, _ = tracking
    with pytest.raises(LmforgeError) as err:
        register(tiny_lm, tracking, run_id="0" * 32)
    assert "\n" not in str(err.value) and "not found" in str(err.value)
    _assert_nothing_registered(client)
