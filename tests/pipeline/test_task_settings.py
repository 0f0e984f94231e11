"""lmforge.pipeline.task_settings on real KFP tasks: each function applied to a one-task pipeline,
compiled by KFP's compiler, and read back from the pipeline spec and its Kubernetes platform spec.

    PYTHONPATH=src .venv/bin/python -m pytest tests/pipeline/test_task_settings.py
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from kfp import compiler, dsl

from lmforge.config import ClusterConfig
from lmforge.pipeline import task_settings as ts

CLUSTER = ClusterConfig(
    cpu_request={"default": "250m", "evaluate": "3"},
    memory_request={"default": "512Mi", "evaluate": "6Gi"},
    node_selector={"pool": "cpu-steps", "topology.kubernetes.io/zone": "eu-1a"},
    tolerations=[{"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"},
                 {"key": "spot", "operator": "Exists", "effect": "NoExecute"}],
    s3_secret="team-s3",
    mlflow_secret="team-mlflow",
    pvc_name="team-data",
    pvc_mount_path="/mnt/team",
    shm_size="3Gi",
    retries=5,
    retry_backoff_seconds=7,
)


@dsl.container_component
def step():
    return dsl.ContainerSpec(image="busybox:1.36", command=["true"])


@pytest.fixture
def compile_one(tmp_path: Path) -> Callable:
    """apply -> (task, executor, Kubernetes settings) of a pipeline whose one task `apply` configured."""

    def compile_one(apply: Callable[[dsl.PipelineTask], object]) -> tuple[dict, dict, dict]:
        @dsl.pipeline(name="one-task")
        def one_task():
            apply(step())

        path = tmp_path / "pipeline.yaml"
        compiler.Compiler().compile(one_task, str(path))
        docs = list(yaml.safe_load_all(path.read_text()))
        spec = docs[0]
        platform = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"] if len(docs) > 1 else {}
        return spec["root"]["dag"]["tasks"]["step"], spec["deploymentSpec"]["executors"]["exec-step"], platform.get(
            "exec-step", {})

    return compile_one


def secret_envs(k8s: dict) -> set[tuple[str, str, str, bool]]:
    return {(s["secretName"], k["secretKey"], k["envVar"], s["optional"]) for s in k8s.get("secretAsEnv", [])
            for k in s["keyToEnv"]}


def test_a_plain_task_has_no_pod_settings_and_is_cached(compile_one):
    """The baseline the other tests differ from: KFP's defaults."""
    task, executor, k8s = compile_one(lambda t: t)
    assert task["cachingOptions"] == {"enableCache": True}
    assert "resources" not in executor["container"] and "retryPolicy" not in task and k8s == {}


def test_step_pod_requests_the_steps_resources_or_the_default(compile_one):
    _, executor, k8s = compile_one(lambda t: ts.step_pod(t, CLUSTER, "evaluate"))
    assert executor["container"]["resources"] == {"resourceCpuRequest": "3", "cpuRequest": 3.0,
                                                  "resourceMemoryRequest": "6Gi", "memoryRequest": 6.442450944}
    assert k8s["nodeSelector"] == {"labels": {"pool": "cpu-steps", "topology.kubernetes.io/zone": "eu-1a"}}
    assert k8s["tolerations"] == CLUSTER.tolerations
    _, executor, _ = compile_one(lambda t: ts.step_pod(t, CLUSTER, "download"))  # not listed: 'default'
    resources = executor["container"]["resources"]
    assert (resources["resourceCpuRequest"], resources["resourceMemoryRequest"]) == ("250m", "512Mi")


def test_toleration_seconds_reach_the_pod(compile_one):
    evicting = replace(CLUSTER, tolerations=[{"key": "spot", "operator": "Exists", "effect": "NoExecute",
                                              "tolerationSeconds": 60}])
    _, _, k8s = compile_one(lambda t: ts.step_pod(t, evicting, "download"))
    (toleration,) = k8s["tolerations"]
    assert toleration.get("tolerationSeconds") in (60, "60"), toleration  # int64: a string in protobuf's JSON


def test_step_pod_without_a_default_leaves_unlisted_steps_unrequested(compile_one):
    bare = replace(CLUSTER, cpu_request={"evaluate": "3"}, memory_request={}, node_selector={}, tolerations=[])
    _, executor, k8s = compile_one(lambda t: ts.step_pod(t, bare, "download"))
    assert "resources" not in executor["container"] and k8s == {}
    _, executor, _ = compile_one(lambda t: ts.step_pod(t, bare, "evaluate"))
    assert executor["container"]["resources"] == {"resourceCpuRequest": "3", "cpuRequest": 3.0}


def test_data_stages_are_cached_and_get_their_pod(compile_one):
    task, executor, k8s = compile_one(lambda t: ts.data_stage(t.set_caching_options(False), CLUSTER, "evaluate"))
    assert task["cachingOptions"] == {"enableCache": True}
    assert executor["container"]["resources"]["resourceCpuRequest"] == "3"
    assert k8s["nodeSelector"]["labels"]["pool"] == "cpu-steps"


def test_never_cached_turns_the_cache_off_and_gets_its_pod(compile_one):
    task, executor, k8s = compile_one(lambda t: ts.never_cached(t, CLUSTER, "train"))
    assert task["cachingOptions"] == {}  # KFP writes enableCache: false as an empty message
    assert executor["container"]["resources"]["resourceMemoryRequest"] == "512Mi"
    assert k8s["tolerations"] == CLUSTER.tolerations


def test_storage_steps_get_s3_credentials_from_the_secret_and_the_pvc(compile_one):
    _, executor, k8s = compile_one(lambda t: ts.uses_storage(t, CLUSTER))
    assert secret_envs(k8s) == {("team-s3", "AWS_ACCESS_KEY_ID", "AWS_ACCESS_KEY_ID", False),
                                ("team-s3", "AWS_SECRET_ACCESS_KEY", "AWS_SECRET_ACCESS_KEY", False),
                                ("team-s3", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL", True)}
    (mount,) = k8s["pvcMount"]
    assert mount["mountPath"] == "/mnt/team" and mount["pvcNameParameter"]["runtimeValue"]["constant"] == "team-data"
    assert "env" not in executor["container"], "credentials are Secret references, never values"


def test_storage_without_secret_or_pvc_adds_nothing(compile_one):
    _, _, k8s = compile_one(lambda t: ts.uses_storage(t, replace(CLUSTER, s3_secret="", pvc_name="")))
    assert k8s == {}
    _, _, k8s = compile_one(lambda t: ts.uses_storage(t, replace(CLUSTER, s3_secret="")))
    assert "secretAsEnv" not in k8s and k8s["pvcMount"][0]["mountPath"] == "/mnt/team"


def test_mlflow_steps_get_every_key_of_the_secret_as_optional(compile_one):
    _, _, k8s = compile_one(lambda t: ts.uses_mlflow(t, CLUSTER))
    assert secret_envs(k8s) == {("team-mlflow", key, key, True) for key in ts.MLFLOW_OPTIONAL_KEYS}
    assert "MLFLOW_TRACKING_URI" in ts.MLFLOW_OPTIONAL_KEYS
    _, _, k8s = compile_one(lambda t: ts.uses_mlflow(t, replace(CLUSTER, mlflow_secret="")))
    assert k8s == {}


def test_network_steps_retry_with_exponential_backoff(compile_one):
    task, _, _ = compile_one(lambda t: ts.network_step(t, CLUSTER))
    assert task["retryPolicy"] == {"maxRetryCount": 5, "backoffDuration": "7s", "backoffFactor": 2.0,
                                   "backoffMaxDuration": "3600s"}
    task, _, _ = compile_one(lambda t: ts.network_step(t, replace(CLUSTER, retries=0)))
    assert "retryPolicy" not in task


def test_torch_steps_get_an_in_memory_dev_shm(compile_one):
    _, _, k8s = compile_one(lambda t: ts.torch_step(t, CLUSTER))
    assert k8s["emptyDirMounts"] == [{"volumeName": "dshm", "mountPath": "/dev/shm", "medium": "Memory",
                                      "sizeLimit": "3Gi"}]


@pytest.mark.parametrize("apply", [
    lambda t: ts.step_pod(t, None, "evaluate"), lambda t: ts.uses_storage(t, None), lambda t: ts.uses_mlflow(t, None),
    lambda t: ts.network_step(t, None), lambda t: ts.torch_step(t, None),
], ids=["step_pod", "uses_storage", "uses_mlflow", "network_step", "torch_step"])
def test_the_local_runner_gets_no_pod_settings(compile_one, apply):
    task, executor, k8s = compile_one(apply)
    assert "resources" not in executor["container"] and "retryPolicy" not in task and k8s == {}


def test_the_local_runner_still_gets_the_caching_choice(compile_one):
    assert compile_one(lambda t: ts.never_cached(t, None, "train"))[0]["cachingOptions"] == {}
    assert compile_one(lambda t: ts.data_stage(t.set_caching_options(False), None, "download"))[0][
        "cachingOptions"] == {"enableCache": True}


def test_compiling_for_sets_the_cluster_the_pipeline_sees_and_restores_it():
    assert ts.cluster() is None
    with ts.compiling_for(CLUSTER):
        assert ts.cluster() is CLUSTER
        with ts.compiling_for(None):
            assert ts.cluster() is None
        assert ts.cluster() is CLUSTER
    assert ts.cluster() is None
