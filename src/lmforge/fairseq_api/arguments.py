"""Pure functions that turn a run config into fairseq-train's command line.

In: a `RunConfig`, paths and the distributed placement of one process (a
`Placement` of `lmforge.training.distributed`, re-exported here).
Out: the argument list for fairseq-train (without the program name), fed to
`lmforge.fairseq_api` in-process or to the CLI by hand (`bench/e2e.py` does the
latter with this very list). The task's part (--task, its options, the default
criterion) comes from the config's task (`lmforge.tasks`); the evaluation's command
line is the task's too (language modeling: `lmforge.tasks.language_modeling`'s
`eval_args`, fairseq-eval-lm).

    python -c "from lmforge import config; from lmforge.fairseq_api.arguments import train_args; \
               print(train_args(config.load('pipelines/configs/tiny.yaml'), 'DATA', 'CKPT'))"
"""

from __future__ import annotations

from typing import Any

from lmforge import tasks
from lmforge.config import RunConfig
from lmforge.config.schema import ties_adaptive_weights
from lmforge.training.distributed import Placement

__all__ = ["PRECISION_FLAGS", "WIDTH_FOLLOWERS", "Placement", "model_options", "option_args", "train_args"]


def option_args(options: dict[str, Any]) -> list[str]:
    """{decoder_layers: 2, share_x: true, y: false} -> ['--decoder-layers', '2', '--share-x'].

    `false` and `null` leave the option out, which is fairseq's default for flags.
    """
    args: list[str] = []
    for key, value in options.items():
        flag = "--" + str(key).replace("_", "-")
        if value is True:
            args.append(flag)
        elif value is False or value is None:
            continue
        elif isinstance(value, (list, tuple)):
            args += [flag, "(" + ", ".join(str(v) for v in value) + ")"]
        else:
            args += [flag, str(value)]
    return args


#: fairseq model -> the widths that should follow `decoder_embed_dim` unless the user sets them.
#: transformer_lm: with --arch transformer_lm, fairseq fills decoder_input_dim and decoder_output_dim
#: from its dataclass default (512), not from --decoder-embed-dim, so the `tiny` preset (64 wide)
#: got a 512-wide embedding plus two projections: 4,884,096 parameters instead of 689,792 on the
#: tiny config's 9,216-word dictionary (27.7M instead of 3.5M on 53,840 words). Its named
#: architectures (transformer_lm_gpt, ...) already follow; the same value again changes nothing.
#: lstm_lm: decoder_out_embed_dim defaults to 512 whatever decoder_embed_dim says (decoder_hidden_size
#: follows already); a different width adds a projection (unused, dead weight, under an adaptive
#: softmax), and with tied embeddings fairseq refuses the model.
WIDTH_FOLLOWERS: dict[str, tuple[str, ...]] = {
    "transformer_lm": ("decoder_input_dim", "decoder_output_dim"),
    "lstm_lm": ("decoder_out_embed_dim",),
}


def model_family(arch: str) -> str | None:
    """transformer_lm_gpt -> 'transformer_lm', by the name's prefix: fairseq names architectures
    after their model (transformer_lm_megatron builds a subclass of transformer_lm's model;
    tests/fairseq_api/test_model_shapes.py checks every claimed name against fairseq's registry)."""
    return next((m for m in WIDTH_FOLLOWERS if arch == m or arch.startswith(m + "_")), None)


def model_options(arch: str, options: dict[str, Any], extra_args: dict[str, Any] | None = None) -> dict[str, Any]:
    """`options` plus the widths that follow decoder_embed_dim where neither mapping sets them, and
    the adaptive input's cutoffs that follow a tied adaptive softmax's.

    {decoder_embed_dim: 64} with transformer_lm -> also decoder_input_dim 64, decoder_output_dim 64.
    Without decoder_embed_dim the architecture's own width applies, and fairseq's own rule with it.
    {adaptive_softmax_cutoff: '500,1000'} with transformer_lm_wiki103 -> also adaptive_input_cutoff
    '500,1000': fairseq asserts that tied cutoffs are the same text, and the architecture's default
    input cutoff (20000,60000) exceeds a small dictionary (`config.validation` refuses unequal ones).
    """
    given = {**options, **(extra_args or {})}
    out = dict(options)
    width = given.get("decoder_embed_dim")
    if width is not None:
        followers = WIDTH_FOLLOWERS.get(model_family(arch) or "", ())
        out.update({name: width for name in followers if given.get(name) is None})
    cutoff = given.get("adaptive_softmax_cutoff")
    if cutoff is not None and ties_adaptive_weights(arch, given):
        out["adaptive_input_cutoff"] = cutoff
    return out


PRECISION_FLAGS = {
    "fp32": [], "fp16": ["--fp16"], "memory_efficient_fp16": ["--memory-efficient-fp16"],
    "bf16": ["--bf16"], "memory_efficient_bf16": ["--memory-efficient-bf16"],
}


def train_args(cfg: RunConfig, data_dir: str, save_dir: str, placement: Placement = Placement()) -> list[str]:
    """fairseq-train arguments for one process of the job."""
    t, m, task = cfg.train, cfg.model, tasks.get(cfg.task)
    criterion = task.criterion(cfg)
    args = [
        data_dir,
        *task.train_args(cfg),
        "--arch", m.arch,
        "--criterion", criterion,
        "--optimizer", t.optimizer,
        "--lr", str(t.lr),
        "--lr-scheduler", t.lr_scheduler,
        "--weight-decay", str(t.weight_decay),
        "--dropout", str(t.dropout),
        "--clip-norm", str(t.clip_norm),
        "--max-tokens", str(t.max_tokens),
        "--update-freq", str(t.update_freq),
        "--max-epoch", str(t.max_epoch),
        "--max-update", str(t.max_update),
        "--seed", str(t.seed),
        "--save-dir", save_dir,
        "--log-format", "json",
        "--log-interval", str(t.log_interval),
        "--skip-invalid-size-inputs-valid-test",
    ]
    if t.keep_last_epochs:
        args += ["--keep-last-epochs", str(t.keep_last_epochs)]
    else:
        # last and best only: every epoch's copy costs disk and upload time
        args.append("--no-epoch-checkpoints")
    if t.save_interval_updates:
        args += ["--save-interval-updates", str(t.save_interval_updates),
                 "--keep-interval-updates", str(t.keep_interval_updates)]
    if t.patience > 0:
        args += ["--patience", str(t.patience)]
    if t.warmup_updates:
        args += ["--warmup-updates", str(t.warmup_updates)]
    if t.optimizer == "adam" and "adam_betas" not in t.extra_args:
        args += ["--adam-betas", "(0.9, 0.98)"]
    args += PRECISION_FLAGS[t.precision]
    if t.bmuf:
        args.append("--use-bmuf")
    if placement.cuda:
        # fairseq ignores LOCAL_RANK: without this every process of a node lands on GPU 0
        args += ["--device-id", str(placement.device_id)]
    else:
        args.append("--cpu")
    if placement.world_size > 1:
        args += [
            # fairseq's own environment detection divides WORLD_SIZE by the CUDA
            # device count (0 on CPU); the placement is therefore passed explicitly.
            "--distributed-world-size", str(placement.world_size),
            "--distributed-rank", str(placement.rank),
            "--distributed-init-method", "env://",
            "--distributed-no-spawn",
            "--distributed-backend", placement.backend,
        ]
    if "ddp_backend" not in t.extra_args and (criterion == "adaptive_loss" or
                                              (placement.world_size > 1 and not placement.cuda)):
        # pytorch_ddp hands device_ids to DDP, which fails for CPU modules; fairseq's
        # adaptive_loss refuses pytorch_ddp outright, even for a single process.
        args += ["--ddp-backend", "legacy_ddp"]
    return args + option_args(model_options(m.arch, m.options, t.extra_args)) + option_args(t.extra_args)

