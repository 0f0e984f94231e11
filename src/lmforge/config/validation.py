"""Validation of the run config: every problem collected, named by its field, raised once.

In: a typed `RunConfig` (from `lmforge.config.loading`). Out: a list of problems, empty when
the config is valid; `from_dict`/`load` raise them as one `ConfigError`. Nothing here does I/O
or imports fairseq: the names fairseq must know are checked by `fairseq_problems` against the
registries its caller passes (`lmforge run` and `lmforge train` pass fairseq's own).

    lmforge config show --config FILE     (loads, validates, prints the config or the problems)
"""

from __future__ import annotations

import re
from collections.abc import Collection

from lmforge.config.schema import (
    SPLITS, ClusterConfig, CorpusChecksConfig, RunConfig, parse_cutoffs, ties_adaptive_weights,
)

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
    p.extend(validate_checks(pp.checks))
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
    if not _NAME.match(r.model_name):
        p.append(f"registry.model_name: {r.model_name!r} must be letters, digits, '.', '_' or '-'")
    p.extend(alias_problems(r.alias, r.challenger_alias))
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


def names_field(problem: str, path: str) -> bool:
    """Whether `problem` names the field `path` (`train.nproc`): by its dotted path, or, for a field
    inside a section, by its bare name as the combined checks do ("nnodes x nproc > 1"). A
    section (`train`) is named by its fields (`train.lr: ...`) or as the problem's own field."""
    if "." not in path:
        return re.search(rf"(?<![\w.]){re.escape(path)}[.:]", problem) is not None
    leaf = path.rsplit(".", 1)[1]
    return re.search(rf"(?<![\w.])({re.escape(path)}|{re.escape(leaf)})(?!\w)", problem) is not None


def without_unparsed(problems: list[str], unparsed: list[str]) -> list[str]:
    """`problems` less those naming a field that failed to parse (`unparsed`): that field was
    checked at its default, so what its checks say is not about the user's config."""
    return [problem for problem in problems if not any(names_field(problem, path) for path in unparsed)]


def validate_checks(c: CorpusChecksConfig) -> list[str]:
    """Problems of `preprocess.checks`: fractions in [0, 1], each warning at or below its refusal."""
    p: list[str] = []
    for kind in ("unk_fraction", "one_token_lines"):
        limit, warn = getattr(c, f"max_{kind}"), getattr(c, f"warn_{kind}")
        for name, value in ((f"max_{kind}", limit), (f"warn_{kind}", warn)):
            if not 0 <= value <= 1:
                p.append(f"preprocess.checks.{name}: {value} must be a fraction in [0, 1]")
        if warn > limit:
            p.append(f"preprocess.checks.warn_{kind}: {warn} is above max_{kind} ({limit}); a warning comes first")
    if c.min_train_samples < 0:
        p.append(f"preprocess.checks.min_train_samples: {c.min_train_samples} must be >= 0 (0: never)")
    return p


LOCAL_REPLICAS = ("processes", "containers")
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
def validate_training(cfg: RunConfig) -> list[str]:
    """Problems of the model and train sections, combinations included (no I/O, no fairseq import)."""
    p: list[str] = []
    t, m = cfg.train, cfg.model
    if t.launcher not in ("auto", "local", "pytorchjob"):
        p.append(f"train.launcher: {t.launcher!r} is not supported (use 'auto', 'local' or 'pytorchjob')")
    if t.local_replicas not in LOCAL_REPLICAS:
        p.append(f"train.local_replicas: {t.local_replicas!r} is not supported (use {' or '.join(LOCAL_REPLICAS)})")
    containers = t.local_replicas == "containers" and t.launcher != "pytorchjob"
    if containers and t.precision != "fp32":
        p.append(f"train.local_replicas: containers get no GPU; use train.precision fp32, not {t.precision}")
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
    distributed = t.world_size() > 1
    if m.criterion == "adaptive_loss":
        ddp_backend = str(t.extra_args.get("ddp_backend", "legacy_ddp"))
        if ddp_backend != "legacy_ddp":
            # fairseq refuses the combination when it builds the criterion, i.e. after launch
            p.append(f"train.extra_args.ddp_backend: adaptive_loss under DDP needs legacy_ddp, not {ddp_backend!r}")
        if m.adaptive_softmax_cutoff() is None:
            p.append(
                f"model.criterion: adaptive_loss needs an adaptive softmax; set model.options.adaptive_softmax_cutoff "
                f"for {m.arch!r} or use the transformer_lm_wiki103 or lstm_lm preset"
            )
    for name, cutoff in (("adaptive_softmax_cutoff", m.adaptive_softmax_cutoff()),
                         ("adaptive_input_cutoff", m.adaptive_input_cutoff())):
        if cutoff is not None and (not cutoff or any(b <= a for a, b in zip(cutoff, cutoff[1:])) or cutoff[0] <= 0):
            p.append(f"model.options.{name}: {cutoff} must be increasing positive integers")
    input_cutoff = parse_cutoffs(m.options.get("adaptive_input_cutoff"))
    if ties_adaptive_weights(m.arch, m.options) and input_cutoff is not None and input_cutoff != m.adaptive_softmax_cutoff():
        # fairseq asserts it when it builds the model, i.e. after launch
        p.append(
            f"model.options.adaptive_input_cutoff: {m.arch} ties its adaptive input to its adaptive softmax, so the "
            f"cutoffs must be equal (input {input_cutoff}, softmax {m.adaptive_softmax_cutoff()}); set "
            "adaptive_softmax_cutoff alone, the input follows"
        )
    if t.bmuf and not distributed:
        p.append("train.bmuf: BMUF synchronizes replicas; it needs nnodes x nproc > 1")
    j = t.pytorchjob
    if containers and not j.image:
        p.append("train.pytorchjob.image: empty; name the trainer image the replica containers run")
    if t.launcher != "local":
        if not j.image and not containers:
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


# --------------------------------------------------------------------------- the alias rule

# A registry alias is a name: a letter, then letters, digits, '_' or '-'. Never vN: MLflow and
# `lmforge promote` read "v3" as version 3, so an alias spelled so could never be addressed.
_ALIAS = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")
_VERSION = re.compile(r"^v\d+$")


def alias_problem(field: str, alias: str, example: str = "champion") -> str | None:
    """Why `alias` cannot be a registry alias (None when it can); `field` names where it was set."""
    if _ALIAS.match(alias) and not _VERSION.match(alias):
        return None
    return f"{field}: {alias!r} must be a name like {example!r} (letters, digits, '_', '-'; not vN)"


def alias_problems(
    champion: str, challenger: str, fields: tuple[str, str] = ("registry.alias", "registry.challenger_alias"),
) -> list[str]:
    """The promotion gate's two aliases: each a valid alias, and not the same one."""
    p = [problem for problem in (alias_problem(fields[0], champion, "champion"),
                                 alias_problem(fields[1], challenger, "challenger")) if problem]
    if not p and champion == challenger:
        p.append(f"{fields[1]}: must differ from {fields[0]}")
    return p


# --------------------------------------------------------------------------- names fairseq must know


def fairseq_problems(cfg: RunConfig, architectures: Collection[str], criteria: Collection[str]) -> list[str]:
    """model.arch and model.criterion against fairseq's registries, passed in by the caller
    (`lmforge.fairseq_api.architectures()`, `criteria()`): importing fairseq costs seconds and
    pulls in torch, so config stays free of it and this check is a pure function."""
    p = []
    if cfg.model.arch not in architectures:
        lm_archs = sorted(a for a in architectures if "lm" in a)
        p.append(f"model.arch: unknown fairseq architecture {cfg.model.arch!r} (language models: {', '.join(lm_archs)})")
    if cfg.model.criterion not in criteria:
        p.append(f"model.criterion: unknown fairseq criterion {cfg.model.criterion!r}")
    return p
