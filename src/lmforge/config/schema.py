"""The run config's schema: frozen dataclasses, one per YAML section, each field documented.

In: nothing (pure types). Out: `RunConfig` and its sections, with the values derived from them
as methods (`TrainConfig.world_size`, `ModelConfig.adaptive_softmax_cutoff`/`adaptive_input_cutoff`,
`TrainConfig.resolved_launcher`/`RunConfig.resolve_launcher`), and `field_docs` for

    lmforge config docs

Every field carries its documentation in `metadata["doc"]`. Building a config from YAML and
checking it live beside this module (`loading`, `validation`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from lmforge.images import TRAINER_IMAGE

SPLITS = ("train", "valid", "test")
# Architectures whose decoder builds an adaptive softmax by default (fairseq's arch defaults).
ADAPTIVE_SOFTMAX_ARCHS = {"transformer_lm_wiki103": "20000,60000", "transformer_lm_baevski_wiki103": "20000,60000",
                          "transformer_lm_gbw": "60000,160000", "transformer_lm_baevski_gbw": "60000,160000",
                          "lstm_lm": "10000,50000,200000"}
# Architectures with an adaptive input tied to their adaptive softmax by default (fairseq's arch
# defaults: adaptive_input, tie_adaptive_weights, adaptive_input_cutoff). fairseq asserts, when it
# builds the model, that tied cutoffs are the same text.
TIED_ADAPTIVE_ARCHS = {"transformer_lm_wiki103": "20000,60000", "transformer_lm_baevski_wiki103": "20000,60000"}


def ties_adaptive_weights(arch: str, options: Mapping[str, Any]) -> bool:
    """Whether the model shares its adaptive input's weights with its adaptive softmax."""
    return arch in TIED_ADAPTIVE_ARCHS or options.get("tie_adaptive_weights") is True


def parse_cutoffs(raw: Any) -> list[int] | None:
    """'500,1000', '(500, 1000)' or [500, 1000] -> [500, 1000]; None for none; [] when not integers."""
    if raw is None or raw == "":
        return None
    try:
        return [int(x) for x in (raw if isinstance(raw, (list, tuple)) else str(raw).strip("()[] ").split(","))
                if str(x).strip()]
    except ValueError:
        return []


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
class CorpusChecksConfig:
    """What a corpus must be to train (lmforge.data.corpus_checks): checked from the counts preprocessing
    makes anyway, after the dictionary is built and before anything is binarized or trained. An empty
    or blank-only split is always refused; past a `max_` limit a split is refused with one line naming it
    and its numbers, past a `warn_` limit it gets a warning and preprocessing goes on."""

    max_unk_fraction: float = doc(
        "Refuse a split in which more than this fraction of the tokens (end of line not counted) are <unk> "
        "under the dictionary (words below preprocess.threshold, beyond preprocess.nwords, a literal <unk>); "
        "1: never.",
        0.5,
    )
    warn_unk_fraction: float = doc("Warn about a split in which more than this fraction of the tokens are <unk>.", 0.25)
    max_one_token_lines: float = doc(
        "Refuse a split in which more than this fraction of the lines holding text are a single token: text "
        "without spaces between words (Chinese, Japanese, Thai) under tokenizer 'none' looks so; 1: never.",
        0.5,
    )
    warn_one_token_lines: float = doc("Warn about a split in which more than this fraction of the lines are one token.", 0.2)
    min_train_samples: int = doc(
        "Refuse a train split holding fewer tokens than this many samples of train.tokens_per_sample; 0: never. "
        "Below one update's batches (train.max_tokens x processes) it gets a warning.",
        1,
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
    checks: CorpusChecksConfig = doc("Checks that refuse a corpus which cannot train.", factory=CorpusChecksConfig)


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

    def adaptive_softmax_cutoff(self) -> list[int] | None:
        """The adaptive softmax cutoffs the model will be built with; None when it has none
        ([] when model.options.adaptive_softmax_cutoff is not a list of integers).

        fairseq's transformer LMs build one whenever a cutoff is set (transformer_lm_wiki103 sets one
        by default); lstm_lm builds one only under the adaptive_loss criterion.
        """
        if self.arch.startswith("lstm") and self.criterion != "adaptive_loss":
            return None
        return parse_cutoffs(self.options.get("adaptive_softmax_cutoff") or ADAPTIVE_SOFTMAX_ARCHS.get(self.arch))

    def adaptive_input_cutoff(self) -> list[int] | None:
        """The adaptive input's cutoffs; None without an adaptive input ([] when not integers).

        transformer_lm_wiki103 builds one (tied to its adaptive softmax), any transformer LM with
        model.options.adaptive_input. Tied, a cutoff set on one side only is the other's too
        (`fairseq_api.arguments.model_options`).
        """
        if not (self.arch in TIED_ADAPTIVE_ARCHS or self.options.get("adaptive_input") is True):
            return None
        raw = self.options.get("adaptive_input_cutoff")
        if raw is None and ties_adaptive_weights(self.arch, self.options):
            raw = self.options.get("adaptive_softmax_cutoff")
        return parse_cutoffs(raw or TIED_ADAPTIVE_ARCHS.get(self.arch))


@dataclass(frozen=True)
class PyTorchJobConfig:
    """The Kubeflow Training Operator PyTorchJob that runs training on a cluster (train.launcher=pytorchjob)."""

    image: str = doc(
        "Trainer image of every replica (the CUDA image of docker/); also of the local replica containers "
        "(train.local_replicas: containers; its CPU variant there).",
        TRAINER_IMAGE,
    )
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
    backoff_limit: int = doc(
        "Job restarts (after retryable exits) before the job fails (runPolicy.backoffLimit); also the "
        "restarts of the local replica containers, counted over the whole job.",
        3,
    )
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
        "emulates them (see local_replicas), each given the operator's environment.",
        1,
    )
    local_replicas: str = doc(
        "How the local launcher runs an emulated PyTorchJob's replicas: 'processes' (local processes, each with "
        "its own cache on this machine's disk) or 'containers' (containers of train.pytorchjob.image on the "
        "Docker engine of DOCKER_HOST, host networking, no volumes, restarted on exit codes 128-255 up to "
        "train.pytorchjob.backoff_limit as restartPolicy ExitCode does; even nnodes = 1 is then a one-Master "
        "job). Containers share no disk with this machine: the data-bin and checkpoints must be s3:// and "
        "the tracking URI a server's.",
        "processes",
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

    def world_size(self) -> int:
        """Training processes in all: nnodes x nproc (fairseq's --distributed-world-size)."""
        return self.nnodes * self.nproc

    def resolved_launcher(self, environ: Mapping[str, str]) -> str:
        """train.launcher made concrete: 'auto' is pytorchjob inside a Kubernetes pod (the kubelet
        sets KUBERNETES_SERVICE_HOST in every pod), local elsewhere."""
        if self.launcher != "auto":
            return self.launcher
        return "pytorchjob" if environ.get("KUBERNETES_SERVICE_HOST") else "local"


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

    def resolve_launcher(self, environ: Mapping[str, str]) -> RunConfig:
        """This config with train.launcher 'auto' made concrete for `environ` (see TrainConfig.resolved_launcher)."""
        launcher = self.train.resolved_launcher(environ)
        if launcher == self.train.launcher:
            return self
        return self.replace(train=dataclasses.replace(self.train, launcher=launcher))


def is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def field_docs(cls: type = RunConfig, prefix: str = "") -> list[tuple[str, str, Any]]:
    """(dotted name, documentation, default) for every leaf field, for `lmforge config docs`."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        name = f"{prefix}{f.name}"
        if is_dataclass_type(hints[f.name]):
            rows.extend(field_docs(hints[f.name], name + "."))
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            rows.append((name, f.metadata["doc"], default))
    return rows
