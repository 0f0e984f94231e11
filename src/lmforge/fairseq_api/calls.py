"""The one place lmforge calls fairseq's training and evaluation entry points in-process.

In: argument lists built by `lmforge.fairseq_api.arguments`. Out: fairseq's own results:
`train` writes checkpoints (with a hook after each save and a stop check after each update),
`eval_lm` returns loss, perplexity and tokens, `dry_run` one epoch's batching, the model's
parameter count and shapes (`model_shapes`) and one real batch, `check_train_args` refuses
what fairseq-train's parser refuses (a one-line LmforgeError naming the option), `architectures`/`criteria` list fairseq's registries.
`allow_legacy_checkpoints` lets fairseq's loader read lstm_lm checkpoints under torch >= 2.6 (train, eval-lm, and
`lmforge.models.scoring` call it).
fairseq is imported inside each function: importing it costs ~5 s and is only needed here.

    lmforge worker ...  (train), lmforge evaluate ...  (eval_lm), lmforge train --dry-run ...  (dry_run)
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from lmforge.errors import LmforgeError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SaveEvent:
    """One fairseq save, as the training loop saw it."""

    num_updates: int
    epoch: int  # the epoch in progress (or just finished)
    end_of_epoch: bool
    best_loss: float | None

    @property
    def epochs_completed(self) -> int:
        return self.epoch if self.end_of_epoch else self.epoch - 1


def _parse(parser_factory: Callable[[], Any], argv: list[str]) -> Any:
    """fairseq's config for `argv`; argparse's complaint (its last stderr line) becomes a one-line LmforgeError."""
    from fairseq import options
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    parser = parser_factory()
    printed = io.StringIO()
    try:
        with contextlib.redirect_stderr(printed):  # argparse prints ~200 lines of usage before its reason
            args = options.parse_args_and_arch(parser, input_args=argv)
    except SystemExit as exc:
        reason = _argparse_reason(printed.getvalue(), exc.code)
        raise LmforgeError(f"fairseq rejected the arguments: {reason}") from None
    return convert_namespace_to_omegaconf(args)


def _argparse_reason(stderr: str, code: Any) -> str:
    """'argument --lr: invalid float value' from argparse's 'prog: error: ...' line, the list of
    valid choices left out (fairseq's --arch lists over 200)."""
    for line in reversed(stderr.splitlines()):
        _, found, reason = line.partition(": error: ")
        if found:
            return reason.split(" (choose from ")[0]
    return f"exit {code}"


def architectures() -> set[str]:
    from fairseq.models import ARCH_MODEL_REGISTRY

    return set(ARCH_MODEL_REGISTRY)


def criteria() -> set[str]:
    from fairseq.criterions import CRITERION_REGISTRY

    return set(CRITERION_REGISTRY)


def check_train_args(argv: list[str]) -> None:
    """Raise LmforgeError when fairseq-train would reject `argv` (unknown option, bad value)."""
    from fairseq import options

    _parse(options.get_training_parser, argv)


def allow_legacy_checkpoints() -> None:
    """Let fairseq's own loader (resume, eval-lm, the hub) read checkpoints of models configured by
    an argparse.Namespace rather than a dataclass (lstm_lm): their cfg pickles one, and torch >= 2.6
    loads with weights_only=True unless told otherwise, which refuses every class it does not know.
    A Namespace holds plain attributes, so allowing it keeps the loader's protection otherwise."""
    import argparse

    import torch

    torch.serialization.add_safe_globals([argparse.Namespace])


def train(
    argv: list[str],
    *,
    on_checkpoint: Callable[[Any], None] | None = None,
    stop_requested: Callable[[], bool] | None = None,
) -> None:
    """fairseq-train in this process; the distributed placement is in argv (see `arguments.train_args`).

    `on_checkpoint(SaveEvent)` runs on the process that wrote checkpoints, right after each save
    is complete on disk. `stop_requested()` is asked after every update, on every process (it
    may be a collective); when it says yes, a checkpoint is saved and training ends as if it
    had reached max_update.
    """
    from fairseq import options

    cfg = _parse(options.get_training_parser, argv)
    allow_legacy_checkpoints()
    with _training_hooks(on_checkpoint, stop_requested):
        from fairseq.distributed import utils as distributed_utils
        from fairseq_cli import train as fairseq_train

        distributed_utils.call_main(cfg, fairseq_train.main)


@contextlib.contextmanager
def _training_hooks(
    on_checkpoint: Callable[[Any], None] | None, stop_requested: Callable[[], bool] | None
) -> Iterator[None]:
    """Wrap fairseq's save_checkpoint and validate_and_save for the duration of one training run,
    and its broadcast of a resumed state to the other ranks (see `broadcast_object_slow`).

    fairseq offers no callback for either. fairseq looks all three up as module attributes
    at every call, so replacing the attributes is enough. The save wrapper is a new function per
    run, so fairseq's best-loss memory (an attribute of save_checkpoint) starts fresh each run
    instead of leaking from an earlier run in the same process.
    """
    from fairseq import checkpoint_utils
    from fairseq.distributed import utils as distributed_utils
    from fairseq_cli import train as fairseq_train

    original_save = checkpoint_utils.save_checkpoint
    original_validate_and_save = fairseq_train.validate_and_save
    original_broadcast = distributed_utils._broadcast_object_slow

    def save_checkpoint(cfg: Any, trainer: Any, epoch_itr: Any, val_loss: Any) -> Any:
        result = original_save(cfg, trainer, epoch_itr, val_loss)
        if on_checkpoint is not None and not cfg.no_save and trainer.should_save_checkpoint_on_current_rank:
            best = getattr(checkpoint_utils.save_checkpoint, "best", None)
            on_checkpoint(SaveEvent(
                num_updates=trainer.get_num_updates(), epoch=epoch_itr.epoch,
                end_of_epoch=epoch_itr.end_of_epoch(), best_loss=float(best) if best is not None else None,
            ))
        return result

    def validate_and_save(cfg: Any, trainer: Any, task: Any, epoch_itr: Any, valid_subsets: Any, end_of_epoch: bool) -> Any:
        if stop_requested is not None and stop_requested():
            # No validation: the time before SIGKILL (terminationGracePeriodSeconds) goes to saving.
            log.info("stop requested: saving a checkpoint at %d updates", trainer.get_num_updates())
            checkpoint_utils.save_checkpoint(cfg.checkpoint, trainer, epoch_itr, None)
            return [None], True
        return original_validate_and_save(cfg, trainer, task, epoch_itr, valid_subsets, end_of_epoch)

    def broadcast_object_slow(*args: Any, **kwargs: Any) -> Any:
        # A resume with more than one process: rank 0 reads the checkpoint and fairseq sends its
        # state (with the omegaconf config) to the other ranks through torch.save and torch.load.
        # Since torch 2.6 that torch.load defaults to weights_only=True and refuses the config, so
        # every rank but 0 failed. The bytes are rank 0's, of this job: load them as fairseq meant to.
        with _full_unpickling():
            return original_broadcast(*args, **kwargs)

    checkpoint_utils.save_checkpoint = save_checkpoint
    fairseq_train.validate_and_save = validate_and_save
    distributed_utils._broadcast_object_slow = broadcast_object_slow
    try:
        yield
    finally:
        checkpoint_utils.save_checkpoint = original_save
        fairseq_train.validate_and_save = original_validate_and_save
        distributed_utils._broadcast_object_slow = original_broadcast


@contextlib.contextmanager
def _full_unpickling() -> Iterator[None]:
    """torch.load calls that pass no weights_only load with weights_only=False meanwhile (torch's
    own switch, read at every call); fairseq's calls pass none."""
    import os
    import warnings

    name = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"
    previous = os.environ.get(name)
    os.environ[name] = "1"
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=f"Environment variable {name} detected")
            yield
    finally:
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous


def dry_run(argv: list[str], *, world_size: int, update_freq: int) -> dict[str, Any]:
    """What one epoch of this training means, from fairseq's own batching, plus one real batch.

    Returns batches per process, updates per epoch, tokens per update, the parameter count, the
    model's shapes (`model_shapes`) and the loss (base 2), seconds and peak memory of one
    forward/backward pass on this machine.
    """
    import math

    import torch
    from fairseq import options, tasks, utils

    cfg = _parse(options.get_training_parser, argv)
    utils.import_user_module(cfg.common)
    task = tasks.setup_task(cfg.task)
    task.load_dataset("train", combine=False, epoch=1)
    dataset = task.dataset("train")
    model = task.build_model(cfg.model)
    criterion = task.build_criterion(cfg.criterion)
    epoch_itr = task.get_batch_iterator(
        dataset=dataset,
        max_tokens=cfg.dataset.max_tokens,
        max_sentences=cfg.dataset.batch_size,
        max_positions=utils.resolve_max_positions(task.max_positions(), model.max_positions(), cfg.dataset.max_tokens),
        ignore_invalid_inputs=True,
        required_batch_size_multiple=cfg.dataset.required_batch_size_multiple,
        seed=cfg.common.seed,
        num_shards=world_size,
        shard_id=0,
        num_workers=0,
        epoch=1,
    )
    batches = len(epoch_itr)  # this process's share of the epoch
    train_tokens = int(dataset.sizes.sum())
    updates = math.ceil(batches / update_freq)
    # every process contributes update_freq batches to an update
    batch_tokens = [int(dataset.sizes[batch].sum()) for batch in epoch_itr.frozen_batches]
    tokens_per_update = sum(batch_tokens) / max(len(batch_tokens), 1) * world_size * update_freq
    device = torch.device("cpu" if cfg.common.cpu or not torch.cuda.is_available() else f"cuda:{cfg.distributed_training.device_id}")
    dtype = torch.bfloat16 if cfg.common.bf16 else torch.float16 if cfg.common.fp16 else torch.float32
    model.to(device=device, dtype=dtype).train()
    criterion.to(device)
    sample = next(iter(epoch_itr.next_epoch_itr(shuffle=False)))
    if device.type == "cuda":
        sample = utils.move_to_cuda(sample, device=device)
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    loss, sample_size, _ = criterion(model, sample)
    (loss / sample_size).backward()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - started
    return {
        "train_tokens": train_tokens,
        "batches_per_process": batches,
        "updates_per_epoch": updates,
        "tokens_per_update": round(tokens_per_update),
        "max_tokens_per_update": cfg.dataset.max_tokens * world_size * update_freq,
        "parameters": sum(p.numel() for p in model.parameters()),
        "model": model_shapes(model),
        "batch": {
            "tokens": int(sample["ntokens"]),
            "loss_base2": float(loss.detach()) / float(sample_size) / math.log(2),
            "seconds": seconds,
            "device": str(device),
            "peak_memory_bytes": int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None,
        },
    }


def model_shapes(model: Any) -> dict[str, Any]:
    """A fairseq LM's decoder as it was built: embedding, layers and widths.

    {'embed_tokens': [53840, 64], 'layers': 2, 'widths': {'embed_dim': 64,
    'input_dim': 64, 'output_dim': 64, 'ffn_dim': 256, 'attention_heads': 2}, 'projections': []}
    for the tiny transformer; an adaptive input lists its bands' [words, width]; an LSTM gives
    hidden_size for ffn_dim and heads. `projections` names the Linear layers between differing
    widths (project_in_dim, project_out_dim, additional_fc): one the user did not ask for is a
    width fairseq filled in.
    """
    decoder = model.decoder
    embed = decoder.embed_tokens
    if hasattr(embed, "embeddings"):  # fairseq.modules.AdaptiveInput: one (Embedding, Linear) per band
        embed_shape: Any = [list(band[0].weight.shape) for band in embed.embeddings]
        input_dim = embed.embeddings[0][0].weight.shape[1]
    else:
        embed_shape, input_dim = list(embed.weight.shape), embed.weight.shape[1]
    layer = decoder.layers[0]
    if hasattr(layer, "self_attn"):  # a transformer decoder layer
        widths = {"embed_dim": decoder.embed_dim, "input_dim": input_dim, "output_dim": decoder.output_embed_dim,
                  "ffn_dim": layer.fc1.out_features, "attention_heads": layer.self_attn.num_heads}
    else:  # an LSTM cell
        fc = getattr(decoder, "additional_fc", None)
        widths = {"embed_dim": input_dim, "hidden_size": layer.hidden_size,
                  "output_dim": fc.out_features if fc is not None else layer.hidden_size}
    projections = [name for name in ("project_in_dim", "project_out_dim", "additional_fc")
                   if getattr(decoder, name, None) is not None]
    return {"embed_tokens": embed_shape, "layers": len(decoder.layers), "widths": widths, "projections": projections}


def eval_lm(argv: list[str]) -> dict[str, float]:
    """fairseq-eval-lm in this process.

    Returns {'loss' (base 2), 'perplexity', 'tokens', 'seconds' (wall, loading included),
    'scoring_seconds' and 'tokens_per_second' (fairseq's timer around the scoring loop, as the
    CLI prints them)}.
    """
    from fairseq import options
    from fairseq_cli import eval_lm as fairseq_eval_lm

    cfg = _parse(options.get_eval_lm_parser, argv)
    allow_legacy_checkpoints()
    counter = _TokenCounter()
    eval_logger = logging.getLogger(fairseq_eval_lm.__name__)
    eval_logger.addHandler(counter)
    # The count is read from an INFO line: make sure it is emitted whatever LOGLEVEL says.
    previous_level = eval_logger.level
    eval_logger.setLevel(logging.INFO)
    started = time.perf_counter()
    try:
        results = fairseq_eval_lm.main(cfg)
    finally:
        eval_logger.removeHandler(counter)
        eval_logger.setLevel(previous_level)
    return {
        "loss": float(results["loss"]),
        "perplexity": float(results["perplexity"]),
        "tokens": counter.tokens,
        "seconds": time.perf_counter() - started,
        # fairseq's own timer around the scoring loop (model loading excluded), as the CLI prints it
        "scoring_seconds": counter.seconds,
        "tokens_per_second": counter.rate,
    }


_EVALUATED = re.compile(r"^Evaluated ([\d,]+) tokens in ([\d.]+)s \(([\d.]+) tokens/s\)")


class _TokenCounter(logging.Handler):
    """Reads fairseq-eval-lm's 'Evaluated N tokens in Xs (R tokens/s)' line: main() returns
    only loss and perplexity."""

    def __init__(self) -> None:
        super().__init__()
        self.tokens = 0
        self.seconds = 0.0
        self.rate = 0.0

    def emit(self, record: logging.LogRecord) -> None:
        match = _EVALUATED.match(record.getMessage())
        if match:
            self.tokens = int(match.group(1).replace(",", ""))
            self.seconds = float(match.group(2))
            self.rate = float(match.group(3))
