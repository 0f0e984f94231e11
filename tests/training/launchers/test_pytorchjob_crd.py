"""Every PyTorchJob the launcher renders, against the Training Operator's own rules (release 1.9):
the CRD's structural schema (what the API server refuses), the fields it would prune as unknown
(what it drops without a word) and the admission webhook's rules as ../shared/schemas/README.md
lists them, which `pytorchjob.admission_problems` implements (tests/pytorchjob_crd.py reads the
CRD). The jobs: `render` across 1, 2 and 4 nodes, 1 and 8 processes per node, GPU and CPU pods,
bare or pinned (node selector, tolerations, Secrets, a ServiceAccount, a shared volume).
k8s/pytorchjob.yaml gets the same checks in tests/test_k8s.py; what `launch` submits is `render`'s
output (tests/training/launchers/test_pytorchjob.py).
"""

from __future__ import annotations

import copy
import itertools
from typing import Any

import pytest

from conftest import TINY_CONFIG
from lmforge import config
from lmforge.training.launchers import pytorchjob
from pytorchjob_crd import README, needs_crd, pruned_fields, readme_admission_rules, schema_problems

ARGS = ["--config", "s3://b/run/checkpoints/run-config.json", "--data", "s3://b/data-bin", "--save-dir",
        "s3://b/run/checkpoints", "--mlflow-run-id", "abc"]
KFP_RUN = "3f2b8e1c-5d4a-4c1e-9b7a-2e6f0d8c1a55"

PLACEMENTS = {
    "bare": ["train.pytorchjob.node_selector={}", "train.pytorchjob.tolerations=[]", "cluster.s3_secret=",
             "cluster.mlflow_secret=", "cluster.service_account="],
    "pinned": ["train.pytorchjob.node_selector={nvidia.com/gpu.product: NVIDIA-H100-80GB-HBM3, pool: train}",
               "train.pytorchjob.tolerations=[{key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}, "
               "{key: dedicated, operator: Equal, value: ml, effect: NoExecute, tolerationSeconds: 60}]",
               "cluster.s3_secret=lmforge-s3", "cluster.mlflow_secret=lmforge-mlflow",
               "cluster.service_account=lmforge-trainer", "cluster.pvc_name=lmforge-data"],
}
VARIANTS = list(itertools.product([1, 2, 4], [1, 8], ["gpu", "cpu"], PLACEMENTS))


def rendered(nnodes: int, nproc: int, pods: str, placement: str) -> dict[str, Any]:
    cfg = config.load(TINY_CONFIG, [
        "train.launcher=pytorchjob", f"train.nnodes={nnodes}", f"train.nproc={nproc}",
        f"train.pytorchjob.gpus_per_node={'null' if pods == 'gpu' else 0}", *PLACEMENTS[placement],
    ])
    return pytorchjob.render(cfg, ARGS, pytorchjob.job_name(KFP_RUN), run=KFP_RUN)


@needs_crd
@pytest.mark.parametrize(("nnodes", "nproc", "pods", "placement"), VARIANTS,
                         ids=[f"{n}x{p}-{g}-{s}" for n, p, g, s in VARIANTS])
def test_every_rendered_job_is_valid_for_the_operator_and_nothing_in_it_is_pruned(nnodes, nproc, pods, placement):
    job = rendered(nnodes, nproc, pods, placement)
    assert schema_problems(job) == []
    assert pruned_fields(job) == []
    assert pytorchjob.admission_problems(job) == []
    # the variant is what was rendered: the matrix spans what its ids say
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert sum(r["replicas"] for r in replicas.values()) == nnodes and set(replicas) == (
        {"Master"} if nnodes == 1 else {"Master", "Worker"})
    assert job["spec"]["nprocPerNode"] == str(nproc)
    pod = replicas["Master"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"].get("nvidia.com/gpu") == (nproc if pods == "gpu" else None)
    pinned = placement == "pinned"
    assert ("nodeSelector" in pod, "tolerations" in pod, "envFrom" in container, "serviceAccountName" in pod) == (
        pinned, pinned, pinned, pinned)
    assert any("persistentVolumeClaim" in v for v in pod["volumes"]) == pinned


@needs_crd
def test_the_checks_see_what_the_api_server_would_refuse_or_drop():
    """The schema check and the prune walk bite: a wrong type is refused, a typo'd field pruned; free-form
    maps (labels, annotations, resource limits, node selectors) keep every key."""
    good = rendered(2, 8, "gpu", "pinned")
    master = lambda job: job["spec"]["pytorchReplicaSpecs"]["Master"]  # noqa: E731
    container = lambda job: master(job)["template"]["spec"]["containers"][0]  # noqa: E731

    def checked(mutate) -> tuple[list[str], list[str]]:
        job = copy.deepcopy(good)
        mutate(job)
        return schema_problems(job), pruned_fields(job)

    assert checked(lambda j: j["spec"].update(nprocPerNode=8))[0] == ["spec.nprocPerNode: 8 is not of type 'string'"]
    assert checked(lambda j: master(j).update(replicas="1"))[0] == [
        "spec.pytorchReplicaSpecs.Master.replicas: '1' is not of type 'integer'"]
    assert checked(lambda j: j["spec"]["runPolicy"].update(backofLimit=3)) == ([], ["spec.runPolicy.backofLimit"])
    assert checked(lambda j: container(j).update(imagePullSecret="x"))[1] == [
        "spec.pytorchReplicaSpecs.Master.template.spec.containers[0].imagePullSecret"]
    assert checked(lambda j: master(j)["template"]["metadata"].update(generateName="x-"))[1] == [
        "spec.pytorchReplicaSpecs.Master.template.metadata.generateName"]
    assert checked(lambda j: j["metadata"].update(annotation={"a": "b"}))[1] == ["metadata.annotation"]
    assert checked(lambda j: j.update(status={"conditions": []}))[1] == []
    assert checked(lambda j: (
        j["metadata"]["annotations"].update({"any.example/key": "v"}),
        container(j)["resources"]["limits"].update({"example.com/fpga": 1}),
        master(j)["template"]["spec"]["nodeSelector"].update({"zone": "a"}),
    )) == ([], [])


# ------------------------------------------------------------------ the admission webhook's rules

def _replicas(job):
    return job["spec"]["pytorchReplicaSpecs"]


def _containers(job, role):
    return _replicas(job)[role]["template"]["spec"]["containers"]


#: README.md's rules (its wording, the keys), each with mutations of a rendered 2-node job and the
#: problem they must raise, or None where the operator admits the result.
RULES: dict[str, list[tuple[str, Any, str | None]]] = {
    "a DNS-1035 job name of at most 63 characters": [
        ("uppercase and underscore", lambda j: j["metadata"].update(name="Run_1"), "DNS-1035"),
        ("starts with a digit", lambda j: j["metadata"].update(name="1-run"), "DNS-1035"),
        ("64 characters", lambda j: j["metadata"].update(name="a" * 64), "DNS-1035"),
        ("63 characters", lambda j: j["metadata"].update(name="a" * 63), None),
    ],
    "only `Master` and `Worker` replica types": [
        ("a Chief", lambda j: _replicas(j).update(Chief=copy.deepcopy(_replicas(j)["Worker"])), "only Master and Worker"),
    ],
    "at least one container per replica, each with an image, one of them named `pytorch`": [
        ("no container", lambda j: _containers(j, "Worker").clear(), "at least one container"),
        ("no image", lambda j: _containers(j, "Master")[0].pop("image"), "has no image"),
        ("a sidecar without an image", lambda j: _containers(j, "Master").append({"name": "side"}), "has no image"),
        ("renamed", lambda j: _containers(j, "Worker")[0].update(name="trainer"), "no container named 'pytorch'"),
        ("a sidecar", lambda j: _containers(j, "Master").append({"name": "side", "image": "busybox:1.36"}), None),
    ],
    "`Master` replicas set, to exactly 1": [
        ("two", lambda j: _replicas(j)["Master"].update(replicas=2), "Master.replicas: must be set, to exactly 1"),
        ("zero", lambda j: _replicas(j)["Master"].update(replicas=0), "Master.replicas: must be set, to exactly 1"),
        ("unset", lambda j: _replicas(j)["Master"].pop("replicas"), "Master.replicas: must be set, to exactly 1"),
        ("no Master: Workers only", lambda j: _replicas(j).pop("Master"), None),
    ],
    "`Worker` replicas at least 1": [
        ("zero", lambda j: _replicas(j)["Worker"].update(replicas=0), "Worker.replicas: must be at least 1"),
        ("unset (the operator's default is 1)", lambda j: _replicas(j)["Worker"].pop("replicas"), None),
    ],
    "an elastic policy needs a Worker and excludes `nprocPerNode`": [
        ("without a Worker", lambda j: (_replicas(j).pop("Worker"), j["spec"].update(elasticPolicy={})),
         "Worker: required with an elasticPolicy"),
        ("its nProcPerNode with spec.nprocPerNode", lambda j: j["spec"].update(elasticPolicy={"nProcPerNode": 2}),
         "elasticPolicy.nProcPerNode: not with spec.nprocPerNode"),
        ("its nProcPerNode alone", lambda j: (j["spec"].pop("nprocPerNode"),
                                              j["spec"].update(elasticPolicy={"nProcPerNode": 2})), None),
        ("with a Worker and spec.nprocPerNode", lambda j: j["spec"].update(
            elasticPolicy={"minReplicas": 1, "maxReplicas": 3, "rdzvBackend": "c10d"}), None),
    ],
}
CASES = [(rule, name, mutate, expected) for rule, cases in RULES.items() for name, mutate, expected in cases]


@pytest.mark.skipif(not README.is_file(), reason=f"the webhook's rules are listed in {README}, which is absent")
def test_every_admission_rule_the_readme_lists_is_tested():
    assert readme_admission_rules() == list(RULES)


@pytest.mark.parametrize(("rule", "name", "mutate", "expected"), CASES, ids=[f"{r[:24]}: {n}" for r, n, _, _ in CASES])
def test_admission_rule(rule, name, mutate, expected):
    job = copy.deepcopy(pytorchjob.render(config.load(TINY_CONFIG, ["train.launcher=pytorchjob", "train.nnodes=2"]),
                                          ARGS, "lmforge-x"))
    assert pytorchjob.admission_problems(job) == []
    mutate(job)
    problems = pytorchjob.admission_problems(job)
    if expected is None:
        assert problems == [], f"{rule} / {name}: the operator admits this"
    else:
        assert any(expected in problem for problem in problems), (rule, name, problems)
