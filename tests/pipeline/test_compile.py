"""The checked-in YAML equals what the source compiles to, and carries each task's pod settings.

After changing a component or the pipeline, regenerate with `lmforge compile`
(or run this test with LMFORGE_REGENERATE=1).
"""

import json
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


def pipeline_docs(path):
    """The compiled pipeline: its spec, and the Kubernetes platform spec (kfp-kubernetes settings)."""
    docs = list(yaml.safe_load_all(path.read_text()))
    spec = docs[0]
    platform = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"] if len(docs) > 1 else {}
    return spec, platform


def test_pipeline_wires_every_step_in_order(compiled):
    out, _ = compiled
    spec, _ = pipeline_docs(out / PIPELINE_FILE)
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
    spec = pipeline_docs(out / PIPELINE_FILE)[0]
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
    for task in (tasks["download"], tasks["preprocess-plan"], tasks["preprocess-dictionary"], tasks["preprocess-merge"],
                 count, binarize):
        assert task["cachingOptions"] == {"enableCache": True}, task["taskInfo"]["name"]
    for name in ("configure", "train", "evaluate", "register"):
        assert tasks[name]["cachingOptions"] == {}, f"{name} is never served from cache"


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


# --------------------------------------------------------------------------- per-task settings

CLUSTER = {
    "node_selector": {"pool": "cpu-steps"},
    "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}],
    "pvc_name": "lmforge-data",
    "pvc_mount_path": "/mnt/lmforge",
    "cpu_request": {"default": "250m", "preprocess": "3"},
    "memory_request": {"default": "512Mi", "evaluate": "6Gi"},
    "shm_size": "1Gi",
    "retries": 4,
    "retry_backoff_seconds": 10,
}
PREPROCESS_STEPS = ("preprocess-plan", "preprocess-dictionary", "preprocess-merge")  # 'preprocess' in the config
SHARD_STEPS = ("preprocess-count", "preprocess-binarize")  # inside the ParallelFor loops
STORAGE_STEPS = ("download", *PREPROCESS_STEPS, *SHARD_STEPS, "train", "evaluate", "register")
MLFLOW_STEPS = ("configure", "train", "evaluate", "register")


@pytest.fixture(scope="module")
def cluster_compiled(tmp_path_factory):
    from lmforge import cli

    out = tmp_path_factory.mktemp("cluster")
    config_file = out / "cluster.yaml"
    config_file.write_text(yaml.safe_dump({"name": "c1", "corpus": {"source": "s3://corpora/wiki"},
                                           "storage": {"root": "/mnt/lmforge/runs"}, "cluster": CLUSTER}))
    assert cli.main(["compile", "--config", str(config_file), "--out-dir", str(out)]) == 0
    return out, pipeline_docs(out / PIPELINE_FILE)


def secret_envs(executor):
    return {(s["secretName"], k["secretKey"], k["envVar"], s["optional"]) for s in executor.get("secretAsEnv", [])
            for k in s["keyToEnv"]}


def test_the_compiled_config_is_the_run_forms_default(cluster_compiled):
    out, (spec, _) = cluster_compiled
    parameters = spec["root"]["inputDefinitions"]["parameters"]
    cfg = json.loads(parameters["config_json"]["defaultValue"])
    assert cfg["name"] == "c1" and cfg["cluster"]["pvc_name"] == "lmforge-data"


def test_resources_node_selector_and_tolerations_on_every_step(cluster_compiled):
    _, (spec, platform) = cluster_compiled
    executors = spec["deploymentSpec"]["executors"]
    for step in ("configure", *STORAGE_STEPS):
        resources = executors[f"exec-{step}"]["container"]["resources"]
        assert resources["resourceCpuRequest"] == ("3" if step in PREPROCESS_STEPS else "250m"), step
        assert resources["resourceMemoryRequest"] == ("6Gi" if step == "evaluate" else "512Mi"), step
        k8s = platform[f"exec-{step}"]
        assert k8s["nodeSelector"] == {"labels": {"pool": "cpu-steps"}}, step
        assert k8s["tolerations"] == [CLUSTER["tolerations"][0]], step


def test_credentials_come_from_secrets(cluster_compiled):
    _, (_, platform) = cluster_compiled
    for step in STORAGE_STEPS:
        envs = secret_envs(platform[f"exec-{step}"])
        assert {("lmforge-s3", "AWS_ACCESS_KEY_ID", "AWS_ACCESS_KEY_ID", False),
                ("lmforge-s3", "AWS_SECRET_ACCESS_KEY", "AWS_SECRET_ACCESS_KEY", False),
                ("lmforge-s3", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL", True)} <= envs, step
    for step in MLFLOW_STEPS:
        envs = secret_envs(platform[f"exec-{step}"])
        assert ("lmforge-mlflow", "MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_URI", True) in envs, step
        assert ("lmforge-mlflow", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_PASSWORD", True) in envs, step
    assert not any(s == "lmforge-s3" for s, *_ in secret_envs(platform["exec-configure"])), "configure needs no S3"


def test_shared_memory_for_pytorch_steps_and_the_pvc_for_storage_steps(cluster_compiled):
    _, (_, platform) = cluster_compiled
    for step in ("train", "evaluate"):
        assert platform[f"exec-{step}"]["emptyDirMounts"] == [
            {"medium": "Memory", "mountPath": "/dev/shm", "sizeLimit": "1Gi", "volumeName": "dshm"}
        ], step
    for step in ("configure", "download", *PREPROCESS_STEPS, *SHARD_STEPS, "register"):
        assert "emptyDirMounts" not in platform[f"exec-{step}"], step
    for step in STORAGE_STEPS:
        (mount,) = platform[f"exec-{step}"]["pvcMount"]
        assert mount["mountPath"] == "/mnt/lmforge"
        assert mount["pvcNameParameter"]["runtimeValue"]["constant"] == "lmforge-data"
    assert "pvcMount" not in platform["exec-configure"]


def test_retries_with_backoff_on_network_steps(cluster_compiled):
    _, (spec, _) = cluster_compiled
    tasks = dict(spec["root"]["dag"]["tasks"])
    for loop in [t for t in tasks.values() if "parameterIterator" in t]:
        tasks.update(spec["components"][loop["componentRef"]["name"]]["dag"]["tasks"])
    for step in STORAGE_STEPS:
        assert tasks[step]["retryPolicy"] == {
            "maxRetryCount": 4, "backoffDuration": "10s", "backoffFactor": 2.0, "backoffMaxDuration": "3600s",
        }, step
    assert "retryPolicy" not in tasks["configure"], "a config mistake does not heal on a retry"


def test_the_local_runners_pipeline_has_no_pod_settings():
    """kfp.local would honour retries (with their back-off) on a user's mistake, and warns about resources."""
    from lmforge.pipeline.definition import lmforge_pipeline

    spec = lmforge_pipeline.pipeline_spec
    assert not lmforge_pipeline.platform_spec.platforms
    for name, task in spec.root.dag.tasks.items():
        assert not task.HasField("retry_policy"), name
    for name, executor in spec.deployment_spec["executors"].items():
        assert "resources" not in executor["container"], name


def test_compiled_yaml_has_no_secret_value(compiled, tmp_path, monkeypatch):
    """Credentials in the compiling process's environment never reach the YAML; every credential a pod
    gets is a Secret reference."""
    fake = {"AWS_ACCESS_KEY_ID": "AKIAFAKEFAKEFAKEFAKE", "AWS_SECRET_ACCESS_KEY": "s3cr3t-value-x",
            "MLFLOW_TRACKING_PASSWORD": "mlflow-pass-y", "MLFLOW_TRACKING_URI": "http://u:pw-z@mlflow:5000"}
    for key, value in fake.items():
        monkeypatch.setenv(key, value)
    paths = compile_all(tmp_path)
    credential = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY")
    for path in paths:
        text = path.read_text()
        for value in fake.values():
            assert value not in text, f"{path.name} holds a credential from the environment"
        assert not re.search(r"AKIA[0-9A-Z]{16}", text)
        docs = list(yaml.safe_load_all(text))
        for executor in docs[0].get("deploymentSpec", {}).get("executors", {}).values():
            for env in executor["container"].get("env", []):
                assert not credential.search(env["name"]), f"{path.name}: {env['name']} as a plain value"


def test_image_registry_moves_every_image(tmp_path):
    from lmforge import config as config_mod
    from lmforge.pipeline.compile import compile_pipeline
    from lmforge.images import STEPS_IMAGE

    cfg = config_mod.load(config_mod.shipped_config_path("tiny"), ["cluster.image_registry=registry.local:5000/ml"])
    spec, _ = pipeline_docs(compile_pipeline(cfg, tmp_path / "p.yaml"))
    images = {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values()}
    assert images == {"registry.local:5000/ml/lmforge-steps:" + STEPS_IMAGE.rsplit(":", 1)[1]}
