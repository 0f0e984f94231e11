"""The run config: one YAML file describing a whole run, loaded into typed objects.

In:  a YAML file (`pipelines/configs/*.yaml`) and `--set section.field=value`
     overrides. Out: a frozen `RunConfig`; the same object feeds the CLI, the
     pipeline parameters (as JSON) and every step.

    lmforge config show --config pipelines/configs/tiny.yaml --set train.max_epoch=3

The package: `schema` (the dataclasses, each field documented, and the values derived from
them), `loading` (YAML, `--set`, JSON, shipped configs, local paths), `validation` (every
problem collected and raised once as a `ConfigError`; the alias rule), `presets` (named model
defaults), `run_parameters` (the pipeline's run-form values). The names below are re-exported
so `from lmforge import config; config.load(...)` reads as one module.
"""

from lmforge.config.loading import (
    SHIPPED,
    STAGE_SECTIONS,
    apply_overrides,
    content_key,
    default_config,
    from_dict,
    from_json,
    from_stage_json,
    load,
    parse_override,
    read_yaml,
    resolve_local_paths,
    resolve_storage,
    shipped_config_path,
    stage_json,
    with_corpus,
)
from lmforge.config.schema import (
    ADAPTIVE_SOFTMAX_ARCHS,
    SPLITS,
    TIED_ADAPTIVE_ARCHS,
    ClusterConfig,
    CorpusChecksConfig,
    CorpusConfig,
    EvaluateConfig,
    ModelConfig,
    PreprocessConfig,
    PyTorchJobConfig,
    RegistryConfig,
    RunConfig,
    StorageConfig,
    TrackingConfig,
    TrainConfig,
    doc,
    field_docs,
)
from lmforge.config.validation import (
    PRECISIONS,
    WORKER_OWNED_ARGS,
    alias_problem,
    alias_problems,
    cluster_storage_problems,
    fairseq_problems,
    validate,
    validate_cluster,
    validate_training,
)
from lmforge.errors import ConfigError  # what loading and validation raise

__all__ = [
    "ADAPTIVE_SOFTMAX_ARCHS", "PRECISIONS", "SHIPPED", "SPLITS", "STAGE_SECTIONS", "TIED_ADAPTIVE_ARCHS",
    "WORKER_OWNED_ARGS",
    "ClusterConfig", "ConfigError", "CorpusChecksConfig", "CorpusConfig", "EvaluateConfig", "ModelConfig", "PreprocessConfig",
    "PyTorchJobConfig", "RegistryConfig", "RunConfig", "StorageConfig", "TrackingConfig", "TrainConfig",
    "alias_problem", "alias_problems", "apply_overrides", "cluster_storage_problems", "content_key",
    "default_config", "doc", "fairseq_problems", "field_docs", "from_dict", "from_json", "from_stage_json", "load",
    "parse_override", "read_yaml", "resolve_local_paths", "resolve_storage", "shipped_config_path", "stage_json",
    "validate", "validate_cluster", "validate_training", "with_corpus",
]
