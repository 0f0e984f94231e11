"""Training tasks: one module per task, each the one home of what changes with the task.

In: a task name (the run config's top-level `task`). Out: the task object
(`lmforge.tasks.base.Task`): its data layout, fairseq's --task with its arguments and
default criterion, the evaluation and its gate metric, and the registered pyfunc. The
generic code (fairseq_api.arguments, training, models, steps) asks it and never tests a
task's name.

    from lmforge import tasks
    task = tasks.get(cfg.task)      # `lmforge run --set task=language_modeling`

This module imports nothing: config validation reads `NAMES` without loading any task.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lmforge.tasks.base import Task

#: Task name -> the module holding it (its `TASK`). masked_lm and sentence_prediction come next.
_MODULES = {
    "language_modeling": "lmforge.tasks.language_modeling",
}
NAMES = tuple(_MODULES)
DEFAULT = "language_modeling"


def get(name: str) -> Task:
    """The task called `name`; an unknown name is a one-line error listing the known ones."""
    from lmforge.errors import LmforgeError

    if name not in _MODULES:
        raise LmforgeError(f"task: {name!r} is not a known task (known: {', '.join(NAMES)})")
    return importlib.import_module(_MODULES[name]).TASK


__all__ = ["DEFAULT", "NAMES", "get"]
