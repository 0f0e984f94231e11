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
    assert wiki.model.adaptive_input_cutoff() == wiki.model.adaptive_softmax_cutoff() == [20000, 60000]
    smaller = preset_config("transformer_lm_wiki103", model={"options": {"adaptive_softmax_cutoff": "500,1000"}})
    assert smaller.model.adaptive_input_cutoff() == [500, 1000], "tied: the input's cutoffs follow the softmax's"
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


#: Cutoffs under fast_data_bin's vocabulary (~1.8k words), as in tests/fairseq_api/test_model_shapes.py.
SMALL_CUTOFFS = "500,1000"
#: A transformer preset's layers and widths shrunk to what 2 CPU cores train in seconds.
NARROW = ["model.options.decoder_layers=2", "model.options.decoder_embed_dim=64",
          "model.options.decoder_ffn_embed_dim=256", "model.options.decoder_attention_heads=2"]
#: Each shipped preset as a CPU-sized variant: its widths and vocabulary-sized options shrunk, its
#: character kept (architecture, criterion, optimizer, scheduler, clipping, dropout, update_freq).
CPU_SIZED = {
    # the tiny preset is CPU-sized already; here it trains under the label-smoothed criterion
    "tiny+label_smoothing": ["model.preset=tiny", "model.criterion=label_smoothed_cross_entropy",
                             "train.extra_args.label_smoothing=0.1"],
    "transformer_lm_gpt": ["model.preset=transformer_lm_gpt", *NARROW],
    # adaptive input tied to the adaptive softmax (its cutoffs follow the softmax's), NAG with cosine
    # restarts and update_freq 3 as in the recipe; the cosine period fits the run, and 3 batches of
    # 128 tokens an update keep the 30 updates within one epoch
    "transformer_lm_wiki103": ["model.preset=transformer_lm_wiki103", *NARROW,
                               f"model.options.adaptive_softmax_cutoff={SMALL_CUTOFFS}",
                               "train.extra_args.lr_period_updates=25", "train.max_tokens=128"],
    # the hidden and output widths follow decoder_embed_dim
    "lstm_lm": ["model.preset=lstm_lm", "model.options.decoder_embed_dim=64",
                f"model.options.adaptive_softmax_cutoff={SMALL_CUTOFFS}"],
}
#: A 30-update run of 256-token batches of 64-token samples, a loss logged at every update; the
#: warm-up shrunk with the run (the presets warm up over 4,000-16,000 updates).
SHORT_RUN = ["train.nproc=1", "train.tokens_per_sample=64", "train.max_tokens=256", "train.max_update=30",
             "train.max_epoch=0", "train.log_interval=1", "train.warmup_updates=5"]


@pytest.fixture
def forget_allowlist():
    """Empties torch.load's allowlist, as a fresh process has it: lmforge adds to it for the whole
    process (`fairseq_api.calls.allow_legacy_checkpoints`), so each call that reads a checkpoint
    starts from none here. The allowlist is put back afterwards."""
    import torch

    saved = torch.serialization.get_safe_globals()
    yield torch.serialization.clear_safe_globals
    torch.serialization.clear_safe_globals()
    torch.serialization.add_safe_globals(saved)


@pytest.mark.slow
@pytest.mark.parametrize("variant", sorted(CPU_SIZED))
def test_cpu_sized_preset_trains_evaluates_and_scores(variant, fast_data_bin, tmp_path, capfd, forget_allowlist):
    """`lmforge train` of the CPU-sized variant: 30 updates, its loss falling; `lmforge evaluate`
    of its best checkpoint: a finite perplexity below the vocabulary's size (a uniform guess);
    the registered model's scorer reads the checkpoint and scores text."""
    import time

    from conftest import bare_config_file, lmforge_cli, train_inner_losses
    from fairseq.data import Dictionary

    from lmforge.models.scoring import FairseqLanguageModel

    settings = [x for o in (*SHORT_RUN, *CPU_SIZED[variant], f"train.cache_dir={tmp_path / 'cache'}") for x in ("--set", o)]
    common = ["--config", str(bare_config_file(tmp_path)), "--data-bin", str(fast_data_bin), *settings]
    started = time.perf_counter()
    summary, log = lmforge_cli(capfd, "train", *common, "--checkpoints", str(tmp_path / "ckpt"))
    trained = time.perf_counter() - started
    losses = train_inner_losses(log)
    assert summary["num_updates"] == 30 and sorted(losses) == list(range(1, 31))
    first, last = float(losses[1]), float(losses[30])
    assert last < first, f"{variant}: loss {first} at update 1, {last} at update 30"

    forget_allowlist()
    result, _ = lmforge_cli(capfd, "evaluate", *common, "--checkpoint", summary["checkpoint_best"])
    words = len(Dictionary.load(str(fast_data_bin / "dict.txt")))
    assert math.isfinite(result["perplexity"]) and 1 < result["perplexity"] < words

    # what a serving process does first: read the checkpoint with fairseq's hub loader
    forget_allowlist()
    model = FairseqLanguageModel.from_files(summary["checkpoint_best"], fast_data_bin / "dict.txt")
    (row,) = model.predict(None, ["the cat sat on the mat"]).to_dict("records")
    assert math.isfinite(row["log_prob"]) and row["tokens"] == 6
    print(f"\n| {variant} | 30 | {first} | {last} | {result['perplexity']:.1f} | {trained:.1f} s |")
