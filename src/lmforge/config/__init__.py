"""The run config: one YAML file describing a whole run, loaded into typed objects.

In:  a YAML file (`pipelines/configs/*.yaml`) and `--set section.field=value`
     overrides. Out: a frozen `RunConfig`; the same object feeds the CLI, the
     pipeline parameters (as JSON) and every step.

    lmforge config show --config pipelines/configs/tiny.yaml --set train.max_epoch=3

Every field carries its documentation in `metadata["doc"]` (shown by
`lmforge config docs`). Validation collects every problem and raises one
`ConfigError` naming each field, before any expensive work starts.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lmforge.errors import ConfigError
from lmforge.images import TRAINER_IMAGE

SPLITS = ("train", "valid", "test")


def doc(text: str, default: Any = dataclasses.MISSING, factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field with its documentation attached."""
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata={"doc": text})
    return field(default=default, metadata={"doc": text})


@dataclass(frozen=True)
class CorpusConfig:
    """Where the text comes from."""

    source: str = doc(
        "Corpus location: a local directory or file, file://, http(s):// (plain text, .zip, "
        ".tar.gz/.tgz) or s3://bucket/key. A directory holds train.txt, valid.txt, test.txt "
        "(or WikiText's wiki.{train,valid,test}.tokens).",
        "",
    )
    sha256: str | None = doc("Pinned sha256 of the downloaded file (archive or text); checked when set.", None)
    size: int | None = doc("Pinned size in bytes of the downloaded file; checked when set.", None)
    members: dict[str, str] = doc(
        "Archive member (or file name inside a directory) for each split, e.g. "
        "{train: wikitext-2/wiki.train.tokens}. Empty: found by name.",
        factory=dict,
    )


@dataclass(frozen=True)
class PreprocessConfig:
    """Tokenization and the fairseq dictionary (fairseq-preprocess --only-source options)."""

    tokenizer: str = doc(
        "Tokenizer applied before counting: 'none' (whitespace tokens, as WikiText ships them), 'bpe' "
        "(byte-level BPE, HuggingFace tokenizers) or 'sentencepiece'. Trained once on the train split "
        "(or loaded from tokenizer_file); it is saved in the data-bin and travels with the registered model.",
        "none",
    )
    model_type: str = doc("sentencepiece model type: 'bpe' or 'unigram' (tokenizer: sentencepiece only).", "bpe")
    vocab_size: int = doc("Vocabulary size the tokenizer is trained to (bpe, sentencepiece).", 8000)
    tokenizer_sample_bytes: int = doc(
        "Train the tokenizer on the first this many bytes of the train split (cut at a line end); 0: all of it.", 0
    )
    tokenizer_file: str = doc(
        "Use this trained tokenizer instead of training one: a HuggingFace tokenizers JSON file (bpe) or a "
        "sentencepiece .model file; a path or s3:// URI. Empty: train.",
        "",
    )
    shards: int = doc(
        "Byte ranges each split is cut into (at line ends, as fairseq's find_offsets cuts); the pipeline runs "
        "one tokenize+count and one binarize task per shard. The output does not depend on it.",
        2,
    )
    threshold: int = doc("Map words appearing fewer than threshold times to <unk> (fairseq --thresholdsrc).", 0)
    nwords: int = doc("Keep at most this many words in the dictionary, -1 for all (fairseq --nwordssrc).", -1)
    padding_factor: int = doc("Pad the dictionary size to a multiple of this (fairseq --padding-factor).", 8)
    workers: int = doc("Processes `lmforge preprocess` uses on one machine (the pipeline runs one task per shard).", 1)


@dataclass(frozen=True)
class ModelConfig:
    """The fairseq architecture."""

    preset: str = doc(
        "Named model and training defaults (lmforge.config.presets): tiny (CPU), transformer_lm_gpt (GPT-2 small "
        "shape), transformer_lm_wiki103 (adaptive input and softmax), lstm_lm (adaptive softmax). Fields "
        "set in the config override the preset's; empty: none.",
        "",
    )
    arch: str = doc("fairseq architecture name, e.g. transformer_lm, transformer_lm_gpt2_small, lstm_lm.", "transformer_lm")
    criterion: str = doc("fairseq criterion: cross_entropy, adaptive_loss, label_smoothed_cross_entropy.", "cross_entropy")
    options: dict[str, Any] = doc(
        "Extra architecture options passed to fairseq-train as --key value "
        "(underscores become dashes; true is a bare flag), e.g. {decoder_layers: 2}.",
        factory=dict,
    )


@dataclass(frozen=True)
class PyTorchJobConfig:
    """The Kubeflow Training Operator PyTorchJob that runs training on a cluster (train.launcher=pytorchjob)."""

    image: str = doc("Trainer image of every replica (the CUDA image of docker/).", TRAINER_IMAGE)
    gpus_per_node: int | None = doc(
        "nvidia.com/gpu per pod; null: one per process (train.nproc); 0: CPU pods (gloo).", None
    )
    cpu: str = doc("CPU request of each pod.", "4")
    memory: str = doc("Memory request and limit of each pod (includes /dev/shm).", "32Gi")
    shm_size: str = doc("Size of the memory-backed /dev/shm (NCCL, DataLoader workers).", "8Gi")
    cache_size: str = doc("Size of the pod's scratch volume: data-bin copy and checkpoints before upload.", "100Gi")
    node_selector: dict[str, str] = doc("Node labels the pods must match, e.g. {nvidia.com/gpu.product: H100}.", factory=dict)
    tolerations: list[dict[str, Any]] = doc(
        "Pod tolerations (Kubernetes form).",
        factory=lambda: [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    )
    backoff_limit: int = doc("Job restarts (after retryable exits) before the job fails (runPolicy.backoffLimit).", 3)
    active_deadline_seconds: int = doc("The job fails after this many seconds (runPolicy.activeDeadlineSeconds).", 172800)
    ttl_seconds_after_finished: int = doc("A finished job is deleted after this many seconds.", 86400)
    clean_pod_policy: str = doc("Pods killed when the job ends: Running, All or None.", "Running")
    timeout_s: int = doc("The train step gives up (and deletes the job) after this many seconds; 0: deadline + 1 h.", 0)
    poll_s: float = doc("Seconds between job status checks.", 10.0)


@dataclass(frozen=True)
class TrainConfig:
    """fairseq-train settings and how training processes are launched."""

    launcher: str = doc(
        "How workers start: 'local' (torchrun on this machine, or nnodes emulated PyTorchJob replicas), "
        "'pytorchjob' (a Kubeflow PyTorchJob in cluster.namespace), or 'auto': pytorchjob when the train "
        "step runs in a Kubernetes pod (the compiled pipeline), else local (`lmforge run` always resolves "
        "auto to local).",
        "auto",
    )
    nnodes: int = doc(
        "Nodes (PyTorchJob replicas: 1 Master + nnodes-1 Workers). With the local launcher, nnodes > 1 "
        "emulates them as local processes given the operator's environment.",
        1,
    )
    nproc: int = doc("Training processes per node (torchrun --nproc-per-node); GPUs where present, else CPU/gloo.", 2)
    max_epoch: int = doc("Stop after this many epochs (0: no limit).", 5)
    max_update: int = doc("Stop after this many updates (0: no limit).", 0)
    tokens_per_sample: int = doc("Tokens per training sample (fairseq --tokens-per-sample).", 512)
    sample_break_mode: str = doc("none, complete, complete_doc or eos (fairseq --sample-break-mode).", "none")
    max_tokens: int = doc("Tokens per batch per process (fairseq --max-tokens).", 2048)
    update_freq: int = doc("Gradient accumulation steps (fairseq --update-freq).", 1)
    optimizer: str = doc("fairseq optimizer.", "adam")
    lr: float = doc("Peak learning rate.", 0.0005)
    lr_scheduler: str = doc("fairseq learning-rate scheduler.", "inverse_sqrt")
    warmup_updates: int = doc("Warm-up updates for the scheduler.", 100)
    weight_decay: float = doc("Weight decay.", 0.01)
    dropout: float = doc("Dropout.", 0.1)
    clip_norm: float = doc("Gradient clipping norm (0: off).", 0.0)
    seed: int = doc("Random seed.", 1)
    precision: str = doc(
        "fp32, fp16, memory_efficient_fp16, bf16 or memory_efficient_bf16 (all but fp32 need a GPU).", "fp32"
    )
    log_interval: int = doc("Log training metrics every this many updates.", 10)
    patience: int = doc("Stop after this many validations without improvement (-1: off).", -1)
    save_interval_updates: int = doc(
        "Also save (and upload) a checkpoint every this many updates, mid-epoch (0: at epoch ends only).", 0
    )
    keep_interval_updates: int = doc("Keep the newest this many mid-epoch checkpoints (-1: all).", 2)
    keep_last_epochs: int = doc("Keep a checkpoint of each of the last this many epochs (0: last and best only).", 0)
    bmuf: bool = doc(
        "Block-wise model-update filtering: replicas sync every global_sync_iter updates (fairseq --use-bmuf; "
        "its options through extra_args) instead of every update.",
        False,
    )
    cache_dir: str = doc(
        "Workers' local cache (data-bin copy, checkpoints before upload); empty: $LMFORGE_CACHE_DIR or "
        "~/.cache/lmforge.",
        "",
    )
    extra_args: dict[str, Any] = doc("Any other fairseq-train option, as --key value (true is a bare flag).", factory=dict)
    pytorchjob: PyTorchJobConfig = doc("The PyTorchJob (launcher pytorchjob).", factory=PyTorchJobConfig)


@dataclass(frozen=True)
class EvaluateConfig:
    """Perplexity on a held-out split with fairseq's eval-lm logic."""

    split: str = doc(
        "Split whose perplexity the promotion gate compares: test or valid. Its evaluation identity "
        "(dict sha256, split sha256, settings) is recorded with the model.",
        "test",
    )
    other_splits: list[str] = doc(
        "Further splits scored the same way and logged (not used by the gate; evaluate.split itself is skipped).",
        factory=lambda: ["valid"],
    )
    context_window: int = doc("Tokens of left context each scored token sees (fairseq-eval-lm --context-window).", 0)
    tokens_per_sample: int = doc("Block size for scoring; 0 takes train.tokens_per_sample.", 0)
    max_tokens: int = doc("Tokens per evaluation batch.", 4096)


@dataclass(frozen=True)
class RegistryConfig:
    """The MLflow model registry entry for the trained model."""

    model_name: str = doc("Registered model name.", "lmforge-lm")
    alias: str = doc(
        "Alias of the best model: the first version takes it, a later one only with a lower perplexity "
        "on an identical evaluation identity.",
        "champion",
    )
    challenger_alias: str = doc("Alias of the latest version that did not take the champion alias.", "challenger")


@dataclass(frozen=True)
class TrackingConfig:
    """MLflow tracking."""

    uri: str = doc("MLflow tracking URI; empty: a SQLite file mlflow.db under storage.root.", "")
    experiment: str = doc("MLflow experiment name.", "lmforge")


@dataclass(frozen=True)
class StorageConfig:
    """Where run outputs land."""

    root: str = doc(
        "Root for every run's outputs: a local path (relative to the current directory) or "
        "s3://bucket/prefix (the cluster default; endpoint from s3_endpoint or AWS_ENDPOINT_URL).",
        "runs",
    )
    s3_endpoint: str = doc("S3 endpoint URL (MinIO in a stock Kubeflow); empty: AWS_ENDPOINT_URL or AWS itself.", "")


@dataclass(frozen=True)
class ClusterConfig:
    """Kubernetes settings for the compiled pipeline's pods and the training job (`lmforge run` ignores them)."""

    namespace: str = doc("Namespace of the Kubeflow profile the pipeline runs in; PyTorchJobs are created there.", "kubeflow")
    service_account: str = doc(
        "Service account of the pipeline run's pods (lmforge submit/schedule); empty: Kubeflow Pipelines' "
        "default, pipeline-runner (default-editor in a multi-user profile), which k8s/rbac.yaml binds.",
        "",
    )
    s3_secret: str = doc(
        "Secret whose keys (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, optional AWS_ENDPOINT_URL) become "
        "environment variables of every pod that touches S3; empty: none.",
        "lmforge-s3",
    )
    mlflow_secret: str = doc(
        "Secret whose keys (MLFLOW_TRACKING_URI, optional MLFLOW_TRACKING_USERNAME/PASSWORD) become "
        "environment variables of every pod that logs to MLflow; empty: none.",
        "lmforge-mlflow",
    )
    image_registry: str = doc(
        "Registry (and path) of the steps and trainer images, e.g. registry.example.com/ml, where "
        "`lmforge images build --push` put them; empty: ghcr.io/lmforge. Tags are the package version.",
        "",
    )
    cpu_request: dict[str, str] = doc(
        "CPU request of each step's pod, by step name ('default' for steps not listed), e.g. "
        "{preprocess: '4'}. 'preprocess' is the plan (tokenizer training), dictionary and merge tasks, "
        "'preprocess_shard' each shard's count and binarize task. The train step's pod only submits and "
        "watches the PyTorchJob.",
        factory=lambda: {"default": "500m", "preprocess": "2", "preprocess_shard": "1", "evaluate": "2"},
    )
    memory_request: dict[str, str] = doc(
        "Memory request of each step's pod, by step name ('default' for steps not listed), e.g. {evaluate: 8Gi}.",
        factory=lambda: {"default": "1Gi", "preprocess": "4Gi", "preprocess_shard": "2Gi", "evaluate": "4Gi"},
    )
    node_selector: dict[str, str] = doc(
        "Node labels every step pod requires (pod nodeSelector), e.g. {kubernetes.io/arch: amd64}.", factory=dict
    )
    tolerations: list[dict[str, Any]] = doc(
        "Tolerations of every step pod, as in a pod spec: [{key, operator, value, effect, tolerationSeconds}].",
        factory=list,
    )
    pvc_name: str = doc(
        "An existing ReadWriteMany PersistentVolumeClaim mounted into every pod that reads or writes "
        "storage (k8s/pvc.yaml); empty: none, storage.root must then be s3:// (pods share no disk).",
        "",
    )
    pvc_mount_path: str = doc("Where pvc_name is mounted; a local storage.root must lie under it.", "/mnt/lmforge")
    shm_size: str = doc(
        "Size of the in-memory /dev/shm of the steps that load data with PyTorch (train, evaluate): "
        "DataLoader workers pass batches through it, and a container's default is 64Mi.",
        "2Gi",
    )
    retries: int = doc("Retries of a step that touches the network (S3, MLflow, HTTP, the API server).", 2)
    retry_backoff_seconds: int = doc("Wait before the first retry; doubled for each further retry.", 30)


@dataclass(frozen=True)
class RunConfig:
    """One run of the pipeline."""

    name: str = doc("Name of this run config; used in output paths.", "lmforge")
    task: str = doc(
        "Training task (lmforge.tasks): language_modeling (causal LM). It decides the data layout, fairseq's "
        "--task and default criterion, the evaluation metric, the registered model and what the gate compares.",
        "language_modeling",
    )
    corpus: CorpusConfig = doc("Corpus source.", factory=CorpusConfig)
    preprocess: PreprocessConfig = doc("Preprocessing.", factory=PreprocessConfig)
    model: ModelConfig = doc("Model.", factory=ModelConfig)
    train: TrainConfig = doc("Training.", factory=TrainConfig)
    evaluate: EvaluateConfig = doc("Evaluation.", factory=EvaluateConfig)
    registry: RegistryConfig = doc("Model registry.", factory=RegistryConfig)
    tracking: TrackingConfig = doc("Tracking.", factory=TrackingConfig)
    storage: StorageConfig = doc("Storage.", factory=StorageConfig)
    cluster: ClusterConfig = doc("Kubernetes.", factory=ClusterConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def config_hash(self) -> str:
        """sha256 of the canonical JSON form: the config's identity in lineage tags."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()

    def replace(self, **sections: Any) -> RunConfig:
        return dataclasses.replace(self, **sections)


# --------------------------------------------------------------------------- loading


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


@dataclass(frozen=True)
class _CommandLineScalar:
    """A `--set` value read as YAML, with its text kept: `corpus.sha256=0123...` is a str field
    whose digits YAML would otherwise turn into an int (and lose the leading zero)."""

    text: str
    parsed: Any


def _plain(value: Any) -> Any:
    """Free-form values (model.options, train.extra_args) keep YAML's reading of --set values."""
    if isinstance(value, _CommandLineScalar):
        return value.parsed
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    return value


def _check_value(value: Any, tp: Any, path: str, problems: list[str]) -> Any:
    """Coerce `value` to `tp` where the coercion is lossless (int -> float), else record a problem."""
    if isinstance(value, _CommandLineScalar):
        wants_str = tp is str or (typing.get_origin(tp) in (typing.Union, types.UnionType) and str in typing.get_args(tp))
        value = value.text if wants_str and value.parsed is not None else value.parsed
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _check_value(value, inner[0], path, problems)
    if _is_dataclass_type(tp):
        if not isinstance(value, dict):
            problems.append(f"{path}: expected a mapping, got {type(value).__name__}")
            return tp()
        return _build(tp, value, path, problems)
    if origin is dict:
        if not isinstance(value, dict):
            problems.append(f"{path}: expected a mapping, got {type(value).__name__}")
            return {}
        return {key: _plain(item) for key, item in value.items()}
    if origin is list:
        if not isinstance(value, list):
            problems.append(f"{path}: expected a list, got {type(value).__name__}")
            return []
        return [_plain(item) for item in value]
    if tp is Any:
        return _plain(value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        # PyYAML follows YAML 1.1, where `1e-3` (no dot) is a string, not a float.
        try:
            return float(value)
        except ValueError:
            pass
    if tp is bool and not isinstance(value, bool) or tp is not bool and isinstance(value, bool):
        problems.append(f"{path}: expected {tp.__name__}, got {value!r}")
        return value
    if not isinstance(value, tp):
        problems.append(f"{path}: expected {tp.__name__}, got {value!r}")
    return value


def _build(cls: type, data: dict[str, Any], prefix: str, problems: list[str]) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            where = f"{prefix}.{key}" if prefix else str(key)
            problems.append(f"{where}: unknown key (known: {', '.join(sorted(names))})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            where = f"{prefix}.{f.name}" if prefix else f.name
            kwargs[f.name] = _check_value(data[f.name], hints[f.name], where, problems)
    try:
        return cls(**kwargs)
    except TypeError:  # only reachable when a nested value failed its check already
        return cls()


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.max_epoch=3` -> (["train", "max_epoch"], 3); the value is read as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError([f"--set {text!r}: expected section.field=value"])
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, (int, float, bool)):
        value = _CommandLineScalar(raw.strip(), value)
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    data = copy.deepcopy(data)
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError([f"--set {text!r}: {part} is not a section"])
            node = child
        node[path[-1]] = value
    return data


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"config file {path} does not exist (pass --config with a YAML file)"])
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1} column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "not valid YAML"
        raise ConfigError([f"{path}:{where}: malformed YAML ({problem}); fix the file"]) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: the top level must be a mapping of sections, got {type(data).__name__}"])
    return data


def from_dict(data: dict[str, Any]) -> RunConfig:
    """Typed config from plain data; raises one ConfigError listing every problem."""
    from lmforge.config import presets

    problems: list[str] = []
    cfg = _build(RunConfig, presets.apply(data, problems), "", problems)
    if not problems:
        problems.extend(validate(cfg))
    if problems:
        raise ConfigError(problems)
    return cfg


def load(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    data = read_yaml(path) if path is not None else {}
    return from_dict(apply_overrides(data, overrides or []))


def from_json(text: str) -> RunConfig:
    return from_dict(json.loads(text))


# The config sections each data stage depends on. A data stage's task takes only
# these (as `stage_json`), never the pipeline run id, so KFP's cache, which keys
# on a task's inputs, hits exactly when the content and that stage's settings
# are unchanged: training longer does not re-run preprocessing.
STAGE_SECTIONS = {
    "download": ("corpus", "storage"),
    "preprocess": ("preprocess", "storage"),
}


def stage_json(cfg: RunConfig, stage: str) -> str:
    """Canonical JSON of the sections `stage` depends on; `from_json` reads it back (the rest default)."""
    data = cfg.to_dict()
    return json.dumps({section: data[section] for section in STAGE_SECTIONS[stage]}, sort_keys=True)


def from_stage_json(text: str) -> RunConfig:
    """A config from `stage_json` output: its sections as given and validated, the others default."""
    data = json.loads(text)
    problems: list[str] = []
    cfg = _build(RunConfig, data, "", problems)
    if not problems:
        problems.extend(p for p in validate(cfg) if p.split(".", 1)[0].split(":", 1)[0] in data)
    if problems:
        raise ConfigError(problems)
    return cfg


def content_key(*parts: str) -> str:
    """A short digest naming a data stage's output directory: the same inputs, the same place."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode())
        digest.update(b"\0")
    return digest.hexdigest()[:16]


# --------------------------------------------------------------------------- validation

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def validate(cfg: RunConfig) -> list[str]:
    """Problems that need no I/O and no fairseq import; empty when the config is valid."""
    p: list[str] = []
    if not _NAME.match(cfg.name):
        p.append(f"name: {cfg.name!r} must be letters, digits, '.', '_' or '-'")
    from lmforge import tasks  # here, not at module level: config imports no step code

    if cfg.task not in tasks.NAMES:
        p.append(f"task: {cfg.task!r} is not a known task (known: {', '.join(tasks.NAMES)})")
    c = cfg.corpus
    if not c.source:
        p.append("corpus.source: empty; set a directory, file, URL or s3:// URI (or pass --corpus DIR)")
    if c.sha256 is not None and not _SHA256.match(c.sha256):
        p.append(f"corpus.sha256: {c.sha256!r} is not 64 lowercase hex digits")
    if c.size is not None and c.size <= 0:
        p.append(f"corpus.size: {c.size} must be positive")
    for split in c.members:
        if split not in SPLITS:
            p.append(f"corpus.members.{split}: unknown split (use {', '.join(SPLITS)})")
    pp = cfg.preprocess
    if pp.tokenizer not in ("none", "bpe", "sentencepiece"):
        p.append(f"preprocess.tokenizer: {pp.tokenizer!r} is not supported (use none, bpe or sentencepiece)")
    if pp.model_type not in ("bpe", "unigram"):
        p.append(f"preprocess.model_type: {pp.model_type!r} (use bpe or unigram)")
    if pp.tokenizer == "bpe" and pp.vocab_size < 257:
        p.append(f"preprocess.vocab_size: {pp.vocab_size} is too small (byte-level BPE needs >= 257: 256 bytes + 1)")
    elif pp.vocab_size < 8:
        p.append(f"preprocess.vocab_size: {pp.vocab_size} must be >= 8")
    if pp.tokenizer_sample_bytes < 0:
        p.append(f"preprocess.tokenizer_sample_bytes: {pp.tokenizer_sample_bytes} must be >= 0 (0: all)")
    if pp.tokenizer_file and pp.tokenizer == "none":
        p.append("preprocess.tokenizer_file: set preprocess.tokenizer to bpe or sentencepiece to use it")
    if pp.shards < 1:
        p.append(f"preprocess.shards: {pp.shards} must be >= 1")
    if pp.padding_factor < 1:
        p.append(f"preprocess.padding_factor: {pp.padding_factor} must be >= 1")
    if pp.nwords == 0 or pp.nwords < -1:
        p.append(f"preprocess.nwords: {pp.nwords} must be -1 (all) or positive")
    if pp.threshold < 0:
        p.append(f"preprocess.threshold: {pp.threshold} must be >= 0")
    if pp.workers < 1:
        p.append(f"preprocess.workers: {pp.workers} must be >= 1")
    t = cfg.train
    p.extend(validate_training(cfg))
    e = cfg.evaluate
    if e.split not in ("test", "valid"):
        p.append(f"evaluate.split: {e.split!r} (use test or valid)")
    if e.context_window < 0:
        p.append(f"evaluate.context_window: {e.context_window} must be >= 0")
    if e.tokens_per_sample < 0 or e.max_tokens < 1:
        p.append("evaluate.tokens_per_sample must be >= 0 and evaluate.max_tokens >= 1")
    if e.context_window and e.context_window >= (e.tokens_per_sample or t.tokens_per_sample):
        p.append("evaluate.context_window: must be smaller than the evaluation tokens_per_sample")
    for split in e.other_splits:
        if split not in ("test", "valid"):
            p.append(f"evaluate.other_splits: {split!r} (use test or valid)")
    r = cfg.registry
    if not re.match(r"^[A-Za-z][A-Za-z0-9_-]*$", r.challenger_alias) or re.match(r"^v\d+$", r.challenger_alias):
        p.append(f"registry.challenger_alias: {r.challenger_alias!r} must be a name like 'challenger' (not vN)")
    elif r.challenger_alias == r.alias:
        p.append("registry.challenger_alias: must differ from registry.alias")
    if not _NAME.match(cfg.registry.model_name):
        p.append(f"registry.model_name: {cfg.registry.model_name!r} must be letters, digits, '.', '_' or '-'")
    if not re.match(r"^[A-Za-z][A-Za-z0-9_-]*$", cfg.registry.alias) or re.match(r"^v\d+$", cfg.registry.alias):
        p.append(f"registry.alias: {cfg.registry.alias!r} must be a name like 'champion' (not vN)")
    if not cfg.tracking.experiment:
        p.append("tracking.experiment: empty; name an MLflow experiment")
    if not cfg.storage.root:
        p.append("storage.root: empty; name a directory or s3://bucket/prefix for run outputs")
    elif "://" in cfg.storage.root and not cfg.storage.root.startswith(("s3://", "file://")):
        p.append(f"storage.root: {cfg.storage.root!r} (use a local path, file:// or s3://bucket/prefix)")
    if not re.match(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$", cfg.cluster.namespace):
        p.append(f"cluster.namespace: {cfg.cluster.namespace!r} is not a Kubernetes namespace name")
    p.extend(validate_cluster(cfg.cluster))
    return p


PRECISIONS = ("fp32", "fp16", "memory_efficient_fp16", "bf16", "memory_efficient_bf16")
# fairseq-train options the worker sets from the placement or from a typed field; passing them in
# train.extra_args would contradict what the worker computes.
WORKER_OWNED_ARGS = {
    "distributed_world_size": "train.nnodes and train.nproc", "distributed_rank": "the launcher",
    "distributed_init_method": "the launcher", "distributed_no_spawn": "the launcher",
    "distributed_backend": "the worker (NCCL on GPUs, gloo on CPU)", "device_id": "LOCAL_RANK",
    "distributed_port": "the launcher", "save_dir": "the checkpoint location", "cpu": "the worker",
    "fp16": "train.precision", "bf16": "train.precision", "memory_efficient_fp16": "train.precision",
    "memory_efficient_bf16": "train.precision", "use_bmuf": "train.bmuf", "patience": "train.patience",
    "save_interval_updates": "train.save_interval_updates", "keep_interval_updates": "train.keep_interval_updates",
    "keep_last_epochs": "train.keep_last_epochs", "no_epoch_checkpoints": "train.keep_last_epochs",
    "max_tokens": "train.max_tokens", "update_freq": "train.update_freq", "max_update": "train.max_update",
    "max_epoch": "train.max_epoch", "arch": "model.arch", "criterion": "model.criterion",
}
# Architectures whose decoder builds an adaptive softmax by default (fairseq's arch defaults).
ADAPTIVE_SOFTMAX_ARCHS = {"transformer_lm_wiki103": "20000,60000", "transformer_lm_gbw": "60000,160000",
                          "lstm_lm": "10000,50000,200000"}


def world_size(cfg: RunConfig) -> int:
    return cfg.train.nnodes * cfg.train.nproc


def resolve_launcher(cfg: RunConfig, environ: Mapping[str, str]) -> RunConfig:
    """`cfg` with train.launcher 'auto' made concrete: pytorchjob inside a Kubernetes pod (the
    kubelet sets KUBERNETES_SERVICE_HOST in every pod), local elsewhere."""
    if cfg.train.launcher != "auto":
        return cfg
    launcher = "pytorchjob" if environ.get("KUBERNETES_SERVICE_HOST") else "local"
    return cfg.replace(train=dataclasses.replace(cfg.train, launcher=launcher))


def adaptive_softmax_cutoff(cfg: RunConfig) -> list[int] | None:
    """The adaptive softmax cutoffs the model will be built with; None when it has none.

    fairseq's transformer LMs build one whenever a cutoff is set (transformer_lm_wiki103 sets one by
    default); lstm_lm builds one only under the adaptive_loss criterion.
    """
    m = cfg.model
    if m.arch.startswith("lstm") and m.criterion != "adaptive_loss":
        return None
    raw = m.options.get("adaptive_softmax_cutoff") or ADAPTIVE_SOFTMAX_ARCHS.get(m.arch)
    if not raw:
        return None
    try:
        return [int(x) for x in str(raw).strip("()[] ").split(",") if x.strip()]
    except ValueError:
        return []


def validate_training(cfg: RunConfig) -> list[str]:
    """Problems of the model and train sections, combinations included (no I/O, no fairseq import)."""
    p: list[str] = []
    t, m = cfg.train, cfg.model
    if t.launcher not in ("auto", "local", "pytorchjob"):
        p.append(f"train.launcher: {t.launcher!r} is not supported (use 'auto', 'local' or 'pytorchjob')")
    for name in ("nnodes", "nproc", "tokens_per_sample", "max_tokens", "update_freq", "log_interval"):
        if getattr(t, name) < 1:
            p.append(f"train.{name}: {getattr(t, name)} must be >= 1")
    for name in ("max_epoch", "max_update", "warmup_updates", "save_interval_updates", "keep_last_epochs"):
        if getattr(t, name) < 0:
            p.append(f"train.{name}: {getattr(t, name)} must be >= 0")
    if t.keep_interval_updates < -1 or t.keep_interval_updates == 0:
        p.append(f"train.keep_interval_updates: {t.keep_interval_updates} must be -1 (all) or positive")
    if t.patience < -1 or t.patience == 0:
        p.append(f"train.patience: {t.patience} must be -1 (off) or positive")
    if t.max_epoch == 0 and t.max_update == 0:
        p.append("train.max_epoch: set max_epoch or max_update, or training never stops")
    if t.lr <= 0:
        p.append(f"train.lr: {t.lr} must be positive")
    if t.sample_break_mode not in ("none", "complete", "complete_doc", "eos"):
        p.append(f"train.sample_break_mode: {t.sample_break_mode!r} (use none, complete, complete_doc or eos)")
    if t.precision not in PRECISIONS:
        p.append(f"train.precision: {t.precision!r} (use {', '.join(PRECISIONS)})")
    if not 0 <= t.dropout < 1:
        p.append(f"train.dropout: {t.dropout} must be in [0, 1)")
    for key in t.extra_args:
        owner = WORKER_OWNED_ARGS.get(str(key).replace("-", "_"))
        if owner:
            p.append(f"train.extra_args.{key}: set by {owner}; remove it from extra_args")
    distributed = world_size(cfg) > 1
    if m.criterion == "adaptive_loss":
        ddp_backend = str(t.extra_args.get("ddp_backend", "legacy_ddp"))
        if ddp_backend != "legacy_ddp":
            # fairseq refuses the combination when it builds the criterion, i.e. after launch
            p.append(f"train.extra_args.ddp_backend: adaptive_loss under DDP needs legacy_ddp, not {ddp_backend!r}")
        if adaptive_softmax_cutoff(cfg) is None:
            p.append(
                f"model.criterion: adaptive_loss needs an adaptive softmax; set model.options.adaptive_softmax_cutoff "
                f"for {m.arch!r} or use the transformer_lm_wiki103 or lstm_lm preset"
            )
    cutoff = adaptive_softmax_cutoff(cfg)
    if cutoff is not None and (not cutoff or any(b <= a for a, b in zip(cutoff, cutoff[1:])) or cutoff[0] <= 0):
        p.append(f"model.options.adaptive_softmax_cutoff: {cutoff} must be increasing positive integers")
    if t.bmuf and not distributed:
        p.append("train.bmuf: BMUF synchronizes replicas; it needs nnodes x nproc > 1")
    j = t.pytorchjob
    if t.launcher != "local":
        if not j.image:
            p.append("train.pytorchjob.image: empty; name the trainer image")
        if j.gpus_per_node is not None and j.gpus_per_node not in (0, t.nproc):
            p.append(
                f"train.pytorchjob.gpus_per_node: {j.gpus_per_node} must be 0 (CPU pods) or train.nproc "
                f"({t.nproc}): one training process per GPU"
            )
        if j.gpus_per_node == 0 and t.precision != "fp32":
            p.append(f"train.precision: {t.precision} needs GPUs; set train.pytorchjob.gpus_per_node")
    if j.clean_pod_policy not in ("Running", "All", "None"):
        p.append(f"train.pytorchjob.clean_pod_policy: {j.clean_pod_policy!r} (use Running, All or None)")
    for name in ("backoff_limit", "active_deadline_seconds", "ttl_seconds_after_finished", "timeout_s"):
        if getattr(j, name) < 0:
            p.append(f"train.pytorchjob.{name}: {getattr(j, name)} must be >= 0")
    if j.poll_s <= 0:
        p.append(f"train.pytorchjob.poll_s: {j.poll_s} must be positive")
    return p


_CPU = re.compile(r"^([0-9]*[.])?[0-9]+m?$")  # what KFP's set_cpu_request accepts
_MEMORY = re.compile(r"^[0-9]+(E|Ei|P|Pi|T|Ti|G|Gi|M|Mi|K|Ki)?$")  # what KFP's set_memory_request accepts
_TOLERATION_KEYS = {"key", "operator", "value", "effect", "tolerationSeconds"}


def validate_cluster(c: ClusterConfig) -> list[str]:
    """Problems of the `cluster` section: the pod settings `lmforge compile` writes into the pipeline."""
    p: list[str] = []
    for name, pattern, example in (("cpu_request", _CPU, "500m or 2"), ("memory_request", _MEMORY, "4Gi")):
        for step, value in getattr(c, name).items():
            if not pattern.match(str(value)):
                p.append(f"cluster.{name}.{step}: {value!r} is not a Kubernetes quantity (e.g. {example})")
    if not _MEMORY.match(c.shm_size):
        p.append(f"cluster.shm_size: {c.shm_size!r} is not a Kubernetes quantity (e.g. 2Gi)")
    for key, value in c.node_selector.items():
        if not isinstance(value, str):
            p.append(f"cluster.node_selector.{key}: {value!r} must be a string (quote it)")
    for i, toleration in enumerate(c.tolerations):
        if not isinstance(toleration, dict) or not set(toleration) <= _TOLERATION_KEYS:
            p.append(f"cluster.tolerations[{i}]: use the keys {', '.join(sorted(_TOLERATION_KEYS))}")
        elif toleration.get("operator", "Equal") not in ("Equal", "Exists"):
            p.append(f"cluster.tolerations[{i}].operator: {toleration['operator']!r} (use Equal or Exists)")
        elif toleration.get("effect") not in (None, "NoSchedule", "PreferNoSchedule", "NoExecute"):
            p.append(f"cluster.tolerations[{i}].effect: {toleration['effect']!r} (NoSchedule, PreferNoSchedule, NoExecute)")
    if c.pvc_name and not re.match(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$", c.pvc_name):
        p.append(f"cluster.pvc_name: {c.pvc_name!r} is not a Kubernetes object name")
    if c.image_registry and not re.match(r"^[a-z0-9.-]+(:[0-9]+)?(/[a-z0-9._-]+)*/?$", c.image_registry):
        p.append(f"cluster.image_registry: {c.image_registry!r} is not a registry path like registry.example.com/ml")
    if not c.pvc_mount_path.startswith("/"):
        p.append(f"cluster.pvc_mount_path: {c.pvc_mount_path!r} must be an absolute path")
    if c.retries < 0 or c.retry_backoff_seconds < 0:
        p.append("cluster.retries and cluster.retry_backoff_seconds must be >= 0")
    return p


def cluster_storage_problems(cfg: RunConfig) -> list[str]:
    """Why `cfg` cannot run as pods of a cluster: pods share no disk, so every location a later step
    or the training job reads must be in S3 or on the shared volume (cluster.pvc_name)."""
    root, c = cfg.storage.root, cfg.cluster
    if root.startswith("s3://"):
        return []
    path = root.removeprefix("file://")
    mount = c.pvc_mount_path.rstrip("/") + "/"
    if c.pvc_name and path.startswith(mount):
        return []
    where = f"under cluster.pvc_mount_path ({c.pvc_mount_path})" if c.pvc_name else "on a shared volume (cluster.pvc_name)"
    return [
        f"storage.root: {root!r} is local to one pod; set the storage_root parameter (or storage.root) "
        f"to s3://bucket/prefix, or to a path {where}"
    ]


def field_docs(cls: type = RunConfig, prefix: str = "") -> list[tuple[str, str, Any]]:
    """(dotted name, documentation, default) for every leaf field, for `lmforge config docs`."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        name = f"{prefix}{f.name}"
        if _is_dataclass_type(hints[f.name]):
            rows.extend(field_docs(hints[f.name], name + "."))
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            rows.append((name, f.metadata["doc"], default))
    return rows


# --------------------------------------------------------------------------- shipped configs

SHIPPED = Path(__file__).parents[1] / "configs"  # pipelines/configs/ links here


def shipped_config_path(name: str) -> Path:
    return SHIPPED / f"{name}.yaml"


def default_config() -> RunConfig:
    """The default run: WikiText-2 from its official location."""
    return load(shipped_config_path("wikitext-2"))
