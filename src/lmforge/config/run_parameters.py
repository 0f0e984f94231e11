"""The pipeline's run parameters beyond `config_json`, and what the configure step does with them.

In: the run config as plain data and the values a Kubeflow UI user typed into the
run form (each empty or 0 meaning "as in config_json"). Out: the config data with
those values applied. The configure step is the only consumer, so nothing
downstream knows the parameters exist:

    lmforge submit --host URL      (or the run form of the uploaded pipeline)

In a pod of a cluster run, `for_cluster_pod` also fills tracking.uri from the
MLflow Secret's MLFLOW_TRACKING_URI and refuses a storage.root that only one pod
could see, before any data moves.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from lmforge.config.schema import RunConfig, TrackingConfig
from lmforge.config.validation import cluster_storage_problems
from lmforge.errors import ConfigError


@dataclass(frozen=True)
class Parameter:
    name: str
    type: type
    path: tuple[str, ...]  # where in the config the value goes
    doc: str


PARAMETERS = (
    Parameter("corpus_source", str, ("corpus", "source"),
              "Corpus (catalog name, http(s)://, s3:// or a path the pods see); replaces the config's corpus "
              "and its pins."),
    Parameter("corpus_sha256", str, ("corpus", "sha256"), "Pinned sha256 of the downloaded corpus file."),
    Parameter("arch", str, ("model", "arch"), "fairseq architecture, e.g. transformer_lm_gpt2_small."),
    Parameter("decoder_layers", int, ("model", "options", "decoder_layers"), "Decoder layers (model size)."),
    Parameter("decoder_embed_dim", int, ("model", "options", "decoder_embed_dim"), "Embedding size (model size)."),
    Parameter("max_epoch", int, ("train", "max_epoch"), "Stop training after this many epochs."),
    Parameter("max_update", int, ("train", "max_update"), "Stop training after this many updates."),
    Parameter("lr", float, ("train", "lr"), "Peak learning rate."),
    Parameter("storage_root", str, ("storage", "root"), "Root of all outputs, s3://bucket/prefix on a cluster."),
    Parameter("tracking_uri", str, ("tracking", "uri"), "MLflow tracking URI, e.g. http://mlflow:5000."),
    Parameter("model_name", str, ("registry", "model_name"), "Registered model name."),
)
BY_NAME = {p.name: p for p in PARAMETERS}


def apply(data: dict[str, Any], values: Mapping[str, Any]) -> dict[str, Any]:
    """Config data with every set parameter (not empty, not 0) applied; the input is not changed."""
    unknown = set(values) - set(BY_NAME)
    if unknown:
        raise ConfigError([f"unknown pipeline parameter(s) {', '.join(sorted(unknown))}"])
    data = copy.deepcopy(data)
    source = values.get("corpus_source")
    if source and source != data.get("corpus", {}).get("source"):
        # A new corpus: the old one's pins and archive members describe something else.
        data["corpus"] = {"source": source}
    for name, value in values.items():
        if value in ("", 0, 0.0, None) or name == "corpus_source":
            continue
        param = BY_NAME[name]
        node = data
        for part in param.path[:-1]:
            node = node.setdefault(part, {})
        node[param.path[-1]] = value
    return data


def in_kfp_pod(env: Mapping[str, str]) -> bool:
    """True inside a pod of a Kubeflow Pipelines run: KFP's driver sets KFP_POD_NAME in every one."""
    return bool(env.get("KFP_POD_NAME"))


def for_cluster_pod(cfg: RunConfig, env: Mapping[str, str]) -> RunConfig:
    """The config as the pods of a cluster run need it, or a ConfigError saying what to set."""
    if not cfg.tracking.uri and env.get("MLFLOW_TRACKING_URI"):
        # From the MLflow Secret (cluster.mlflow_secret); written into config_json so every later step,
        # and the training job's pods, log to the same server.
        cfg = cfg.replace(tracking=TrackingConfig(uri=env["MLFLOW_TRACKING_URI"],
                                                  experiment=cfg.tracking.experiment))
    problems = cluster_storage_problems(cfg)
    if not cfg.tracking.uri:
        problems.append(
            "tracking.uri: empty, and a SQLite file cannot be shared by pods; set the tracking_uri parameter "
            f"(e.g. http://mlflow:5000) or MLFLOW_TRACKING_URI in the Secret {cfg.cluster.mlflow_secret or '(none)'}"
        )
    if problems:
        raise ConfigError(problems)
    return cfg
