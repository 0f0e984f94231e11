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

from lmforge.pipeline import components
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
    assert PIPELINE_FILE in paths and len(paths) == 1 + len(components.ALL)
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
    # ParallelFor tasks are named for-loop-N; their display names say which fan-out they are.
    loop = {t["taskInfo"]["name"]: key for key, t in tasks.items() if "parameterIterator" in t}
    assert set(loop) == {"count-shards", "binarize-shards"}
    assert set(tasks) == {
        "configure", "download", "preprocess-plan", "preprocess-dictionary", "preprocess-merge", "train",
        "evaluate", "register", *loop.values(),
    }
    assert tasks["download"]["dependentTasks"] == ["configure"]
    assert set(tasks["preprocess-plan"]["dependentTasks"]) == {"configure", "download"}
    # map 1 fans out over the plan's shards, the reduce collects it, map 2 fans out over the reduce's
    # output, the merge collects map 2
    count_loop, binarize_loop = tasks[loop["count-shards"]], tasks[loop["binarize-shards"]]
    assert count_loop["parameterIterator"]["items"]["inputParameter"].endswith("preprocess-plan-Output")
    assert set(tasks["preprocess-dictionary"]["dependentTasks"]) == {"configure", loop["count-shards"]}
    assert binarize_loop["parameterIterator"]["items"]["inputParameter"].endswith("preprocess-dictionary-Output")
    assert set(tasks["preprocess-merge"]["dependentTasks"]) == {"configure", "download", loop["binarize-shards"]}
    assert set(spec["components"][count_loop["componentRef"]["name"]]["dag"]["tasks"]) == {"preprocess-count"}
    assert set(spec["components"][binarize_loop["componentRef"]["name"]]["dag"]["tasks"]) == {"preprocess-binarize"}
    assert set(tasks["train"]["dependentTasks"]) == {"configure", "download", "preprocess-merge"}
    assert set(tasks["register"]["dependentTasks"]) == {
        "configure", "download", "preprocess-merge", "train", "evaluate"}
    # training and registration must never be served from cache
    assert tasks["train"]["cachingOptions"] == {}
    assert tasks["register"]["cachingOptions"] == {}
    assert "config_json" in spec["root"]["inputDefinitions"]["parameters"]


def test_data_stages_take_only_content_inputs(compiled):
    """KFP's cache keys on a task's inputs: a data stage that took the pipeline run id or the whole
    config would never hit, or would re-run when only the training length changed."""
    out, _ = compiled
    spec = yaml.safe_load((out / PIPELINE_FILE).read_text())
    tasks = spec["root"]["dag"]["tasks"]
    assert set(tasks["download"]["inputs"]["parameters"]) == {"download_json"}
    assert set(tasks["preprocess-plan"]["inputs"]["parameters"]) == {"preprocess_json", "corpus_dir", "corpus_sha256"}
    assert set(tasks["preprocess-dictionary"]["inputs"]["parameters"]) == {"preprocess_json", "counts"}
    assert set(tasks["preprocess-merge"]["inputs"]["parameters"]) == {"preprocess_json", "corpus_sha256", "parts"}
    loops = {t["taskInfo"]["name"]: spec["components"][t["componentRef"]["name"]]["dag"]["tasks"]
             for t in tasks.values() if "parameterIterator" in t}
    count, binarize = loops["count-shards"]["preprocess-count"], loops["binarize-shards"]["preprocess-binarize"]
    # inside a loop, only the shard descriptor (which carries the preprocess settings and the corpus)
    assert set(count["inputs"]["parameters"]) == {"shard"}
    assert set(binarize["inputs"]["parameters"]) == {"shard"}
    for name in ("download", "preprocess-plan", "preprocess-dictionary", "preprocess-merge"):
        assert "cachingOptions" not in tasks[name] or tasks[name]["cachingOptions"].get("enableCache", True)


def test_compiled_yaml_has_no_machine_paths(compiled):
    out, paths = compiled
    for rel in paths:
        text = (out / rel).read_text()
        assert not re.search(r"/(work|root|home|tmp)/", text), f"{rel} embeds a path of this machine"


@pytest.mark.parametrize("component", components.ALL, ids=lambda c: c.name)
def test_each_component_loads_on_its_own(compiled, component):
    out, _ = compiled
    loaded = kfp_components.load_component_from_file(str(out / COMPONENTS_DIR / f"{component.name.replace('-', '_')}.yaml"))
    assert loaded.name == component.name
    assert set(loaded.component_spec.inputs) == set(component.component_spec.inputs)
