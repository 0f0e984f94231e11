"""The pipeline's steps: each runs one stage inside the pipeline run's MLflow run.

In: the run config as JSON (as the pipeline parameter carries it), the pipeline
run id and the upstream steps' outputs (paths). Out: the stage's outputs, as
paths and digests for the downstream steps. A KFP component's body is one
import and one call to a function here; `lmforge run` executes the very same
functions through KFP's local runner.

Outputs of a pipeline run live under `<storage.root>/<name>/<pipeline run id>/`.
A step that fails on the user's input prints one line and exits non-zero; a step
stopped by SIGTERM or SIGINT unwinds (its MLflow run KILLED, its processes stopped)
and exits 128 + the signal. `lmforge run` sets two files the steps report to, so that
the command that started the pipeline can repeat the line and end the MLflow run where
a step could not: LMFORGE_ERROR_FILE gets the line "<step> step: <why>" of a step that
failed or stopped (`failure_message`), LMFORGE_MLFLOW_RUN_FILE the pipeline's MLflow
run id once a step has it.

The steps that log to MLflow (train, evaluate, register) do so through
`tracking.step_run`: each leaves the pipeline's run RUNNING, a failing one ends it
FAILED (a stopped one KILLED) tagged with the step and the line, and register, the
DAG's last, ends it FINISHED.
What changes with the training task (data layout, evaluation metric, registered model)
the steps ask `lmforge.tasks.get(cfg.task)`.

    lmforge run --config pipelines/configs/tiny.yaml     # every step, through KFP's local runner
"""

from __future__ import annotations

import functools
import json
import logging
import os
import signal
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

from lmforge import __version__, tasks, tracking
from lmforge.io import storage
from lmforge import config as config_mod
from lmforge.config import RunConfig
from lmforge.errors import LmforgeError
from lmforge.interrupts import Interrupted, raised_on_stop_signals
from lmforge.logs import setup_logging

log = logging.getLogger(__name__)
ERROR_FILE_ENV = "LMFORGE_ERROR_FILE"
RUN_FILE_ENV = "LMFORGE_MLFLOW_RUN_FILE"
F = TypeVar("F", bound=Callable[..., Any])


class ConfigureOutputs(NamedTuple):
    config_json: str
    download_json: str
    preprocess_json: str


class DownloadOutputs(NamedTuple):
    corpus_dir: str
    corpus_sha256: str


class PreprocessOutputs(NamedTuple):
    data_bin: str
    dict_sha256: str


class EvaluateOutputs(NamedTuple):
    perplexity: float
    metrics_file: str
    evaluation_json: str


class RegisterOutputs(NamedTuple):
    model_uri: str
    version: str
    mlflow_run_id: str


def run_dir(cfg: RunConfig, pipeline_run_id: str) -> str:
    """Where one pipeline run's own outputs live (checkpoints, evaluation): a path or an s3:// URI."""
    return storage.join(cfg.storage.root, cfg.name, pipeline_run_id)


def data_dir(cfg: RunConfig, kind: str, key: str) -> str:
    """Where a data stage's output lives: named by content, shared by every run that needs it."""
    return storage.join(cfg.storage.root, "data", kind, key)


def scratch_dir(name: str) -> Path:
    """Local working space of a step whose outputs go to S3 (a pod's disk, or this machine's)."""
    path = Path(os.environ.get("LMFORGE_SCRATCH", Path(tempfile.gettempdir()) / "lmforge")) / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def tracking_uri(cfg: RunConfig) -> str:
    return tracking.resolve_tracking_uri(cfg.tracking.uri, cfg.storage.root)


def failure_message(step_name: str, line: str) -> str:
    """What a step that failed or stopped reports: "<step> step: <why>" (`parse_failure_message` reads it)."""
    return f"{step_name} step: {line}"


def parse_failure_message(message: str) -> tuple[str | None, str]:
    """(step, why) from a `failure_message`; (None, message) for any other text."""
    step_name, separator, line = message.partition(" step: ")
    return (step_name, line) if separator else (None, message)


def _report(env: str, text: str) -> None:
    """Write `text` to the file the variable `env` names, when `lmforge run` set it."""
    path = os.environ.get(env)
    if path:
        Path(path).write_text(text + "\n")


def step(name: str) -> Callable[[F], F]:
    """Logging set up; a stop signal turned into Interrupted (exit 128 + signal, after the step has
    unwound); a user error into one line and its exit status; every early end reported to
    LMFORGE_ERROR_FILE (a bug keeps its traceback as well)."""

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            setup_logging()
            try:
                with raised_on_stop_signals():
                    return fn(*args, **kwargs)
            except LmforgeError as exc:
                message = failure_message(name, tracking.failure_line(exc))
                log.error(message)
                _report(ERROR_FILE_ENV, message)
                raise SystemExit(exc.exit_code) from None
            except (Interrupted, KeyboardInterrupt) as exc:
                message = failure_message(name, tracking.failure_line(exc))
                log.warning(message)
                _report(ERROR_FILE_ENV, message)
                if isinstance(exc, KeyboardInterrupt):  # SIGINT outside our handler: the same exit, no traceback
                    raise Interrupted(signal.SIGINT) from None
                raise
            except Exception as exc:
                _report(ERROR_FILE_ENV, failure_message(name, tracking.failure_line(exc)))
                raise

        return wrapper  # type: ignore[return-value]

    return decorate


def _mlflow_run(cfg: RunConfig, pipeline_run_id: str) -> str:
    run_id = tracking.pipeline_run(
        tracking_uri(cfg), cfg.tracking.experiment, pipeline_run_id,
        run_name=f"{cfg.name}-{pipeline_run_id}", storage_root=cfg.storage.root,
    )
    _report(RUN_FILE_ENV, run_id)
    return run_id


@step("configure")
def configure(config_json: str, **parameters: Any) -> ConfigureOutputs:
    """Validate the run config once, up front, and cut out what each data stage depends on.
    `parameters`: the pipeline's run-form values (lmforge.config.run_parameters), empty or 0 for "as in config_json"."""
    from lmforge.config import run_parameters

    cfg = config_mod.from_dict(run_parameters.apply(json.loads(config_json), parameters))
    if run_parameters.in_kfp_pod(os.environ):
        cfg = run_parameters.for_cluster_pod(cfg, os.environ)
    return ConfigureOutputs(
        cfg.to_json(), config_mod.stage_json(cfg, "download"), config_mod.stage_json(cfg, "preprocess")
    )


@step("download")
def download(download_json: str) -> DownloadOutputs:
    """Cached by KFP on `download_json` (corpus and storage settings); logs nothing to MLflow for that
    reason: the train step records the corpus in the pipeline run's MLflow run."""
    from lmforge.data.download import download_corpus

    cfg = config_mod.from_stage_json(download_json)
    storage.use_endpoint(cfg.storage.s3_endpoint)
    key = config_mod.content_key(download_json)
    out = data_dir(cfg, "corpus", key)
    remote = storage.is_remote(out)
    if remote and storage.exists(storage.join(out, "manifest.json")):
        # Another run (or an earlier attempt of this one) published it: manifest.json is uploaded last.
        manifest = json.loads(storage.read_text(storage.join(out, "manifest.json")))
        log.info("corpus already in %s (sha256 %s)", out, manifest["sha256"])
        return DownloadOutputs(out, manifest["sha256"])
    local_out = scratch_dir("corpus") / key if remote else Path(out)
    cache = scratch_dir("cache") if remote else Path(cfg.storage.root) / "cache"
    manifest = download_corpus(
        cfg.corpus.source, local_out, sha256=cfg.corpus.sha256, size=cfg.corpus.size,
        members=dict(cfg.corpus.members), cache_dir=cache,
    )
    if remote:
        storage.put_dir(local_out, out, last="manifest.json")
    log.info("corpus in %s (sha256 %s)", out, manifest["sha256"])
    return DownloadOutputs(out, manifest["sha256"])


def log_run_inputs(cfg: RunConfig, corpus_dir: str, data_bin: str) -> None:
    """Record the run's config, corpus and data-bin in the active MLflow run (the data stages are cached)."""
    import mlflow

    tracking.log_params_flat(cfg.to_dict())
    manifest = json.loads(storage.read_text(storage.join(corpus_dir, "manifest.json")))
    mlflow.set_tags({
        "lmforge.version": __version__, "lmforge.config_hash": cfg.config_hash(),
        "lmforge.corpus_sha256": manifest["sha256"],
    })
    mlflow.log_dict(manifest, "corpus/manifest.json")
    tracking.log_corpus_inputs(cfg.corpus.source, manifest, cfg.name)
    summary_file = storage.join(data_bin, "summary.json")
    if storage.exists(summary_file):
        summary = json.loads(storage.read_text(summary_file))
        mlflow.log_metric("vocab_size", summary["vocab_size"])
        for split, numbers in summary["splits"].items():
            mlflow.log_metrics({f"{split}_tokens": numbers["tokens"], f"{split}_sentences": numbers["sentences"]})
        mlflow.set_tag("lmforge.dict_sha256", summary["dict_sha256"])
    dictionary = tasks.get(cfg.task).dictionary
    mlflow.log_text(storage.read_text(storage.join(data_bin, dictionary)), f"data-bin/{dictionary}")


def check_train_split(cfg: RunConfig, data_bin: str) -> None:
    """The train split's size against the run's training settings, before training starts: the data stages
    see only the preprocess settings (their cache must not depend on training), so this check is here."""
    from lmforge.data.corpus_checks import TrainingShape, enforce, review_training

    summary_file = storage.join(data_bin, "summary.json")
    if storage.exists(summary_file):
        train_split = json.loads(storage.read_text(summary_file))["splits"]["train"]
        enforce(review_training(train_split["tokens"], cfg.preprocess.checks, TrainingShape.from_config(cfg.train)))


@step("preprocess")
def preprocess(preprocess_json: str, corpus_dir: str, corpus_sha256: str) -> PreprocessOutputs:
    """Cached by KFP on its inputs: the preprocess settings and the corpus (by digest)."""
    from lmforge.data.preprocess import preprocess as build
    from lmforge.data.preprocess import settings_kwargs

    cfg = _preprocess_config(preprocess_json)
    out = data_dir(cfg, "data-bin", config_mod.content_key(preprocess_json, corpus_sha256))
    p = cfg.preprocess
    summary = build(corpus_dir, out, workers=p.workers, shards=max(p.shards, p.workers), **settings_kwargs(p),
                    checks=p.checks)
    return PreprocessOutputs(out, summary["dict_sha256"])


# --------------------------------------------------------------------------- preprocessing as map-reduce
# plan -> count (one task per shard) -> dictionary -> binarize (one per shard) -> merge; see
# lmforge.data.stages. Each takes only the preprocess settings, the corpus and upstream outputs, all
# content-addressed, so KFP's cache hits exactly when those are unchanged. No MLflow logging here.


# The fan-outs iterate over lists of JSON shard descriptors, and each stage adds what the next one
# needs: {"index", "ranges", "work_dir", "preprocess_json", "corpus_dir"} from the plan, then
# "count", then "dictionary", then "bin" (URIs). A task inside a ParallelFor takes only its
# descriptor: KFP's local runner (2.17) iterates only over a task's single output, and it replaces
# every input of a loop body that comes from another task's output by the loop item.


def _descriptors_in_order(items: list) -> list[dict[str, Any]]:
    """Shard descriptors collected from a fan-out, in shard order (a collection's order is not promised)."""
    return sorted((json.loads(x) for x in items), key=lambda d: int(d["index"]))


def _preprocess_config(preprocess_json: str) -> RunConfig:
    from lmforge.io import storage

    cfg = config_mod.from_stage_json(preprocess_json)
    storage.use_endpoint(cfg.storage.s3_endpoint)
    return cfg


@step("preprocess plan")
def preprocess_plan(preprocess_json: str, corpus_dir: str, corpus_sha256: str) -> list:
    """Tokenizer trained (or loaded) once, and the shard plan: one JSON descriptor per shard."""
    from lmforge.data.stages import Settings, prepare

    cfg = _preprocess_config(preprocess_json)
    work_dir = str(data_dir(cfg, "preprocess", config_mod.content_key(preprocess_json, corpus_sha256)))
    plan = prepare(corpus_dir, work_dir, Settings.from_config(cfg.preprocess), cfg.preprocess.shards,
                   cfg.preprocess.checks)
    common = {"work_dir": work_dir, "preprocess_json": preprocess_json, "corpus_dir": corpus_dir}
    return [json.dumps({**json.loads(shard.to_json()), **common}, sort_keys=True) for shard in plan]


@step("tokenize+count")
def preprocess_count(shard: str) -> str:
    """Map 1: one shard's ranges read, tokenized and counted."""
    from lmforge.data.stages import count_shard
    from lmforge.data.shards import Shard

    d = json.loads(shard)
    _preprocess_config(d["preprocess_json"])
    return json.dumps({**d, "count": count_shard(d["corpus_dir"], d["work_dir"], Shard.from_json(shard))},
                      sort_keys=True)


@step("dictionary")
def preprocess_dictionary(preprocess_json: str, counts: list) -> list:
    """Reduce: dict.txt from every shard's counts; the shards again, in order, for map 2."""
    from lmforge.data.stages import Settings, build_dictionary

    cfg = _preprocess_config(preprocess_json)
    shards = _descriptors_in_order(counts)
    work_dir = shards[0]["work_dir"]
    dictionary = build_dictionary(work_dir, [d["count"] for d in shards], Settings.from_config(cfg.preprocess),
                                  cfg.preprocess.checks)
    return [json.dumps({**d, "dictionary": dictionary}, sort_keys=True) for d in shards]


@step("binarize")
def preprocess_binarize(shard: str) -> str:
    """Map 2: one shard's ids through the dictionary into .bin parts and sentence sizes."""
    from lmforge.data.stages import binarize_shard

    d = json.loads(shard)
    _preprocess_config(d["preprocess_json"])
    return json.dumps({**d, "bin": binarize_shard(d["work_dir"], d["count"], d["dictionary"])}, sort_keys=True)


@step("merge")
def preprocess_merge(preprocess_json: str, corpus_sha256: str, parts: list) -> PreprocessOutputs:
    """The shards joined in order into the data-bin (dict.txt, .bin/.idx, summary.json, tokenizer)."""
    from lmforge.data.stages import merge_shards

    cfg = _preprocess_config(preprocess_json)
    shards = _descriptors_in_order(parts)
    out = str(data_dir(cfg, "data-bin", config_mod.content_key(preprocess_json, corpus_sha256)))
    summary = merge_shards(shards[0]["work_dir"], [d["bin"] for d in shards], shards[0]["dictionary"], out)
    return PreprocessOutputs(out, summary["dict_sha256"])


@step("train")
def train(config_json: str, pipeline_run_id: str, corpus_dir: str, data_bin: str) -> str:
    """Returns the best checkpoint's location: a path, or an s3:// URI when storage.root is on S3.

    The launcher is train.launcher: local processes (`lmforge run`'s default) or a PyTorchJob
    (the compiled pipeline's default) named after the pipeline run, so a retry attaches to it.
    """
    from lmforge.training.train import train as run_training

    cfg = config_mod.from_json(config_json)
    storage.use_endpoint(cfg.storage.s3_endpoint)
    checkpoint_uri = storage.join(run_dir(cfg, pipeline_run_id), "checkpoints")
    uri, run_id = tracking_uri(cfg), _mlflow_run(cfg, pipeline_run_id)
    with tracking.step_run(uri, run_id, "train"):
        import mlflow

        log_run_inputs(cfg, corpus_dir, data_bin)
        check_train_split(cfg, data_bin)
        summary = run_training(
            cfg, data_bin, checkpoint_uri, tracking_uri=uri, mlflow_run_id=run_id, pipeline_run_id=pipeline_run_id
        )
        mlflow.log_metrics({"epochs": summary["epochs"], "num_updates": summary["num_updates"]})
        if summary["best_valid_loss"] is not None:
            mlflow.log_metric("best_valid_loss", summary["best_valid_loss"])
        mlflow.set_tag("lmforge.checkpoints", checkpoint_uri)
        if not storage.is_remote(checkpoint_uri):  # on S3 they stay where they are: no second copy
            for name in ("checkpoint_best", "checkpoint_last"):
                mlflow.log_artifact(summary[name], "checkpoints")
    return summary["checkpoint_best"]


@step("evaluate")
def evaluate(config_json: str, pipeline_run_id: str, data_bin: str, checkpoint: str, metrics: Any = None) -> EvaluateOutputs:
    """`metrics` is the component's KFP Metrics artifact (None outside KFP): the Kubeflow UI shows it
    on the run page. The result, with its evaluation identity, also goes to MLflow and to
    `<run dir>/eval/metrics.json`, and as `evaluation_json` to the register step."""
    from lmforge.models.evaluate import evaluate as score
    from lmforge.models.evaluate import mlflow_metrics

    cfg = config_mod.from_json(config_json)
    storage.use_endpoint(cfg.storage.s3_endpoint)
    task = tasks.get(cfg.task)
    with tracking.step_run(tracking_uri(cfg), _mlflow_run(cfg, pipeline_run_id), "evaluate"):
        import mlflow

        result = score(cfg, data_bin, checkpoint)
        metrics_file = _write_eval_metrics(cfg, pipeline_run_id, result)
        numbers = mlflow_metrics(task, result)
        if metrics is not None:
            for key, value in numbers.items():
                metrics.log_metric(key, value)
        mlflow.log_metrics(numbers)
        mlflow.set_tags({"lmforge.eval_identity": result["identity_sha256"], "lmforge.eval_split": result["split"]})
        mlflow.log_dict(result, "eval/metrics.json")
    gate = task.gate_metric.name
    log.info("%s %s %.4g; identity %s", result["split"], gate, result[gate], result["identity_sha256"][:12])
    # The output is named `perplexity` in the compiled pipeline: the gate metric of the task.
    return EvaluateOutputs(result[gate], metrics_file, json.dumps(result, sort_keys=True))


def _write_eval_metrics(cfg: RunConfig, pipeline_run_id: str, result: dict) -> str:
    """metrics.json under the run's outputs (local, or uploaded when storage.root is s3://)."""
    from lmforge.models.evaluate import write_metrics

    uri = storage.join(run_dir(cfg, pipeline_run_id), "eval", "metrics.json")
    write_metrics(result, uri)
    return uri


@step("register")
def register(
    config_json: str, pipeline_run_id: str, data_bin: str, checkpoint: str, corpus_sha256: str, dict_sha256: str,
    evaluation_json: str,
) -> RegisterOutputs:
    """Register through the promotion gate; `evaluation_json` is the evaluate step's result."""
    from lmforge.models.register import register_model
    from lmforge.io.staging import fetched_dir, fetched_file

    cfg = config_mod.from_json(config_json)
    storage.use_endpoint(cfg.storage.s3_endpoint)
    uri, run_id = tracking_uri(cfg), _mlflow_run(cfg, pipeline_run_id)
    task = tasks.get(cfg.task)
    tags = {
        "corpus_sha256": corpus_sha256,
        "dict_sha256": dict_sha256,
        "config_hash": cfg.config_hash(),
        "pipeline_run_id": pipeline_run_id,
    }
    # The DAG's last step: it ends the pipeline's MLflow run (FINISHED, or FAILED when it fails).
    with tracking.step_run(uri, run_id, "register", last=True), \
            fetched_dir(data_bin) as data, fetched_file(checkpoint) as ckpt:
        result = register_model(
            checkpoint=ckpt, dict_path=data / task.dictionary, data_bin=data, model_name=cfg.registry.model_name,
            alias=cfg.registry.alias, challenger_alias=cfg.registry.challenger_alias, tracking_uri=uri,
            run_id=run_id, tags=tags, evaluation=json.loads(evaluation_json), task=cfg.task,
        )
    log.info("registered %s version %s as %s: %s", cfg.registry.model_name, result["version"], result["alias"],
             result["reason"])
    return RegisterOutputs(result["model_uri"], str(result["version"]), run_id)
