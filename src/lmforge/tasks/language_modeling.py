"""The language-modeling task (causal LM): fairseq's `language_modeling`, scored by eval-lm.

In: the run config (train.tokens_per_sample, train.sample_break_mode, the evaluate section), a
data-bin of fairseq-preprocess --only-source's layout (dict.txt and {split}.bin/.idx) and a
checkpoint. Out: the task's answers (see `lmforge.tasks.base.Task`):

- data layout: dict.txt plus {split}.bin/{split}.idx;
- fairseq-train: --task language_modeling --tokens-per-sample N --sample-break-mode M,
  criterion cross_entropy unless model.criterion names another (adaptive_loss, ...);
- evaluation: fairseq's own eval-lm code in this process (`eval_args` is its command line, so
  `fairseq-eval-lm <eval_args>` gives the same numbers): loss (base 2 and nats), perplexity,
  tokens, tokens/s; its identity is the scored split's and the dictionary's sha256 and every
  setting that changes the number (a different dictionary or context window changes
  perplexity without the model changing; fairseq issue #2124);
- gate: perplexity, lower is better, on an identical identity;
- registered model: `lmforge.models.scoring.FairseqLanguageModel` (scores texts, samples
  continuations).

    lmforge run --config pipelines/configs/tiny.yaml        # task: language_modeling, the default
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmforge.io.hashing import file_sha256, files_sha256
from lmforge.tasks.base import GateMetric, Pyfunc, Task

if TYPE_CHECKING:
    from lmforge.config import RunConfig

#: eval-lm reads the split as one stream (blocks of tokens_per_sample, the context window carried
#: over), so sentence boundaries do not change the number.
EVAL_SAMPLE_BREAK_MODE = "none"


def split_sha256(data_dir: Path, split: str) -> str:
    """sha256 of a binarized split: its `.idx` (sentence boundaries) then its `.bin` (token ids)."""
    return files_sha256([Path(data_dir) / f"{split}.idx", Path(data_dir) / f"{split}.bin"])


class LanguageModeling(Task):
    name = "language_modeling"
    title = "language model"
    fairseq_task = "language_modeling"
    default_criterion = "cross_entropy"
    metrics = ("loss", "loss_base2", "perplexity", "tokens", "tokens_per_second")
    gate_metric = GateMetric(name="perplexity", tag="eval_perplexity", lower_is_better=True)

    def split_files(self, split: str) -> tuple[str, ...]:
        return (f"{split}.bin", f"{split}.idx")

    def train_args(self, cfg: RunConfig) -> list[str]:
        t = cfg.train
        return [
            "--task", self.fairseq_task,
            "--tokens-per-sample", str(t.tokens_per_sample),
            "--sample-break-mode", t.sample_break_mode,
        ]

    def eval_tokens_per_sample(self, cfg: RunConfig) -> int:
        return cfg.evaluate.tokens_per_sample or cfg.train.tokens_per_sample

    def eval_args(
        self, cfg: RunConfig, data_dir: str, checkpoint: str, *, split: str | None = None, cuda: bool = False
    ) -> list[str]:
        """fairseq-eval-lm arguments scoring `split` (default evaluate.split) with the config's settings."""
        e = cfg.evaluate
        args = [
            data_dir,
            "--task", self.fairseq_task,
            "--path", checkpoint,
            "--gen-subset", split or e.split,
            "--tokens-per-sample", str(self.eval_tokens_per_sample(cfg)),
            "--context-window", str(e.context_window),
            "--max-tokens", str(e.max_tokens),
            "--sample-break-mode", EVAL_SAMPLE_BREAK_MODE,
            "--log-format", "json",
            "--skip-invalid-size-inputs-valid-test",
        ]
        if not cuda:
            args.append("--cpu")
        return args

    def evaluation_identity(self, cfg: RunConfig, data_dir: Path) -> dict[str, Any]:
        """max_tokens is left out on purpose: batching does not change eval-lm's numbers
        (sample_break_mode none; the context window carries over from batch to batch)."""

        data_dir = Path(data_dir)
        return {
            "scorer": "fairseq-eval-lm",
            "split": cfg.evaluate.split,
            "split_sha256": split_sha256(data_dir, cfg.evaluate.split),
            "dict_sha256": file_sha256(data_dir / self.dictionary),
            "tokens_per_sample": self.eval_tokens_per_sample(cfg),
            "context_window": cfg.evaluate.context_window,
            "sample_break_mode": EVAL_SAMPLE_BREAK_MODE,
        }

    def evaluate_split(self, cfg: RunConfig, data_dir: Path, checkpoint: Path, split: str) -> dict[str, float]:
        import torch

        from lmforge import fairseq_api

        result = fairseq_api.eval_lm(
            self.eval_args(cfg, str(data_dir), str(checkpoint), split=split, cuda=torch.cuda.is_available())
        )
        return {
            "loss_base2": result["loss"],
            "loss": result["loss"] * math.log(2),
            "perplexity": result["perplexity"],
            "tokens": result["tokens"],
            "tokens_per_second": result["tokens_per_second"],
            "seconds": result["seconds"],
        }

    def pyfunc(self) -> Pyfunc:
        from lmforge.models import scoring

        def check(model_pt: Path, dict_txt: Path, tokenizer_dir: Path) -> None:
            model = scoring.FairseqLanguageModel.from_files(model_pt, dict_txt, tokenizer_dir=tokenizer_dir)
            model.score_texts(list(scoring.EXAMPLE_TEXTS))

        return Pyfunc(
            python_model=scoring.FairseqLanguageModel(),
            signature=scoring.model_signature(),
            input_example=scoring.input_example(),
            check=check,
            summary=(
                "predict() takes raw texts (a list of str, or a DataFrame with the texts in its first column) "
                "and returns log_prob (natural log of the tokens, as fairseq's hub score() sums it), "
                "tokens (tokens scored), perplexity (null for an empty text), eos_log_prob (log p(</s> | text)), "
                "unk_tokens and unk_fraction (the words not in the dictionary, scored as <unk>); with the parameter "
                "continuation_tokens=N also a sampled continuation (temperature, top_k, seed). A value that is not "
                "a string, or a text longer than the model's context, is refused (status 400 from a model server)."
            ),
            imports=scoring.IMPORTS,
        )

    def evaluation_note(self, evaluation: dict[str, Any]) -> str:
        identity = evaluation["identity"]
        return (
            f"{identity.get('split')} perplexity {float(evaluation['perplexity']):.4g} "
            f"(fairseq-eval-lm, tokens_per_sample {identity.get('tokens_per_sample')}, "
            f"context_window {identity.get('context_window')}, identity {evaluation.get('identity_sha256', '')[:12]})."
        )


TASK = LanguageModeling()
