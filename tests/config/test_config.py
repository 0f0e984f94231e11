from pathlib import Path

import pytest

from lmforge import config
from lmforge.errors import ConfigError

from conftest import REPO
TINY = REPO / "pipelines" / "configs" / "tiny.yaml"


def test_shipped_configs_load_and_differ():
    tiny = config.load(TINY)
    default = config.default_config()
    assert tiny.name == "tiny" and default.name == "wikitext-2"
    assert default.corpus.sha256 == "92675f1d63015c1c8b51f1656a52d5bdbc33aafa60cc47a218a66e7ee817488c"
    assert default.corpus.size == 4475746
    assert default.corpus.source == "wikitext-2"  # a catalog name
    assert tiny.config_hash() != default.config_hash()


def test_overrides_reach_typed_fields():
    cfg = config.load(TINY, ["train.max_epoch=7", "train.lr=1e-3", "model.options.decoder_layers=4", "name=other"])
    assert cfg.train.max_epoch == 7
    assert cfg.train.lr == pytest.approx(1e-3)
    assert cfg.model.options["decoder_layers"] == 4
    assert cfg.model.options["decoder_embed_dim"] == 64  # untouched siblings survive
    assert cfg.name == "other"


def test_int_is_accepted_for_float_field():
    cfg = config.from_dict({"corpus": {"source": "x"}, "train": {"lr": 1}})
    assert isinstance(cfg.train.lr, float)


def test_every_problem_is_named_once(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("corpus: {source: x}\ntrain: {nproc: 0, lr: -1, max_epoch: -2, bogus: 1}\nnope: {}\n")
    with pytest.raises(ConfigError) as info:
        config.load(path)
    problems = info.value.problems
    assert any(p.startswith("train.bogus: unknown key") for p in problems)
    assert any(p.startswith("nope: unknown key") for p in problems)
    assert info.value.exit_code == 2


def test_validation_collects_value_problems():
    with pytest.raises(ConfigError) as info:
        config.from_dict({"corpus": {"source": "x", "sha256": "abc"}, "train": {"nproc": 0, "lr": -1.0, "precision": "fp8"}})
    text = str(info.value)
    for field in ("corpus.sha256", "train.nproc", "train.lr", "train.precision"):
        assert field in text
    assert "\n" not in text


def test_wrong_type_is_named():
    with pytest.raises(ConfigError, match=r"train\.max_epoch: expected int"):
        config.from_dict({"corpus": {"source": "x"}, "train": {"max_epoch": "many"}})


def test_malformed_yaml_names_the_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("train:\n  max_epoch: [1, 2\n")
    with pytest.raises(ConfigError, match="malformed YAML") as info:
        config.load(path)
    assert "line" in str(info.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        config.load(tmp_path / "absent.yaml")


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="section.field=value"):
        config.load(TINY, ["train.max_epoch"])


def test_json_round_trip_is_identity():
    cfg = config.load(TINY)
    assert config.from_json(cfg.to_json()) == cfg


def test_every_field_is_documented():
    rows = config.field_docs()
    assert len(rows) > 30
    for name, text, _default in rows:
        assert text.strip(), f"{name} has no documentation"


def test_digit_only_override_of_a_string_field_keeps_its_text():
    digest = "0" * 63 + "1"
    cfg = config.load(TINY, [f"corpus.sha256={digest}", "registry.model_name=2024", "train.extra_args.max_tokens_valid=512"])
    assert cfg.corpus.sha256 == digest
    assert cfg.registry.model_name == "2024"
    assert cfg.train.extra_args["max_tokens_valid"] == 512


def test_stage_json_depends_only_on_its_sections():
    base = config.load(config.shipped_config_path("tiny"))
    longer = config.load(config.shipped_config_path("tiny"), ["train.max_epoch=9"])
    other_vocab = config.load(config.shipped_config_path("tiny"), ["preprocess.nwords=100"])
    assert config.stage_json(base, "preprocess") == config.stage_json(longer, "preprocess")
    assert config.stage_json(base, "download") == config.stage_json(other_vocab, "download")
    assert config.stage_json(base, "preprocess") != config.stage_json(other_vocab, "preprocess")
    assert config.from_stage_json(config.stage_json(base, "preprocess")).preprocess == base.preprocess
    with pytest.raises(ConfigError, match="preprocess.workers"):
        config.from_stage_json('{"preprocess": {"workers": 0}, "storage": {"root": "runs"}}')
    assert config.content_key("a", "bc") != config.content_key("ab", "c")
