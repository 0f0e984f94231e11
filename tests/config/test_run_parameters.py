"""The pipeline's run-form parameters and the configure step that applies them.

The configure step is called as the pipeline's pod calls it (a plain function
call here); `KFP_POD_NAME` in the environment is what marks a pod of a cluster
run, set by Kubeflow Pipelines' driver in every step pod.

    .venv/bin/python -m pytest tests/config/test_run_parameters.py
"""

from __future__ import annotations

import inspect
import json

import pytest

from lmforge import config as config_mod
from lmforge.config import run_parameters
from lmforge import steps
from lmforge.errors import ConfigError
from lmforge.pipeline import components
from lmforge.pipeline.definition import pipeline_func


def default_data() -> dict:
    return config_mod.default_config().to_dict()


def test_empty_and_zero_mean_as_in_config_json() -> None:
    data = default_data()
    assert run_parameters.apply(data, {p.name: p.type() for p in run_parameters.PARAMETERS}) == data


def test_values_land_in_their_config_fields() -> None:
    data = run_parameters.apply(default_data(), {
        "arch": "transformer_lm_gpt2_small", "decoder_layers": 12, "decoder_embed_dim": 768, "max_epoch": 0,
        "max_update": 5000, "lr": 0.0003, "storage_root": "s3://b/runs", "tracking_uri": "http://mlflow:5000",
        "model_name": "gpt2ish",
    })
    cfg = config_mod.from_dict(data)
    assert cfg.model.arch == "transformer_lm_gpt2_small"
    assert cfg.model.options["decoder_layers"] == 12 and cfg.model.options["decoder_embed_dim"] == 768
    assert cfg.model.options["decoder_attention_heads"] == 8, "other options stay"
    assert cfg.train.max_update == 5000 and cfg.train.max_epoch == 20 and cfg.train.lr == 0.0003
    assert (cfg.storage.root, cfg.tracking.uri, cfg.registry.model_name) == ("s3://b/runs", "http://mlflow:5000",
                                                                            "gpt2ish")


def test_a_new_corpus_drops_the_old_pins() -> None:
    data = run_parameters.apply(default_data(), {"corpus_source": "https://example.org/corpus.tar.gz"})
    assert data["corpus"] == {"source": "https://example.org/corpus.tar.gz"}
    data = run_parameters.apply(default_data(), {"corpus_source": "s3://c/x.txt", "corpus_sha256": "ab" * 32})
    assert data["corpus"] == {"source": "s3://c/x.txt", "sha256": "ab" * 32}
    same = run_parameters.apply(default_data(), {"corpus_source": "wikitext-2"})
    assert same["corpus"]["sha256"], "the same source keeps its pins"


def test_unknown_parameter_is_refused() -> None:
    with pytest.raises(ConfigError, match="max_epochs"):
        run_parameters.apply(default_data(), {"max_epochs": 3})


def test_the_pipeline_the_component_and_the_step_agree_on_the_parameters() -> None:
    names = [p.name for p in run_parameters.PARAMETERS]
    assert list(inspect.signature(pipeline_func).parameters) == ["config_json", *names]
    assert list(components.configure.component_spec.inputs) == ["config_json", *names]
    for p in run_parameters.PARAMETERS:
        spec = components.configure.component_spec.inputs[p.name]
        assert spec.optional and spec.default == p.type(), p.name


def test_configure_applies_the_parameters_locally(monkeypatch) -> None:
    monkeypatch.delenv("KFP_POD_NAME", raising=False)
    out = steps.configure(config_mod.default_config().to_json(), max_epoch=2, decoder_layers=1)
    cfg = config_mod.from_json(out.config_json)
    assert cfg.train.max_epoch == 2 and cfg.model.options["decoder_layers"] == 1
    assert cfg.storage.root == "runs", "outside a cluster pod a local storage root is fine"


def test_configure_in_a_cluster_pod_refuses_storage_no_other_pod_sees(monkeypatch, capsys) -> None:
    monkeypatch.setenv("KFP_POD_NAME", "lmforge-abc-configure")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    with pytest.raises(SystemExit) as exc:
        steps.configure(config_mod.default_config().to_json())
    assert exc.value.code == 2


def test_configure_in_a_cluster_pod_takes_mlflow_from_the_secret(monkeypatch) -> None:
    monkeypatch.setenv("KFP_POD_NAME", "lmforge-abc-configure")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.kubeflow:5000")
    out = steps.configure(config_mod.default_config().to_json(), storage_root="s3://lmforge/runs")
    cfg = config_mod.from_json(out.config_json)
    assert cfg.tracking.uri == "http://mlflow.kubeflow:5000" and cfg.storage.root == "s3://lmforge/runs"
    assert json.loads(out.download_json)["storage"]["root"] == "s3://lmforge/runs"


def test_cluster_pod_checks() -> None:
    cfg = config_mod.default_config()
    pvc = cfg.replace(cluster=config_mod.ClusterConfig(pvc_name="lmforge-data", pvc_mount_path="/mnt/lmforge"))
    on_pvc = pvc.replace(storage=config_mod.StorageConfig(root="/mnt/lmforge/runs"),
                         tracking=config_mod.TrackingConfig(uri="http://mlflow:5000"))
    assert run_parameters.for_cluster_pod(on_pvc, {}) == on_pvc
    with pytest.raises(ConfigError, match="under cluster.pvc_mount_path"):
        run_parameters.for_cluster_pod(pvc.replace(storage=config_mod.StorageConfig(root="/data/runs")), {})
    s3 = cfg.replace(storage=config_mod.StorageConfig(root="s3://b/r"))
    with pytest.raises(ConfigError, match="tracking_uri"):
        run_parameters.for_cluster_pod(s3, {})
