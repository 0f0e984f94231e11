"""Named model presets: fairseq architecture, criterion, model options and the training settings
that go with them, as defaults under whatever a run config sets itself.

In: the run config as plain data (YAML or JSON), `model.preset` naming a preset. Out: the same
data with the preset's values filled in where the config is silent (mappings such as
`model.options` and `train.extra_args` are merged key by key). Applied by `lmforge.config`
before the typed config is built, so `lmforge config show --set model.preset=lstm_lm` shows the
result.
"""

from __future__ import annotations

import copy
from typing import Any

PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    # A 2-layer, 64-wide transformer: trains in a minute or two on 2 CPU cores. The input and
    # output widths follow decoder_embed_dim (`fairseq_api.arguments.WIDTH_FOLLOWERS`).
    "tiny": {
        "model": {
            "arch": "transformer_lm",
            "criterion": "cross_entropy",
            "options": {
                "decoder_layers": 2, "decoder_embed_dim": 64, "decoder_ffn_embed_dim": 256,
                "decoder_attention_heads": 2, "share_decoder_input_output_embed": True,
            },
        },
        "train": {"tokens_per_sample": 128, "max_tokens": 2048, "lr": 0.001, "warmup_updates": 20},
    },
    # GPT-2 small's shape (12 layers, 768 wide, 12 heads, GELU) with tied embeddings, trained as
    # fairseq's language-model example trains its transformer LMs.
    "transformer_lm_gpt": {
        "model": {
            "arch": "transformer_lm_gpt",
            "criterion": "cross_entropy",
            "options": {"share_decoder_input_output_embed": True},
        },
        "train": {
            "tokens_per_sample": 1024, "max_tokens": 8192, "optimizer": "adam", "lr": 0.0005,
            "lr_scheduler": "inverse_sqrt", "warmup_updates": 4000, "weight_decay": 0.01, "dropout": 0.1,
            "extra_args": {"warmup_init_lr": 1e-07},
        },
    },
    # Baevski & Auli's adaptive-input LM (fairseq's WikiText-103 recipe). The cutoffs suit a
    # WikiText-103-size vocabulary (267k words); the last must not exceed the dictionary's size.
    # The adaptive input is tied to the softmax, so its cutoffs follow these
    # (`fairseq_api.arguments.model_options`): model.options.adaptive_softmax_cutoff alone resizes both.
    "transformer_lm_wiki103": {
        "model": {
            "arch": "transformer_lm_wiki103",
            "criterion": "adaptive_loss",
            "options": {"adaptive_softmax_cutoff": "20000,60000"},
        },
        "train": {
            "tokens_per_sample": 3072, "max_tokens": 3072, "update_freq": 3, "optimizer": "nag", "lr": 1.0,
            "lr_scheduler": "cosine", "warmup_updates": 16000, "weight_decay": 0.0, "dropout": 0.3,
            "clip_norm": 0.1,
            "extra_args": {
                "min_lr": 0.0001, "t_mult": 2, "lr_period_updates": 270000, "lr_shrink": 0.75,
                "warmup_init_lr": 1e-07, "stop_min_lr": 1e-09,
            },
        },
    },
    # A 2-layer, 512-wide LSTM LM with an adaptive softmax; cutoffs sized for a WikiText-2-size
    # vocabulary (33k words). Only the embedding width is set: the hidden size and the output
    # width follow it (fairseq's rule and lmforge's, `fairseq_api.arguments.WIDTH_FOLLOWERS`), so
    # `model.options.decoder_embed_dim` alone resizes the model.
    "lstm_lm": {
        "model": {
            "arch": "lstm_lm",
            "criterion": "adaptive_loss",
            "options": {"decoder_layers": 2, "decoder_embed_dim": 512, "adaptive_softmax_cutoff": "10000,20000"},
        },
        "train": {"tokens_per_sample": 256, "max_tokens": 4096, "lr": 0.001, "clip_norm": 0.25, "dropout": 0.2},
    },
}


def _merged(defaults: Any, given: Any) -> Any:
    """`given` over `defaults`; mappings merge key by key, anything else given replaces the default."""
    if isinstance(defaults, dict) and isinstance(given, dict):
        out = copy.deepcopy(defaults)
        for key, value in given.items():
            out[key] = _merged(defaults.get(key), value) if key in defaults else value
        return out
    return given


def apply(data: dict[str, Any], problems: list[str]) -> dict[str, Any]:
    """`data` with its model preset's values wherever `data` sets none; an unknown name is a problem."""
    model = data.get("model")
    name = model.get("preset") if isinstance(model, dict) else None
    if not name:
        return data
    # --set model.preset=... arrives wrapped with its command-line text; the text is the name
    name = str(getattr(name, "text", name))
    if name not in PRESETS:
        problems.append(f"model.preset: unknown preset {name!r} (use {', '.join(sorted(PRESETS))})")
        return data
    return _merged(PRESETS[name], data)
