"""The pipeline's steps: each runs one stage inside the pipeline run's MLflow run.

In: the run config as JSON (as the pipeline parameter carries it), the pipeline
run id and the upstream steps' outputs (paths). Out: the stage's outputs, as
paths and digests for the downstream steps. A KFP component's body is one
import and one call to a function here; `lmforge run` executes the very same
functions through KFP's local runner.

Outputs of a pipeline run live under `<storage.root>/<name>/<pipeline run id>/`.
A step that fails on the user's input prints one line and exits non-zero; when
LMFORGE_ERROR_FILE is set (by `lmforge run`) the line is also written there, so
the command that started the pipeline can repeat it.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

from lmforge import __version__, tracking
from lmforge import config as config_mod
from lmforge.config import RunConfig
from lmforge.errors import LmforgeError
from lmforge.logs import setup_logging

log = logging.getLogger(__name__)
ERROR_FILE_ENV = "LMFORGE_ERROR_FILE"
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


def run_dir(cfg: RunConfig, pipeline_run_id: str) -> Path:
    return Path(cfg.storage.root) / cfg.name / pipeline_run_id


def data_dir(cfg: RunConfig, kind: str, key: str) -> Path:
    """Where a data stage's output lives: named by content, shared by every run that needs it."""
    return Path(cfg.storage.root) / "data" / kind / key


def tracking_uri(cfg: RunConfig) -> str:
    return tracking.resolve_tracking_uri(cfg.tracking.uri, cfg.storage.root)


def step(name: str) -> Callable[[F], F]:
    """Logging set up, user errors turned into one line and an exit status."""

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            setup_logging()
            try:
                return fn(*args, **kwargs)
            except LmforgeError as exc:
                message = f"{name} step: {exc}"
                log.error(message)
                error_file = os.environ.get(ERROR_FILE_ENV)
                if error_file:
                    Path(error_file).write_text(message + "\n")
                raise SystemExit(exc.exit_code) from None

        return wrapper  # type: ignore[return-value]

    return decorate


def _mlflow_run(cfg: RunConfig, pipeline_run_id: str) -> str:
    return tracking.pipeline_run(
        tracking_uri(cfg), cfg.tracking.experiment, pipeline_run_id,
        run_name=f"{cfg.name}-{pipeline_run_id}", storage_root=cfg.storage.root,
    )


@step("configure")
def configure(config_json: str) -> ConfigureOutputs:
    """Validate the run config once, up front, and cut out what each data stage depends on."""
    cfg = config_mod.from_json(config_json)
    return ConfigureOutputs(
        cfg.to_json(), config_mod.stage_json(cfg, "download"), config_mod.stage_json(cfg, "preprocess")
    )


@step("download")
def download(download_json: str) -> DownloadOutputs:
    """Cached by KFP on `download_json` (corpus and storage settings); logs nothing to MLflow for that
    reason: the train step records the corpus in the pipeline run's MLflow run."""
    from lmforge.download import download_corpus

    cfg = config_mod.from_stage_json(download_json)
    out = data_dir(cfg, "corpus", config_mod.content_key(download_json))
    manifest = download_corpus(
        cfg.corpus.source, out, sha256=cfg.corpus.sha256, size=cfg.corpus.size,
        members=dict(cfg.corpus.members), cache_dir=Path(cfg.storage.root) / "cache",
    )
    log.info("corpus in %s (sha256 %s)", out, manifest["sha256"])
    return DownloadOutputs(str(out), manifest["sha256"])


def log_run_inputs(cfg: RunConfig, corpus_dir: str, data_bin: str) -> None:
    """Record the run's config, corpus and data-bin in the active MLflow run (the data stages are cached)."""
    import mlflow

    tracking.log_params_flat(cfg.to_dict())
    manifest = json.loads((Path(corpus_dir) / "manifest.json").read_text())
    mlflow.set_tags({
        "lmforge.version": __version__, "lmforge.config_hash": cfg.config_hash(),
        "lmforge.corpus_sha256": manifest["sha256"],
    })
    mlflow.log_dict(manifest, "corpus/manifest.json")
    tracking.log_corpus_inputs(cfg.corpus.source, manifest, cfg.name)
    summary_file = Path(data_bin) / "summary.json"
    if summary_file.is_file():
        summary = json.loads(summary_file.read_text())
        mlflow.log_metric("vocab_size", summary["vocab_size"])
        for split, numbers in summary["splits"].items():
            mlflow.log_metrics({f"{split}_tokens": numbers["tokens"], f"{split}_sentences": numbers["sentences"]})
        mlflow.set_tag("lmforge.dict_sha256", summary["dict_sha256"])
    mlflow.log_artifact(str(Path(data_bin) / "dict.txt"), "data-bin")


@step("preprocess")
def preprocess(preprocess_json: str, corpus_dir: str, corpus_sha256: str) -> PreprocessOutputs:
    """Cached by KFP on its inputs: the preprocess settings and the corpus (by digest)."""
    from lmforge.preprocess import preprocess as build

    cfg = config_mod.from_stage_json(preprocess_json)
    out = data_dir(cfg, "data-bin", config_mod.content_key(preprocess_json, corpus_sha256))
    p = cfg.preprocess
    summary = build(
        corpus_dir, out, threshold=p.threshold, nwords=p.nwords, padding_factor=p.padding_factor, workers=p.workers
    )
    return PreprocessOutputs(str(out), summary["dict_sha256"])


@step("train")
def train(config_json: str, pipeline_run_id: str, corpus_dir: str, data_bin: str) -> str:
    """Returns the best checkpoint's path."""
    from lmforge.train import train as run_training

    cfg = config_mod.from_json(config_json)
    save_dir = run_dir(cfg, pipeline_run_id) / "checkpoints"
    uri, run_id = tracking_uri(cfg), _mlflow_run(cfg, pipeline_run_id)
    with tracking.active_run(uri, run_id):
        log_run_inputs(cfg, corpus_dir, data_bin)
    summary = run_training(cfg, data_bin, save_dir, tracking_uri=uri, mlflow_run_id=run_id)
    with tracking.active_run(uri, run_id):
        import mlflow

        mlflow.log_metrics({"epochs": summary["epochs"], "num_updates": summary["num_updates"]})
        if summary["best_valid_loss"] is not None:
            mlflow.log_metric("best_valid_loss", summary["best_valid_loss"])
        for name in ("checkpoint_best", "checkpoint_last"):
            mlflow.log_artifact(summary[name], "checkpoints")
    return summary["checkpoint_best"]


@step("evaluate")
def evaluate(config_json: str, pipeline_run_id: str, data_bin: str, checkpoint: str, metrics: Any = None) -> EvaluateOutputs:
    """`metrics` is the component's KFP Metrics artifact (None outside KFP): the Kubeflow UI shows it
    on the run page. The result, with its evaluation identity, also goes to MLflow and to
    `<run dir>/eval/metrics.json`, and as `evaluation_json` to the register step."""
    from lmforge.evaluate import evaluate as score
    from lmforge.evaluate import mlflow_metrics

    from lmforge import storage

    cfg = config_mod.from_json(config_json)
    storage.use_endpoint(cfg.storage.s3_endpoint)
    result = score(cfg, data_bin, checkpoint)
    metrics_file = _write_eval_metrics(cfg, pipeline_run_id, result)
    numbers = mlflow_metrics(result)
    if metrics is not None:
        for key, value in numbers.items():
            metrics.log_metric(key, value)
    with tracking.active_run(tracking_uri(cfg), _mlflow_run(cfg, pipeline_run_id)):
        import mlflow

        mlflow.log_metrics(numbers)
        mlflow.set_tags({"lmforge.eval_identity": result["identity_sha256"], "lmforge.eval_split": result["split"]})
        mlflow.log_dict(result, "eval/metrics.json")
    log.info("%s perplexity %.2f (loss %.4f base 2) over %d tokens; identity %s", result["split"],
             result["perplexity"], result["loss_base2"], result["tokens"], result["identity_sha256"][:12])
    return EvaluateOutputs(result["perplexity"], metrics_file, json.dumps(result, sort_keys=True))


def _write_eval_metrics(cfg: RunConfig, pipeline_run_id: str, result: dict) -> str:
    """metrics.json under the run's outputs (local, or uploaded when storage.root is s3://)."""
    import tempfile

    from lmforge import storage
    from lmforge.evaluate import write_metrics

    uri = storage.join(cfg.storage.root, cfg.name, pipeline_run_id, "eval", "metrics.json")
    if not storage.is_remote(uri):
        write_metrics(result, Path(uri))
        return uri
    with tempfile.TemporaryDirectory(prefix="lmforge-eval-") as tmp:
        write_metrics(result, Path(tmp) / "metrics.json")
        storage.put_file(Path(tmp) / "metrics.json", uri)
    return uri


@step("register")
def register(
    config_json: str, pipeline_run_id: str, data_bin: str, checkpoint: str, corpus_sha256: str, dict_sha256: str,
    evaluation_json: str,
) -> RegisterOutputs:
    """Register through the promotion gate; `evaluation_json` is the evaluate step's result."""
    from lmforge.register import register_model
    from lmforge import storage
    from lmforge.staging import local_dir, local_file

    cfg = config_mod.from_json(config_json)
    storage.use_endpoint(cfg.storage.s3_endpoint)
    uri, run_id = tracking_uri(cfg), _mlflow_run(cfg, pipeline_run_id)
    tags = {
        "corpus_sha256": corpus_sha256,
        "dict_sha256": dict_sha256,
        "config_hash": cfg.config_hash(),
        "pipeline_run_id": pipeline_run_id,
    }
    with local_dir(data_bin) as data, local_file(checkpoint) as ckpt:
        result = register_model(
            checkpoint=ckpt, dict_path=data / "dict.txt", data_bin=data, model_name=cfg.registry.model_name,
            alias=cfg.registry.alias, challenger_alias=cfg.registry.challenger_alias, tracking_uri=uri,
            run_id=run_id, tags=tags, evaluation=json.loads(evaluation_json),
        )
    log.info("registered %s version %s as %s: %s", cfg.registry.model_name, result["version"], result["alias"],
             result["reason"])
    return RegisterOutputs(result["model_uri"], str(result["version"]), run_id)
