"""What a training task decides, as one interface (`Task`) every task module implements.

In: the run config, a data-bin directory (its file names, its files), a checkpoint.
Out: the task's answers: which files a data-bin holds, fairseq's --task and the
task-specific fairseq-train arguments, the default criterion, the evaluation of one split
and its identity, the metric the promotion gate compares and which way is better, and the
MLflow pyfunc a registered model is. Nothing here runs by itself; `lmforge.tasks.get(name)`
hands out a task and the generic code (fairseq_api.arguments, training.train,
models.evaluate, models.register, models.promotion, steps) calls it.

Tasks import only config types and io at module level: fairseq, torch and mlflow are
imported inside the methods that run them, so the argument builders stay pure and cheap.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lmforge.config import RunConfig


@dataclass(frozen=True)
class GateMetric:
    """The number the promotion gate compares, the version tag that holds it, and its direction."""

    name: str  # key in the evaluation result, e.g. "perplexity"
    tag: str  # registered version's tag holding it, e.g. "eval_perplexity"
    lower_is_better: bool

    def beats(self, ours: float, theirs: float) -> bool:
        """Strictly better; NaN compares False either way, so it is never promoted."""
        return ours < theirs if self.lower_is_better else ours > theirs


@dataclass(frozen=True)
class Pyfunc:
    """What a registered model of the task is, for `lmforge.models.register`."""

    python_model: Any  # the mlflow.pyfunc.PythonModel instance pickled into the model (no weights)
    signature: Any  # mlflow ModelSignature
    input_example: Any
    #: Loads (checkpoint, dict.txt, tokenizer dir) as the serving process will and predicts the
    #: input example: a checkpoint/dictionary mismatch raises here, not when serving.
    check: Callable[[Path, Path, Path], None]
    #: One sentence on what predict() takes and returns (model descriptions).
    summary: str
    #: The top-level packages the pyfunc imports; the model's requirements are their closure.
    imports: tuple[str, ...]


class Task(abc.ABC):
    """One training task. Subclasses set the class attributes and implement the methods."""

    #: The config's name for it (`task:`).
    name: str
    #: What a model of the task is called in descriptions, e.g. "language model".
    title: str
    #: fairseq's --task.
    fairseq_task: str
    #: fairseq's --criterion when model.criterion is empty.
    default_criterion: str
    #: Numbers `evaluate_split` reports per split (MLflow and KFP metrics `eval_<split>_<name>`).
    metrics: tuple[str, ...]
    #: What the gate compares.
    gate_metric: GateMetric
    #: The dictionary's path inside a data-bin (the model's vocabulary; a registered model carries it).
    dictionary: str = "dict.txt"

    # ------------------------------------------------------------------ data layout

    @abc.abstractmethod
    def split_files(self, split: str) -> tuple[str, ...]:
        """The data-bin files (relative paths) holding one split."""

    def data_problems(self, where: str, names: Iterable[str], splits: Iterable[str]) -> list[str]:
        """What a data-bin whose files are `names` lacks for `splits`; empty when nothing.
        Pure: callers list the files (a directory or an S3 prefix)."""
        names = set(names)
        if self.dictionary not in names:
            return [f"{where} has no {self.dictionary} (a checkpoint without its dictionary cannot be trained "
                    "or scored); point --data-bin at the preprocess step's output"]
        problems = []
        for split in splits:
            files = self.split_files(split)
            if not set(files) <= names:
                problems.append(f"{where} has no {'/'.join(files)}; preprocess the {split} split")
        return problems

    # ------------------------------------------------------------------ fairseq

    def criterion(self, cfg: RunConfig) -> str:
        return cfg.model.criterion or self.default_criterion

    @abc.abstractmethod
    def train_args(self, cfg: RunConfig) -> list[str]:
        """fairseq-train's task arguments: --task and the task's own options (pure)."""

    # ------------------------------------------------------------------ evaluation

    @abc.abstractmethod
    def evaluation_identity(self, cfg: RunConfig, data_dir: Path) -> dict[str, Any]:
        """What the gate metric depends on besides the model: scorer, text scored, settings.
        Two results are comparable only when their identities are equal."""

    @abc.abstractmethod
    def evaluate_split(self, cfg: RunConfig, data_dir: Path, checkpoint: Path, split: str) -> dict[str, float]:
        """The `metrics` (and "seconds") of `checkpoint` on one split of a local data-bin."""

    # ------------------------------------------------------------------ registry

    @abc.abstractmethod
    def pyfunc(self) -> Pyfunc:
        """The registered model's pyfunc, signature, example and load check."""

    @abc.abstractmethod
    def evaluation_note(self, evaluation: dict[str, Any]) -> str:
        """One sentence for a version's description: the gate metric and how it was measured."""
