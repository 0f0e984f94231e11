"""The Training Operator's PyTorchJob CRD (release 1.9) as tests use it: what the API server would
refuse, and what it would silently prune.

The CRD is ../shared/schemas/kubeflow.org_pytorchjobs.v1.9.0.yaml (README.md beside it says where it
comes from); `needs_crd` skips a test where it is absent. `schema_problems` validates a manifest
against the CRD's structural schema (spec.versions[v1].schema.openAPIV3Schema) with jsonschema's
Draft7Validator: `format` is not checked and `x-kubernetes-*` keys are annotations, which
Draft7 ignores as unknown keywords. `pruned_fields` walks the manifest beside the schema as the
API server prunes: a key survives only where the schema node declares it in `properties`, or
has `additionalProperties` or `x-kubernetes-preserve-unknown-fields`; the root's `metadata` is an
ObjectMeta, checked against the kubernetes client's V1ObjectMeta fields.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import SHARED_SCHEMAS

CRD = SHARED_SCHEMAS / "kubeflow.org_pytorchjobs.v1.9.0.yaml"
README = SHARED_SCHEMAS / "README.md"

needs_crd = pytest.mark.skipif(
    not CRD.is_file(), reason=f"checks against the Training Operator's PyTorchJob CRD, which is not at {CRD}"
)


@functools.cache
def schema() -> dict[str, Any]:
    # libyaml's loader where present: the pure-Python one takes 1.7 s for the 600 kB CRD, this one 0.04 s
    crd = yaml.load(Path(CRD).read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return version["schema"]["openAPIV3Schema"]


@functools.cache
def _validator() -> Any:
    from jsonschema import Draft7Validator

    Draft7Validator.check_schema(schema())
    return Draft7Validator(schema())  # no format_checker: `format` is not asserted


def schema_problems(manifest: dict[str, Any]) -> list[str]:
    """What the API server's validation against the CRD would refuse, one line each."""
    return [f"{'.'.join(map(str, error.absolute_path)) or '<root>'}: {error.message}"
            for error in sorted(_validator().iter_errors(manifest), key=lambda e: list(map(str, e.absolute_path)))]


def _object_meta_fields() -> set[str]:
    from kubernetes.client import V1ObjectMeta

    return set(V1ObjectMeta.attribute_map.values())


def pruned_fields(manifest: dict[str, Any]) -> list[str]:
    """The paths of every field the API server would drop from `manifest` as unknown."""
    pruned = [f"metadata.{key}" for key in manifest.get("metadata", {}) if key not in _object_meta_fields()]
    body = {key: value for key, value in manifest.items() if key != "metadata"}
    return pruned + _walk(body, schema(), "")


def _walk(value: Any, node: dict[str, Any], path: str) -> list[str]:
    if isinstance(value, list):
        return [p for i, item in enumerate(value) for p in _walk(item, node.get("items", {}), f"{path}[{i}]")]
    if not isinstance(value, dict):
        return []
    properties, additional = node.get("properties", {}), node.get("additionalProperties")
    keeps_unknown = node.get("x-kubernetes-preserve-unknown-fields") is True or additional is True
    pruned = []
    for key, item in value.items():
        where = f"{path}.{key}" if path else key
        if key in properties:
            pruned += _walk(item, properties[key], where)
        elif isinstance(additional, dict):
            pruned += _walk(item, additional, where)
        elif not keeps_unknown:
            pruned.append(where)
    return pruned


def readme_admission_rules() -> list[str]:
    """The webhook's rules as README.md lists them (the clauses after 'cannot express:')."""
    text = " ".join(README.read_text().split())
    rules = text.split("rules the schema cannot express:", 1)[1].split(".", 1)[0]
    return [rule.strip() for rule in rules.split(";")]
