"""The one place lmforge calls fairseq's training and evaluation entry points in-process.

In: argument lists built by `lmforge.fairseq_args`. Out: fairseq's own results
(training writes checkpoints; eval-lm returns loss and perplexity). fairseq is
imported inside each function: importing it costs ~5 s and is only needed here.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from typing import Any

from lmforge.errors import LmforgeError

log = logging.getLogger(__name__)


def _parse(parser_factory: Callable[[], Any], argv: list[str]) -> Any:
    from fairseq import options
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    parser = parser_factory()
    try:
        args = options.parse_args_and_arch(parser, input_args=argv)
    except SystemExit as exc:  # argparse already printed what was wrong
        raise LmforgeError(f"fairseq rejected the arguments (exit {exc.code}); see the message above") from None
    return convert_namespace_to_omegaconf(args)


def architectures() -> set[str]:
    from fairseq.models import ARCH_MODEL_REGISTRY

    return set(ARCH_MODEL_REGISTRY)


def criteria() -> set[str]:
    from fairseq.criterions import CRITERION_REGISTRY

    return set(CRITERION_REGISTRY)


def train(argv: list[str]) -> None:
    """fairseq-train in this process; the distributed placement is in argv (see fairseq_args)."""
    from fairseq import options
    from fairseq.distributed import utils as distributed_utils
    from fairseq_cli import train as fairseq_train

    cfg = _parse(options.get_training_parser, argv)
    distributed_utils.call_main(cfg, fairseq_train.main)


def eval_lm(argv: list[str]) -> dict[str, float]:
    """fairseq-eval-lm in this process.

    Returns {'loss' (base 2), 'perplexity', 'tokens', 'seconds' (wall, loading included),
    'scoring_seconds' and 'tokens_per_second' (fairseq's timer around the scoring loop, as the
    CLI prints them)}.
    """
    from fairseq import options
    from fairseq_cli import eval_lm as fairseq_eval_lm

    cfg = _parse(options.get_eval_lm_parser, argv)
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
