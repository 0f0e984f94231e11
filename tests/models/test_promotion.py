"""lmforge.promotion: the pure decision, then the gate and overrides on a real MLflow registry (SQLite).

Registry versions here are created directly with tags (no model files): the gate only reads
tags and aliases. End-to-end registration through the gate is in test_register.py.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys

import pytest

from lmforge.models import promotion
from lmforge.errors import LmforgeError
from lmforge.models.promotion import CHALLENGER, CHAMPION, Candidate, identity_differences
from lmforge.tasks.base import GateMetric
from lmforge.tasks.language_modeling import TASK as LM

IDENTITY = {"split": "test", "split_sha256": "1" * 64, "dict_sha256": "2" * 64, "tokens_per_sample": 512,
            "context_window": 0, "sample_break_mode": "none", "scorer": "fairseq-eval-lm"}


def cand(version, perplexity, **changes):
    return Candidate(str(version), {**IDENTITY, **changes}, perplexity)


def decide(candidate, champion):
    """The decision with the language-modeling task's gate metric (perplexity, lower is better)."""
    return promotion.decide(candidate, champion, LM.gate_metric)


# --------------------------------------------------------------------------- the decision


def test_the_first_model_becomes_champion():
    assert decide(cand(1, 50.0), None) == promotion.Decision(CHAMPION, "first model for this name")


def test_a_lower_perplexity_on_the_same_identity_takes_champion():
    d = decide(cand(2, 40.0), cand(1, 50.0))
    assert d == promotion.Decision(CHAMPION, "better: perplexity 40 beats champion v1's 50")


@pytest.mark.parametrize("perplexity", [60.0, 50.0, math.nan], ids=["worse", "equal", "nan"])
def test_a_perplexity_that_does_not_beat_the_champion_is_a_worse_challenger(perplexity):
    d = decide(cand(2, perplexity), cand(1, 50.0))
    assert d.role == CHALLENGER and d.reason.startswith("worse: perplexity") and "champion v1's 50" in d.reason


def test_a_different_identity_is_not_comparable_and_says_what_differs():
    d = decide(cand(2, 10.0, context_window=64, dict_sha256="3" * 64), cand(1, 50.0))
    assert d == promotion.Decision(
        CHALLENGER,
        "not comparable with champion v1: differs in context_window (64 vs 0), dict_sha256 (333333333333 vs 222222222222)",
    )


def test_a_champion_or_candidate_without_identity_is_not_comparable():
    assert decide(cand(2, 10.0), Candidate("1", None, None)).reason == (
        "not comparable: champion v1 has no evaluation identity"
    )
    assert decide(Candidate("2", None, None), cand(1, 50.0)).role == CHALLENGER


def test_the_task_metric_decides_the_direction_and_names_the_reason():
    """A task whose metric is higher-is-better (accuracy, for classifiers) promotes the higher value."""
    accuracy = GateMetric(name="accuracy", tag="eval_accuracy", lower_is_better=False)
    better = promotion.decide(cand(2, 0.9), cand(1, 0.8), accuracy)
    assert better == promotion.Decision(CHAMPION, "better: accuracy 0.9 beats champion v1's 0.8")
    assert promotion.decide(cand(2, 0.7), cand(1, 0.8), accuracy).role == CHALLENGER
    assert decide(cand(2, 0.9), cand(1, 0.8)).role == CHALLENGER  # perplexity: lower is better


def test_a_version_without_a_task_tag_is_read_as_a_language_model(client):
    v1 = add_version(client, "lm", 50.0)
    version = client.get_model_version("lm", v1)
    assert "task" not in version.tags
    assert promotion.gate_metric_of(version) == LM.gate_metric
    assert promotion.candidate_of(version, LM.gate_metric).value == 50.0


def test_identity_differences_lists_missing_keys_too():
    assert identity_differences({"a": 1, "b": 2}, {"a": 1, "c": 3}) == ["b (2 vs None)", "c (None vs 3)"]


# --------------------------------------------------------------------------- the gate on MLflow


@pytest.fixture
def client(tmp_path, empty_mlflow_db):
    from mlflow import MlflowClient

    shutil.copyfile(empty_mlflow_db, tmp_path / "mlflow.db")
    return MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")


def add_version(client, name, perplexity, **identity):
    """A version as lmforge.models.register creates it: lineage tags and 'pending'."""
    if not client.search_registered_models(f"name = '{name}'"):
        client.create_registered_model(name)
    tags = {promotion.TAG_GATE: "pending"}
    if perplexity is not None:
        tags |= {promotion.TAG_IDENTITY_JSON: json.dumps({**IDENTITY, **identity}),
                 LM.gate_metric.tag: repr(perplexity)}
    return str(client.create_model_version(name, source="s3://models/lm", tags=tags).version)


def gate(client, name, version):
    return promotion.run_gate(client, name, version, timeout_s=5)


def aliases(client, name):
    return {a: str(v) for a, v in client.get_registered_model(name).aliases.items()}


def test_gate_writes_aliases_and_reasons(client):
    v1 = add_version(client, "lm", 50.0)
    assert gate(client, "lm", v1).role == CHAMPION
    v2 = add_version(client, "lm", 60.0)
    assert gate(client, "lm", v2).role == CHALLENGER
    v3 = add_version(client, "lm", 10.0, context_window=64)
    assert gate(client, "lm", v3).role == CHALLENGER
    v4 = add_version(client, "lm", 45.0)
    assert gate(client, "lm", v4).role == CHAMPION
    assert aliases(client, "lm") == {"champion": "4", "challenger": "3"}
    tags = {v: client.get_model_version("lm", v).tags for v in "1234"}
    assert all(t[promotion.TAG_GATE] == "decided" for t in tags.values())
    assert tags["2"][promotion.TAG_REASON] == "worse: perplexity 60 does not beat champion v1's 50"
    assert tags["3"][promotion.TAG_REASON] == "not comparable with champion v1: differs in context_window (64 vs 0)"
    assert tags["4"][promotion.TAG_REASON] == "better: perplexity 45 beats champion v1's 50"
    # Deciding again (a retried step) changes nothing.
    assert gate(client, "lm", v2).role == CHALLENGER and aliases(client, "lm") == {"champion": "4", "challenger": "3"}


def test_gate_waits_for_an_older_pending_version(client):
    """v2's gate must not decide before v1 (pending) has: it would see no champion and take it."""
    import threading
    import time

    v1 = add_version(client, "lm", 50.0)
    v2 = add_version(client, "lm", 40.0)
    decided = {}
    worker = threading.Thread(target=lambda: decided.setdefault("v2", gate(client, "lm", v2)))
    worker.start()
    time.sleep(1.0)
    assert worker.is_alive() and "v2" not in decided  # still waiting for v1
    gate(client, "lm", v1)
    worker.join(10)
    assert decided["v2"].reason == "better: perplexity 40 beats champion v1's 50"
    assert aliases(client, "lm") == {"champion": "2"}


def test_gate_gives_up_waiting_for_an_abandoned_pending_version(client):
    add_version(client, "lm", 50.0)  # its registration died: never decided
    v2 = add_version(client, "lm", 60.0)
    assert promotion.run_gate(client, "lm", v2, timeout_s=0.5).role == CHAMPION


def test_promote_overrides_and_leaves_who_and_why(client):
    for ppl in (50.0, 60.0):
        gate(client, "lm", add_version(client, "lm", ppl))
    result = promotion.promote(client, "lm", "challenger", "champion", reason="better on our eval set", by="ana")
    assert result["version"] == "2" and result["previous"] == "1"
    assert aliases(client, "lm")["champion"] == "2"
    v2, v1 = client.get_model_version("lm", "2").tags, client.get_model_version("lm", "1").tags
    assert v2[promotion.TAG_OVERRIDE].startswith("champion set by ana at ")
    assert v2[promotion.TAG_OVERRIDE].endswith(": better on our eval set") and v2[promotion.TAG_DECISION] == CHAMPION
    assert v1[promotion.TAG_OVERRIDE].startswith("champion moved to v2 by ana at ")
    rows = promotion.describe_versions(client, "lm")
    assert [(r["version"], r["aliases"]) for r in rows] == [("2", "challenger,champion"), ("1", "")]


@pytest.mark.parametrize(
    "name,version,needle",
    [("nope", "1", "registered model 'nope' does not exist"), ("lm", "staging", "lm has no alias 'staging'"),
     ("lm", "7", "lm has no version 7")],
    ids=["unknown-name", "unknown-alias", "unknown-version"],
)
def test_bad_names_are_one_line_errors(client, name, version, needle):
    gate(client, "lm", add_version(client, "lm", 50.0))
    with pytest.raises(LmforgeError) as err:
        promotion.promote(client, name, version, "champion", reason="why", by="ana")
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_promote_without_a_reason_is_refused(client):
    gate(client, "lm", add_version(client, "lm", 50.0))
    with pytest.raises(LmforgeError, match="--reason"):
        promotion.promote(client, "lm", "1", "champion", reason=" ")


def test_cli_models_and_promote(client, tmp_path):
    """`lmforge models` / `lmforge promote` as a user runs them (one process each)."""
    gate(client, "lm", add_version(client, "lm", 50.0))
    gate(client, "lm", add_version(client, "lm", 60.0))
    uri = client._tracking_client.tracking_uri
    code = (
        "import sys\nfrom lmforge.cli import main\n"
        "for argv in ([ 'models', '--tracking-uri', sys.argv[1]], ['models', 'lm', '--tracking-uri', sys.argv[1]],"
        " ['promote', 'lm', '2', '--reason', 'manual check', '--by', 'bo', '--tracking-uri', sys.argv[1]],"
        " ['models', 'lm', '--alias', 'nope', '--tracking-uri', sys.argv[1]]):\n"
        "    print('exit', main(argv), flush=True)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, uri], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    out = proc.stdout
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "lm  latest v2  challenger=v2, champion=v1" in out
    assert "worse: perplexity 60 does not beat champion v1's 50" in out
    assert '"note": "champion set by bo at ' in out
    assert out.count("exit 0") == 3 and "exit 1" in out
    last = proc.stderr.strip().splitlines()[-1]
    assert last == "lmforge: error: lm has no alias 'nope' (aliases: challenger, champion); `lmforge models lm` lists them"
    assert aliases(client, "lm") == {"champion": "2", "challenger": "2"}


def test_a_retried_gate_that_already_set_champion_keeps_it(client):
    """The registration died after setting the alias, before marking itself decided."""
    v1 = add_version(client, "lm", 50.0)
    client.set_registered_model_alias("lm", "champion", v1)
    assert gate(client, "lm", v1) == promotion.Decision(CHAMPION, "first model for this name")
    assert aliases(client, "lm") == {"champion": "1"}
    assert client.get_model_version("lm", v1).tags[promotion.TAG_GATE] == "decided"
