"""lmforge.config.schema: field documentation and the values derived from the config sections."""

import dataclasses

import pytest

from lmforge import config
from lmforge.config.schema import ModelConfig, RunConfig, TrainConfig


def test_every_field_is_documented():
    rows = config.field_docs()
    assert len(rows) > 30
    for name, text, _default in rows:
        assert text.strip(), f"{name} has no documentation"


def test_world_size_is_nodes_times_processes():
    assert TrainConfig(nnodes=3, nproc=4).world_size() == 12
    assert TrainConfig(nnodes=1, nproc=1).world_size() == 1


@pytest.mark.parametrize("model, cutoff", [
    (ModelConfig(arch="transformer_lm"), None),  # no cutoff set, none by default
    (ModelConfig(arch="transformer_lm_wiki103"), [20000, 60000]),  # fairseq's arch default
    (ModelConfig(arch="transformer_lm", options={"adaptive_softmax_cutoff": "100,200"}), [100, 200]),
    (ModelConfig(arch="transformer_lm_wiki103", options={"adaptive_softmax_cutoff": "(5, 50)"}), [5, 50]),
    (ModelConfig(arch="lstm_lm", criterion="cross_entropy"), None),  # lstm_lm builds one only under adaptive_loss
    (ModelConfig(arch="lstm_lm", criterion="adaptive_loss"), [10000, 50000, 200000]),
    (ModelConfig(arch="transformer_lm", options={"adaptive_softmax_cutoff": "a,b"}), []),  # not integers
])
def test_adaptive_softmax_cutoff(model, cutoff):
    assert model.adaptive_softmax_cutoff() == cutoff


@pytest.mark.parametrize("model, cutoff", [
    (ModelConfig(arch="transformer_lm"), None),  # no adaptive input
    (ModelConfig(arch="transformer_lm_gbw"), None),  # an adaptive softmax only
    (ModelConfig(arch="transformer_lm_wiki103"), [20000, 60000]),  # fairseq's arch default
    # tied to the softmax: its cutoffs follow the softmax's unless set
    (ModelConfig(arch="transformer_lm_baevski_wiki103", options={"adaptive_softmax_cutoff": "500,1000"}), [500, 1000]),
    (ModelConfig(arch="transformer_lm", options={"adaptive_input": True, "adaptive_input_cutoff": "(5, 50)"}), [5, 50]),
    (ModelConfig(arch="transformer_lm", options={"adaptive_input": True, "adaptive_softmax_cutoff": "5,50"}), None),
])
def test_adaptive_input_cutoff(model, cutoff):
    assert model.adaptive_input_cutoff() == cutoff


def test_auto_launcher_is_pytorchjob_only_inside_a_pod():
    auto = TrainConfig(launcher="auto")
    assert auto.resolved_launcher({"KUBERNETES_SERVICE_HOST": "10.0.0.1"}) == "pytorchjob"
    assert auto.resolved_launcher({}) == "local"
    assert TrainConfig(launcher="local").resolved_launcher({"KUBERNETES_SERVICE_HOST": "10.0.0.1"}) == "local"
    assert TrainConfig(launcher="pytorchjob").resolved_launcher({}) == "pytorchjob"


def test_resolve_launcher_changes_only_the_launcher():
    cfg = RunConfig(train=TrainConfig(launcher="auto", nproc=3))
    resolved = cfg.resolve_launcher({"KUBERNETES_SERVICE_HOST": "10.0.0.1"})
    assert resolved.train.launcher == "pytorchjob" and resolved.train.nproc == 3
    assert dataclasses.replace(resolved.train, launcher="auto") == cfg.train and resolved.model == cfg.model
    assert cfg.train.launcher == "auto"  # frozen: the original is unchanged
    explicit = RunConfig(train=TrainConfig(launcher="local"))
    assert explicit.resolve_launcher({"KUBERNETES_SERVICE_HOST": "10.0.0.1"}) is explicit
