"""lmforge.config.loading: YAML, --set overrides, JSON, shipped configs, this machine's paths."""


import pytest

from lmforge import config
from lmforge.errors import ConfigError, LmforgeError

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


def test_wrong_type_is_named():
    with pytest.raises(ConfigError, match=r"train\.max_epoch: expected int"):
        config.from_dict({"corpus": {"source": "x"}, "train": {"max_epoch": "many"}})


THREE_BAD_FIELDS = ["train.max_epoch=abc", "train.nproc=0", "train.lr=-1"]


def test_a_type_error_and_the_range_errors_are_named_together():
    with pytest.raises(ConfigError) as info:
        config.load(config.shipped_config_path("tiny"), THREE_BAD_FIELDS)
    assert info.value.problems == [
        "train.max_epoch: expected int, got 'abc'", "train.nproc: 0 must be >= 1", "train.lr: -1.0 must be positive",
    ]
    assert info.value.exit_code == 2


def test_the_command_line_names_every_bad_field_in_one_line(capsys):
    from lmforge.cli import main

    argv = ["config", "show", "--config", str(config.shipped_config_path("tiny"))]
    assert main([*argv, *(arg for field in THREE_BAD_FIELDS for arg in ("--set", field))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lmforge: error: invalid config: ")
    for field in ("train.max_epoch: expected int", "train.nproc: 0 must be >= 1", "train.lr: -1.0 must be positive"):
        assert field in err[0]


def test_a_check_that_reads_a_field_of_the_wrong_type_is_left_out():
    """train.nproc did not parse: the checks that combine it with other fields (gpus_per_node, bmuf)
    would speak of its default, 2, not of the user's value."""
    with pytest.raises(ConfigError) as info:
        config.load(config.shipped_config_path("tiny"), [
            "train.nproc=two", "train.launcher=pytorchjob", "train.pytorchjob.gpus_per_node=4", "train.bmuf=true",
            "train.dropout=1.5",
        ])
    assert info.value.problems == ["train.nproc: expected int, got 'two'", "train.dropout: 1.5 must be in [0, 1)"]
    with pytest.raises(ConfigError) as info:  # an unknown preset filled nothing in: its checks are left out too
        config.load(config.shipped_config_path("tiny"), ["model.preset=lstm", "model.criterion=adaptive_loss",
                                                         "train.max_tokens=0"])
    assert [p.split(":")[0] for p in info.value.problems] == ["model.preset", "train.max_tokens"]


def test_stage_json_names_type_and_range_problems_together():
    with pytest.raises(ConfigError) as info:
        config.from_stage_json('{"preprocess": {"shards": "two", "workers": 0}, "storage": {"root": "runs"}}')
    assert info.value.problems == ["preprocess.shards: expected int, got 'two'", "preprocess.workers: 0 must be >= 1"]


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


def test_a_corpus_on_the_command_line_drops_the_configs_pins():
    cfg = config.default_config()
    assert cfg.corpus.sha256 and cfg.corpus.size
    replaced = config.with_corpus(cfg, "/data/mine")
    assert replaced.corpus == config.CorpusConfig(source="/data/mine")
    assert replaced.train == cfg.train


def test_resolve_storage_makes_a_local_root_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = config.load(TINY, ["storage.root=runs"])
    assert config.resolve_storage(cfg).storage.root == str(tmp_path / "runs")
    on_s3 = config.load(TINY, ["storage.root=s3://bucket/runs"])
    assert config.resolve_storage(on_s3) is on_s3


def test_resolve_local_paths_makes_the_corpus_absolute_and_keeps_its_pins(tmp_path, monkeypatch):
    (tmp_path / "corpus").mkdir()
    monkeypatch.chdir(tmp_path)
    digest = "a" * 64
    cfg = config.load(TINY, ["corpus.source=corpus", f"corpus.sha256={digest}", "storage.root=out"])
    resolved = config.resolve_local_paths(cfg)
    assert resolved.corpus.source == str(tmp_path / "corpus")
    assert resolved.corpus.sha256 == digest and resolved.corpus.members == cfg.corpus.members
    assert resolved.storage.root == str(tmp_path / "out")


def test_resolve_local_paths_leaves_catalog_names_and_uris_alone(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no directory named wikitext-2 here
    for source in ("wikitext-2", "https://example.com/corpus.zip", "s3://bucket/corpus"):
        cfg = config.load(TINY, [f"corpus.source={source}", "corpus.members={}"])
        assert config.resolve_local_paths(cfg).corpus.source == source


def test_resolve_local_paths_refuses_a_missing_corpus(tmp_path):
    cfg = config.load(TINY, [f"corpus.source={tmp_path / 'nope'}"])
    with pytest.raises(LmforgeError, match="does not exist; pass --corpus DIR") as info:
        config.resolve_local_paths(cfg)
    assert not isinstance(info.value, ConfigError) and info.value.exit_code == 1
