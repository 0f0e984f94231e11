"""lmforge.tasks: the registry of training tasks, and the config field that names one."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import TINY_CONFIG as TINY
from lmforge import config, tasks
from lmforge.errors import LmforgeError
from lmforge.tasks.base import Task


def test_every_known_name_gives_its_task():
    assert tasks.NAMES == ("language_modeling",) and tasks.DEFAULT in tasks.NAMES
    for name in tasks.NAMES:
        task = tasks.get(name)
        assert isinstance(task, Task) and task.name == name


def test_an_unknown_name_is_a_one_line_error_listing_the_known_ones():
    with pytest.raises(LmforgeError, match=r"task: 'masked_lm' is not a known task \(known: language_modeling\)"):
        tasks.get("masked_lm")


def test_the_config_names_the_task_and_validation_refuses_an_unknown_one():
    assert config.load(TINY).task == "language_modeling"
    with pytest.raises(LmforgeError) as err:
        config.load(TINY, ["task=sentence_prediction"])
    assert "task: 'sentence_prediction' is not a known task (known: language_modeling)" in str(err.value)
    assert any(name == "task" for name, _, _ in config.field_docs())


def test_importing_config_and_the_registry_loads_no_task():
    code = ("import sys, lmforge.config, lmforge.tasks; "
            "print(sorted(m for m in sys.modules if m.startswith('lmforge.tasks.')))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
