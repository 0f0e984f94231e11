"""Model presets: what each one sets, how a config overrides it, and that fairseq accepts (and,
for the ones that fit a CPU, trains) what they describe."""

import math

import pytest

from conftest import TINY_CONFIG
from lmforge import config, fairseq_api
from lmforge.config import presets
from lmforge.errors import ConfigError, LmforgeError
from lmforge.fairseq_api.arguments import train_args
from lmforge.training.distributed import Placement


def preset_config(name, **sections):
    return config.from_dict({"corpus": {"source": "x"}, **sections, "model": {"preset": name, **sections.get("model", {})}})


@pytest.mark.parametrize("name", sorted(presets.PRESETS))
def test_each_preset_is_a_valid_config_fairseq_accepts(name):
    cfg = preset_config(name)
    assert cfg.model.arch == presets.PRESETS[name]["model"]["arch"]
    assert cfg.model.criterion == presets.PRESETS[name]["model"]["criterion"]
    argv = train_args(cfg, "/data", "/ckpt", Placement(world_size=2, rank=0, cuda=True))
    fairseq_api.check_train_args(argv)  # raises when fairseq's parser would refuse
    if cfg.model.criterion == "adaptive_loss":
        assert argv[argv.index("--ddp-backend") + 1] == "legacy_ddp"


def test_named_shapes():
    gpt = preset_config("transformer_lm_gpt")
    assert gpt.model.arch == "transformer_lm_gpt" and gpt.train.tokens_per_sample == 1024  # GPT-2 small: 12 x 768
    wiki = preset_config("transformer_lm_wiki103")
    assert wiki.model.options["adaptive_input_cutoff"] and wiki.model.adaptive_softmax_cutoff() == [20000, 60000]
    lstm = preset_config("lstm_lm")
    assert lstm.model.criterion == "adaptive_loss" and lstm.model.adaptive_softmax_cutoff() == [10000, 20000]


def test_the_config_overrides_the_preset_key_by_key():
    cfg = preset_config("tiny", model={"options": {"decoder_layers": 4}}, train={"lr": 0.01, "extra_args": {"x": 1}})
    assert cfg.model.options["decoder_layers"] == 4 and cfg.model.options["decoder_embed_dim"] == 64
    assert cfg.train.lr == 0.01 and cfg.train.tokens_per_sample == 128
    assert config.from_json(cfg.to_json()) == cfg, "a preset survives the JSON round trip unchanged"
    on_command_line = config.load(TINY_CONFIG, ["model.preset=lstm_lm", "model.options.decoder_layers=1"])
    assert on_command_line.model.arch == "lstm_lm"


def test_unknown_preset_names_the_known_ones():
    with pytest.raises(ConfigError, match="unknown preset 'gpt5'.*lstm_lm.*tiny"):
        preset_config("gpt5")


def test_unknown_fairseq_option_fails_before_launch(fast_data_bin, tmp_path):
    from lmforge.training.train import preflight

    cfg = config.load(TINY_CONFIG, ["train.extra_args.no_such_option=3"])
    with pytest.raises(LmforgeError, match="fairseq rejected the arguments"):
        preflight(cfg, str(fast_data_bin), str(tmp_path))


@pytest.mark.parametrize("overrides", [
    # lstm_lm with its adaptive softmax, cutoffs under this small vocabulary (~1.8k words); the
    # hidden and output widths follow decoder_embed_dim
    ["model.preset=lstm_lm", "model.options.adaptive_softmax_cutoff=500,1000", "model.options.decoder_embed_dim=64"],
    ["model.criterion=label_smoothed_cross_entropy", "train.extra_args.label_smoothing=0.1"],
], ids=["lstm_lm-adaptive_loss", "label_smoothing"])
def test_cpu_sized_variants_run_a_batch(overrides, fast_data_bin, tmp_path):
    from lmforge.training.train import dry_run

    cfg = config.load(TINY_CONFIG, ["train.nproc=1", "train.max_tokens=512", f"train.cache_dir={tmp_path}", *overrides])
    report = dry_run(cfg, fast_data_bin, tmp_path / "ckpt")
    assert math.isfinite(report["batch"]["loss_base2"]) and report["batch"]["loss_base2"] > 0
