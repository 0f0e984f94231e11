"""lmforge.config.validation: every problem collected and named once; the alias rule; fairseq's names."""

import pytest

from lmforge import config
from lmforge.config.validation import alias_problem, alias_problems, fairseq_problems, names_field, without_unparsed
from lmforge.errors import ConfigError, LmforgeError

from conftest import REPO
TINY = REPO / "pipelines" / "configs" / "tiny.yaml"


def test_validation_collects_value_problems():
    with pytest.raises(ConfigError) as info:
        config.from_dict({"corpus": {"source": "x", "sha256": "abc"}, "train": {"nproc": 0, "lr": -1.0, "precision": "fp8"}})
    text = str(info.value)
    for field in ("corpus.sha256", "train.nproc", "train.lr", "train.precision"):
        assert field in text
    assert "\n" not in text


def test_cluster_section_is_validated():
    with pytest.raises(ConfigError) as exc:
        config.load(config.shipped_config_path("tiny"), [
            "cluster.cpu_request.preprocess=two", "cluster.memory_request.default=4GB", "cluster.shm_size=lots",
            "cluster.pvc_mount_path=mnt", "cluster.retries=-1",
        ])
    message = str(exc.value)
    for field in ("cluster.cpu_request.preprocess", "cluster.memory_request.default", "cluster.shm_size",
                  "cluster.pvc_mount_path", "cluster.retries"):
        assert field in message, field
    with pytest.raises(ConfigError, match=r"cluster.tolerations\[0\]"):
        config.from_dict({**config.default_config().to_dict(), "cluster": {"tolerations": [{"key": "a", "effect": "Sometimes"}]}})


@pytest.mark.parametrize("alias", ["champion", "Best_1", "stag-ing", "v", "version2", "v2x"])
def test_names_are_aliases(alias):
    assert alias_problem("registry.alias", alias) is None


@pytest.mark.parametrize("alias", ["v2", "v10", "", "1st", "_x", "has space", "dots.no", "-x"])
def test_version_like_or_odd_names_are_not(alias):
    problem = alias_problem("registry.alias", alias)
    assert problem and problem.startswith(f"registry.alias: {alias!r} must be a name like") and "not vN" in problem


def test_the_gate_needs_two_distinct_aliases():
    assert alias_problems("champion", "challenger") == []
    assert alias_problems("best", "best") == ["registry.challenger_alias: must differ from registry.alias"]
    assert [p.split(":")[0] for p in alias_problems("v1", "v2")] == ["registry.alias", "registry.challenger_alias"]
    assert alias_problems("x", "v1", ("alias", "challenger alias"))[0].startswith("challenger alias: 'v1'")


def test_config_validation_uses_the_alias_rule():
    with pytest.raises(ConfigError) as info:
        config.load(TINY, ["registry.alias=v3", "registry.challenger_alias=v4"])
    assert set(info.value.problems) >= set(alias_problems("v3", "v4"))
    with pytest.raises(ConfigError, match="registry.challenger_alias: must differ from registry.alias"):
        config.load(TINY, ["registry.alias=best", "registry.challenger_alias=best"])


def test_registration_and_promotion_use_the_alias_rule(tmp_path):
    """The rule has one home: register_model and promote refuse what config validation refuses."""
    from lmforge.models import promotion
    from lmforge.models.register import register_model

    checkpoint, dictionary = tmp_path / "checkpoint.pt", tmp_path / "dict.txt"
    checkpoint.write_bytes(b"not read: the aliases are checked first")
    dictionary.write_text("hello 1\n")
    with pytest.raises(LmforgeError) as info:
        register_model(checkpoint=checkpoint, dict_path=dictionary, model_name="lm", alias="v2",
                       challenger_alias="challenger", tracking_uri="sqlite:///unused.db", run_id="0" * 32, tags={})
    assert str(info.value) == alias_problem("alias", "v2")
    with pytest.raises(LmforgeError) as info:
        register_model(checkpoint=checkpoint, dict_path=dictionary, model_name="lm", alias="same",
                       challenger_alias="same", tracking_uri="sqlite:///unused.db", run_id="0" * 32, tags={})
    assert str(info.value) == "challenger alias: must differ from alias"
    with pytest.raises(LmforgeError) as info:  # before the registry is asked anything: no client needed
        promotion.promote(None, "lm", "1", "v7", reason="a vN alias would shadow version 7")
    assert str(info.value) == alias_problem("alias", "v7")


def test_fairseq_problems_checks_the_registries_it_is_given():
    cfg = config.load(TINY, ["model.arch=transformer_llm", "model.criterion=crossentropy"])
    problems = fairseq_problems(cfg, architectures={"transformer_lm", "lstm_lm", "transformer"},
                                criteria={"cross_entropy"})
    assert problems == [
        "model.arch: unknown fairseq architecture 'transformer_llm' (language models: lstm_lm, transformer_lm)",
        "model.criterion: unknown fairseq criterion 'crossentropy'",
    ]
    assert fairseq_problems(config.load(TINY), {"transformer_lm"}, {"cross_entropy"}) == []


def test_a_problem_names_a_field_by_its_path_or_its_bare_name():
    assert names_field("train.nproc: 0 must be >= 1", "train.nproc")
    assert names_field("train.bmuf: BMUF synchronizes replicas; it needs nnodes x nproc > 1", "train.nproc")
    assert names_field("train.pytorchjob.gpus_per_node: 4 must be 0 (CPU pods) or train.nproc (2)", "train.nproc")
    assert not names_field("train.max_tokens: 0 must be >= 1", "evaluate.max_tokens")  # another section's field
    assert not names_field("train.nprocs: 0", "train.nproc")
    assert names_field("train.lr: -1.0 must be positive", "train")  # a section by its fields
    assert not names_field("corpus.members.x: unknown split (use train, valid, test)", "train")
    assert without_unparsed(["train.lr: bad", "train.max_epoch: set max_epoch or max_update, or training never stops"],
                            ["train.max_update"]) == ["train.lr: bad"]


def test_tied_adaptive_cutoffs_must_be_equal():
    """transformer_lm_wiki103 ties its adaptive input to its softmax: fairseq asserts equal cutoffs
    when it builds the model, after launch; the config says so before."""
    wiki = {"corpus": {"source": "x"}, "model": {"preset": "transformer_lm_wiki103"}}
    with pytest.raises(ConfigError, match=r"model.options.adaptive_input_cutoff: transformer_lm_wiki103 ties its "
                                          r"adaptive input to its adaptive softmax.*input \[400, 1000\], softmax \[500, 1000\]"):
        config.from_dict({**wiki, "model": {"preset": "transformer_lm_wiki103",
                                            "options": {"adaptive_softmax_cutoff": "500,1000", "adaptive_input_cutoff": "400,1000"}}})
    with pytest.raises(ConfigError, match=r"input \[500, 1000\], softmax \[20000, 60000\]"):  # the arch's default softmax
        config.from_dict({"corpus": {"source": "x"}, "model": {"arch": "transformer_lm_wiki103", "criterion": "adaptive_loss",
                                                               "options": {"adaptive_input_cutoff": "500,1000"}}})
    same = config.from_dict({**wiki, "model": {"preset": "transformer_lm_wiki103",
                                               "options": {"adaptive_softmax_cutoff": [500, 1000], "adaptive_input_cutoff": "500, 1000"}}})
    assert same.model.adaptive_input_cutoff() == [500, 1000]
    untied = config.from_dict({"corpus": {"source": "x"}, "model": {"options": {
        "adaptive_input": True, "adaptive_input_cutoff": "400,1000", "adaptive_softmax_cutoff": "500,1000"}}})
    assert untied.model.adaptive_input_cutoff() == [400, 1000]
    with pytest.raises(ConfigError, match=r"model.options.adaptive_input_cutoff: \[1000, 400\] must be increasing"):
        config.from_dict({"corpus": {"source": "x"}, "model": {"options": {"adaptive_input": True, "adaptive_input_cutoff": "1000,400"}}})
