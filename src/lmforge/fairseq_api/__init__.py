"""The one place lmforge touches fairseq: argument lists and in-process calls.

`arguments` builds fairseq's command lines from the run config (pure functions,
tested without fairseq); `calls` runs fairseq's train, dry-run and eval-lm entry
points in-process with those lists. The calls are re-exported here, so callers
write `fairseq_api.train(argv)`.
"""

from lmforge.fairseq_api.calls import architectures, check_train_args, criteria, dry_run, eval_lm, train

__all__ = ["architectures", "check_train_args", "criteria", "dry_run", "eval_lm", "train"]
