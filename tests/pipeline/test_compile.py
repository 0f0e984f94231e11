"""The checked-in YAML equals what the source compiles to.

After changing a component or the pipeline, regenerate with `lmforge compile`
(or run this test with LMFORGE_REGENERATE=1).
"""

import os
import re
from pathlib import Path

import pytest
import yaml
from kfp import components as kfp_components

from lmforge.pipeline.compile import COMPONENTS_DIR, PIPELINE_FILE, compile_all

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    out = tmp_path_factory.mktemp("compiled")
    paths = compile_all(out)
    if os.environ.get("LMFORGE_REGENERATE"):
        compile_all(REPO)
    return out, [p.relative_to(out) for p in paths]


def test_checked_in_yaml_is_up_to_date(compiled):
    out, paths = compiled
    assert PIPELINE_FILE in paths and len(paths) == 6
    for rel in paths:
        checked_in = REPO / rel
        assert checked_in.is_file(), f"{rel} is missing: run `lmforge compile`"
        assert checked_in.read_text() == (out / rel).read_text(), f"{rel} is stale: run `lmforge compile`"
    stray = {p.name for p in (REPO / COMPONENTS_DIR).glob("*.yaml")} - {p.name for p in paths}
    assert not stray, f"components/ holds files the source no longer compiles: {stray}"


def test_pipeline_wires_every_step_in_order(compiled):
    out, _ = compiled
    spec = yaml.safe_load((out / PIPELINE_FILE).read_text())
    tasks = spec["root"]["dag"]["tasks"]
    assert set(tasks) == {"download", "preprocess", "train", "evaluate", "register"}
    assert tasks["preprocess"]["dependentTasks"] == ["download"]
    assert tasks["train"]["dependentTasks"] == ["preprocess"]
    assert set(tasks["register"]["dependentTasks"]) == {"download", "preprocess", "train", "evaluate"}
    # training and registration must never be served from cache
    assert tasks["train"]["cachingOptions"] == {}
    assert tasks["register"]["cachingOptions"] == {}
    assert "config_json" in spec["root"]["inputDefinitions"]["parameters"]


def test_compiled_yaml_has_no_machine_paths(compiled):
    out, paths = compiled
    for rel in paths:
        text = (out / rel).read_text()
        assert not re.search(r"/(work|root|home|tmp)/", text), f"{rel} embeds a path of this machine"


@pytest.mark.parametrize("name", ["download", "preprocess", "train", "evaluate", "register"])
def test_each_component_loads_on_its_own(compiled, name):
    out, _ = compiled
    component = kfp_components.load_component_from_file(str(out / COMPONENTS_DIR / f"{name}.yaml"))
    assert component.name == name
    assert "config_json" in component.component_spec.inputs
