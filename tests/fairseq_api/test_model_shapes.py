"""Each shipped preset's model, built for real by fairseq on CPU from the arguments lmforge builds,
has the parameter count its declared shape gives (fairseq_api.arguments.WIDTH_FOLLOWERS: the
input and output widths follow decoder_embed_dim unless the user sets them).

The counts, checked against fairseq 0.12's modules:
- transformer_lm, width d, FFN f, L layers, V words: embeddings V*d_in (+ a d_in*d projection when
  d_in != d; + (positions+2)*d when learned); per layer attention 4*d*d + 4*d (q, k, v, out with
  biases), FFN 2*d*f + d + f, two layer norms 4*d; a final layer norm 2*d; a d*d_out projection
  when d_out != d; the output V*d_out unless tied to the embedding.
- adaptive input (band b of the cutoffs: words n_b, width d_in // 4**b): n_b*w_b + w_b*d each; an
  adaptive softmax tied to it (weights and projections) adds only its head's class rows d*(bands-1).
- lstm_lm, embedding e, hidden h: V*e; per layer 4*h*(input + h) + 8*h (two biases); a
  non-tied adaptive softmax over h: head h*(cutoff_0 + bands-1), tail band b h*w_b + w_b*n_b with
  w_b = h // 4**(b+1).
"""

import pytest

from lmforge import config
from lmforge.fairseq_api.arguments import WIDTH_FOLLOWERS, model_family, train_args
from lmforge.fairseq_api.calls import model_shapes

#: Cutoffs under fast_data_bin's vocabulary (~1.8k words); the shipped ones need 20k-60k words.
SMALL_CUTOFFS = "500,1000"

#: Each preset's shape as its comment in lmforge.config.presets declares it.
DECLARED = {
    # fairseq applies no architecture function to --arch transformer_lm (its named architectures
    # run base_lm_architecture): the dataclass defaults stand, post-norm layers and no final norm.
    "tiny": {"layers": 2, "d": 64, "ffn": 256, "tied": True, "final_norm": False},
    "transformer_lm_gpt": {"layers": 12, "d": 768, "ffn": 3072, "tied": True},  # GPT-2 small
    # Baevski & Auli: transformer_lm_big's shape, 16 layers, adaptive input and softmax tied, no final norm
    "transformer_lm_wiki103": {"layers": 16, "d": 1024, "ffn": 4096, "adaptive": SMALL_CUTOFFS, "final_norm": False},
    "lstm_lm": {"layers": 2, "e": 512, "h": 512, "adaptive": SMALL_CUTOFFS},
}

SMALL_VOCABULARY = {
    "transformer_lm_wiki103": {"adaptive_input_cutoff": SMALL_CUTOFFS, "adaptive_softmax_cutoff": SMALL_CUTOFFS},
    "lstm_lm": {"adaptive_softmax_cutoff": SMALL_CUTOFFS},
}


def bands(cutoffs: str, vocabulary: int) -> list[int]:
    edges = [0, *(int(c) for c in cutoffs.split(",")), vocabulary]
    return [b - a for a, b in zip(edges, edges[1:])]


def transformer_lm_parameters(V, *, layers, d, ffn, d_in=None, d_out=None, tied=False, learned_positions=0,
                              final_norm=True, adaptive=None):
    d_in, d_out = d_in or d, d_out or d
    if adaptive:
        widths = [int(d_in // 4**b) for b in range(len(bands(adaptive, V)))]
        n = sum(size * w + w * d for size, w in zip(bands(adaptive, V), widths))
        n += d_out * (len(widths) - 1)  # the tied softmax head's class rows
    else:
        n = V * d_in + (d_in * d if d_in != d else 0)
        n += d * d_out if d_out != d else 0
        n += 0 if tied else V * d_out
    n += (learned_positions + 2) * d if learned_positions else 0
    n += layers * ((4 * d * d + 4 * d) + (2 * d * ffn + d + ffn) + 2 * 2 * d)
    return n + (2 * d if final_norm else 0)


def lstm_lm_parameters(V, *, layers, e, h, adaptive):
    n = V * e + sum(4 * h * ((e if i == 0 else h) + h) + 8 * h for i in range(layers))
    sizes = bands(adaptive, V)
    n += h * (sizes[0] + len(sizes) - 1)
    return n + sum(h * (h // 4 ** (b + 1)) + (h // 4 ** (b + 1)) * size for b, size in enumerate(sizes[1:]))


def expected_parameters(arch, V, shape):
    if model_family(arch) == "lstm_lm":
        return lstm_lm_parameters(V, **shape)
    return transformer_lm_parameters(V, **shape)


def build(cfg, data_bin, tmp_path):
    """fairseq's own parser, task and model builder on lmforge's fairseq-train arguments."""
    from fairseq import options, tasks
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    args = options.parse_args_and_arch(options.get_training_parser(),
                                       input_args=train_args(cfg, str(data_bin), str(tmp_path)))
    fairseq_cfg = convert_namespace_to_omegaconf(args)
    task = tasks.setup_task(fairseq_cfg.task)
    return len(task.source_dictionary), task.build_model(fairseq_cfg.model)


def preset_config(name, **options):
    options = {**SMALL_VOCABULARY.get(name, {}), **options}
    return config.from_dict({"corpus": {"source": "x"}, "model": {"preset": name, "options": options}})


@pytest.mark.parametrize("name", sorted(DECLARED))
def test_each_preset_has_the_parameters_its_shape_declares(name, fast_data_bin, tmp_path):
    cfg = preset_config(name)
    V, model = build(cfg, fast_data_bin, tmp_path)
    assert sum(p.numel() for p in model.parameters()) == expected_parameters(cfg.model.arch, V, DECLARED[name])
    shapes = model_shapes(model)
    assert shapes["layers"] == DECLARED[name]["layers"] and shapes["projections"] == []
    width = DECLARED[name].get("d") or DECLARED[name]["e"]
    assert {shapes["widths"]["embed_dim"], shapes["widths"]["output_dim"]} == {width}


def test_tiny_before_the_rule_had_a_512_wide_embedding(fast_data_bin, tmp_path):
    """What fairseq builds for `--arch transformer_lm --decoder-embed-dim 64` alone: the trap the rule closes."""
    cfg = preset_config("tiny", decoder_input_dim=512, decoder_output_dim=512)
    V, model = build(cfg, fast_data_bin, tmp_path)
    assert sum(p.numel() for p in model.parameters()) == transformer_lm_parameters(
        V, layers=2, d=64, ffn=256, d_in=512, d_out=512, tied=True, final_norm=False)
    assert model_shapes(model)["projections"] == ["project_in_dim", "project_out_dim"]


def test_a_user_set_input_dim_is_kept(fast_data_bin, tmp_path):
    """decoder_input_dim 32 set by the user: kept, with fairseq's projection to the 64-wide layers;
    the output width still follows decoder_embed_dim. Learned positions and an untied output
    check the rest of the formula."""
    cfg = preset_config("tiny", decoder_input_dim=32, decoder_learned_pos=True, share_decoder_input_output_embed=False)
    V, model = build(cfg, fast_data_bin, tmp_path)
    assert sum(p.numel() for p in model.parameters()) == transformer_lm_parameters(
        V, layers=2, d=64, ffn=256, d_in=32, learned_positions=cfg.train.tokens_per_sample, final_norm=False)
    shapes = model_shapes(model)
    assert shapes["embed_tokens"] == [V, 32] and shapes["projections"] == ["project_in_dim"]
    assert shapes["widths"] == {"embed_dim": 64, "input_dim": 32, "output_dim": 64, "ffn_dim": 256, "attention_heads": 2}


def test_a_new_width_resizes_every_family(fast_data_bin, tmp_path):
    """model.options.decoder_embed_dim alone (the run form's field) resizes the whole model."""
    for name in DECLARED:
        V, model = build(preset_config(name, decoder_embed_dim=96, decoder_layers=1), fast_data_bin, tmp_path)
        widths = model_shapes(model)["widths"]
        assert widths["embed_dim"] == widths["output_dim"] == 96, name
        assert model_shapes(model)["projections"] == [], name


def test_every_fairseq_architecture_a_family_claims_builds_that_familys_model():
    """model_family goes by the name's prefix; every architecture it claims builds the family's
    model class or a subclass of it (transformer_lm_megatron: the model-parallel transformer_lm),
    and every architecture of a family's model is claimed."""
    from fairseq.models import ARCH_MODEL_NAME_REGISTRY, ARCH_MODEL_REGISTRY, MODEL_REGISTRY

    claimed = {arch: model_family(arch) for arch in ARCH_MODEL_REGISTRY if model_family(arch)}
    assert {"transformer_lm", "transformer_lm_gpt", "transformer_lm_wiki103", "lstm_lm"} <= set(claimed)
    for arch, family in claimed.items():
        assert issubclass(ARCH_MODEL_REGISTRY[arch], MODEL_REGISTRY[family]), arch
    for arch, model in ARCH_MODEL_NAME_REGISTRY.items():
        if model in WIDTH_FOLLOWERS:
            assert claimed.get(arch) == model, arch
