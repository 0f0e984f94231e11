"""The `lmforge` command: the whole pipeline, each step by hand, compile, and the worker.

    lmforge run --config pipelines/configs/tiny.yaml --corpus DIR [--runner docker]
    lmforge compile [--config FILE]
    lmforge submit|schedule|runs --host URL ...   (Kubeflow Pipelines)
    lmforge images build [--push REGISTRY] [--wheelhouse DIR] / lmforge images wheelhouse DIR
    lmforge download|preprocess|train|evaluate|register ...
    lmforge models [NAME] / lmforge promote NAME VERSION --reason TEXT
    lmforge worker ...            (what every training process runs)
    lmforge config show|docs

In: the command line. Out: the command's result on stdout (JSON or a table). `COMMANDS` is the
table from subcommand to one typed function; argparse only turns the command line into that
function's keyword arguments (every option's `dest` is a parameter name).

A user's mistake prints one line (`lmforge: error: ...`) and exits non-zero:
2 for an invalid config, 1 for anything else the user can fix.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge import __version__
from lmforge import config as config_mod
from lmforge.config import RunConfig
from lmforge.errors import ConfigError, LmforgeError
from lmforge.interrupts import Interrupted


def run_guarded(action: Callable[[], Any]) -> int:
    """Run `action`; a user error becomes one line on stderr and its exit status."""
    try:
        action()
    except LmforgeError as exc:
        print(f"lmforge: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except Interrupted as exc:
        print(f"lmforge: interrupted: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        print("lmforge: interrupted", file=sys.stderr)
        return 130
    return 0


def load_config(config: str | None, overrides: Sequence[str], *, corpus: str | None = None) -> RunConfig:
    """The run config a command names (the shipped wikitext-2 one by default), `--set` applied."""
    cfg = config_mod.load(config or config_mod.shipped_config_path("wikitext-2"), list(overrides))
    return config_mod.with_corpus(cfg, corpus) if corpus else cfg


def check_against_fairseq(cfg: RunConfig) -> None:
    """Names fairseq must know, checked before any step starts (fairseq imported only here)."""
    from lmforge import fairseq_api

    problems = config_mod.fairseq_problems(cfg, fairseq_api.architectures(), fairseq_api.criteria())
    if problems:
        raise ConfigError(problems)


# --------------------------------------------------------------------------- commands


def run(*, config: str | None, overrides: list[str], corpus: str | None, runner: str) -> None:
    from lmforge.pipeline.local_run import check_runner, run_pipeline

    cfg = config_mod.resolve_local_paths(load_config(config, overrides, corpus=corpus))
    # embedded: training runs on this machine even inside a pod (a notebook server), unless the config says pytorchjob
    cfg = cfg.resolve_launcher({})
    check_runner(cfg, runner)
    check_against_fairseq(cfg)
    result = run_pipeline(cfg, runner)
    print(f"test perplexity: {result['perplexity']:.2f}")
    print(f"outputs:         {result['run_dir']}")
    print(f"MLflow:          {result['tracking_uri']} (run {result['mlflow_run_id']})")
    print(f"model:           {result['model_uri']}")


def compile_(*, config: str | None, overrides: list[str], out_dir: str) -> None:
    from lmforge.pipeline.compile import compile_all

    for path in compile_all(Path(out_dir), load_config(config, overrides)):
        print(path)


def submit(*, config: str | None, overrides: list[str], host: str, token: str | None, experiment: str | None,
           name: str | None) -> None:
    from lmforge.pipeline.client import submit as submit_run

    result = submit_run(load_config(config, overrides), host, experiment=experiment, token=token, run_name=name)
    print(json.dumps(result, indent=2))


def schedule(*, config: str | None, overrides: list[str], host: str, token: str | None, experiment: str | None,
             cron: str, name: str | None) -> None:
    from lmforge.pipeline.client import schedule as schedule_runs

    result = schedule_runs(load_config(config, overrides), host, cron, experiment=experiment, token=token, name=name)
    print(json.dumps(result, indent=2))


def runs(*, config: str | None, overrides: list[str], host: str, token: str | None, experiment: str | None,
         limit: int, json_output: bool) -> None:
    from lmforge.pipeline.client import format_runs, list_runs

    listing = list_runs(load_config(config, overrides), host, experiment=experiment, token=token, limit=limit)
    print(json.dumps(listing, indent=2) if json_output else format_runs(listing))


def images(*, action: str, directory: str | None, push: str | None, context: str, role: list[str] | None,
           base_image: str | None, wheelhouse: str | None, trainer_variant: str, torch_variant: str,
           torch_index: str | None) -> None:
    if action == "wheelhouse":
        from lmforge.pipeline.wheelhouse import fill_wheelhouse

        if not directory:
            raise LmforgeError("lmforge images wheelhouse needs the directory to fill: lmforge images wheelhouse DIR")
        fill_wheelhouse(Path(context), Path(directory), variant=torch_variant, index=torch_index)
        return
    from lmforge.pipeline.image_build import build_images

    if directory:
        raise LmforgeError(f"lmforge images build takes no directory ({directory}); did you mean --wheelhouse {directory}?")
    specs = build_images(Path(context), registry=push, roles=role or None, base_image=base_image,
                         wheelhouse=Path(wheelhouse) if wheelhouse else None, trainer_variant=trainer_variant)
    for spec in specs:
        print(" ".join(spec.tags))


def corpora() -> None:
    from lmforge.data.catalog import format_catalog, list_corpora

    print(format_catalog(list_corpora()))


def download(*, source: str, out: str, sha256: str | None, size: int | None, cache_dir: str | None,
             endpoint_url: str | None) -> None:
    from lmforge.data.download import download_corpus

    manifest = download_corpus(source, out, sha256=sha256, size=size, cache_dir=cache_dir, endpoint_url=endpoint_url)
    print(json.dumps(manifest, indent=2))


def preprocess(*, config: str | None, overrides: list[str], corpus: str, out: str, workers: int, shards: int) -> None:
    from lmforge.data.corpus_checks import TrainingShape
    from lmforge.data.preprocess import preprocess as build
    from lmforge.data.preprocess import settings_kwargs
    from lmforge.io import storage

    cfg = load_config(config, overrides)
    storage.use_endpoint(cfg.storage.s3_endpoint)
    p = cfg.preprocess
    workers = workers or p.workers
    # The config's training settings are known here: a train split too small for them is refused now.
    summary = build(corpus, out, workers=workers, shards=shards or max(p.shards, workers), **settings_kwargs(p),
                    checks=p.checks, shape=TrainingShape.from_config(cfg.train))
    print(json.dumps(summary, indent=2))


def train(*, config: str | None, overrides: list[str], data_bin: str, checkpoints: str, dry_run: bool) -> None:
    from lmforge.training import train as training

    cfg = load_config(config, overrides)
    check_against_fairseq(cfg)
    run_it = training.dry_run if dry_run else training.train
    print(json.dumps(run_it(cfg, data_bin, checkpoints), indent=2))


def evaluate(*, config: str | None, overrides: list[str], data_bin: str, checkpoint: str, out: str | None) -> None:
    from lmforge.models.evaluate import evaluate as score
    from lmforge.models.evaluate import write_metrics

    result = score(load_config(config, overrides), data_bin, checkpoint)
    if out:
        write_metrics(result, Path(out))
    print(json.dumps(result, indent=2, sort_keys=True))


def register(*, config: str | None, overrides: list[str], data_bin: str, checkpoint: str, run_id: str | None,
             metrics: str | None) -> None:
    """The register step itself (`lmforge.steps.register`), fed what a pipeline run would feed it."""
    from lmforge import steps
    from lmforge.data import integrity
    from lmforge.io.hashing import file_sha256
    from lmforge.models.evaluate import evaluate as score
    from lmforge.models.evaluate import read_metrics

    cfg = config_mod.resolve_storage(load_config(config, overrides))
    for path, what in ((Path(checkpoint), "checkpoint"), (Path(data_bin) / "dict.txt", "dictionary")):
        if not path.is_file():  # checked before a tracking run is created for nothing
            prefix = "checkpoint without its dictionary: " if what == "dictionary" else ""
            raise LmforgeError(
                f"{prefix}{what} {path} does not exist; pass --checkpoint FILE and --data-bin DIR with dict.txt"
            )
    unreadable = integrity.model_problems(checkpoint, Path(data_bin) / "dict.txt")
    if unreadable:
        raise LmforgeError("cannot register: " + "; ".join(unreadable))
    # The gate needs the evaluation: the one `lmforge evaluate --out` wrote, or a fresh one.
    evaluation = read_metrics(metrics) if metrics else score(cfg, data_bin, checkpoint)
    if run_id:
        from lmforge import tracking

        experiment, pipeline_run_id = tracking.adopt_run(registry_client(cfg), run_id)
        cfg = cfg.replace(tracking=config_mod.TrackingConfig(uri=cfg.tracking.uri, experiment=experiment))
    else:
        pipeline_run_id = f"manual-{Path(checkpoint).resolve().parent.name}"
    # The step undecorated (inspect.unwrap follows functools.wraps): a user's mistake then reaches
    # run_guarded and prints as `lmforge: error: ...`, not as the pipeline step's log line.
    register_step = inspect.unwrap(steps.register)
    result = register_step(
        cfg.to_json(), pipeline_run_id, data_bin, checkpoint,
        "",  # corpus_sha256: not known outside a pipeline run (the corpus never passed through here)
        file_sha256(Path(data_bin) / "dict.txt"),
        json.dumps(evaluation, sort_keys=True),
    )
    print(json.dumps(registered(cfg, result), indent=2))


def registered(cfg: RunConfig, outputs: Any) -> dict[str, str]:
    """What `lmforge register` prints: the step's outputs, and the gate's decision from the version's tags."""
    from lmforge.models.promotion import TAG_REASON

    tags = registry_client(cfg).get_model_version(cfg.registry.model_name, outputs.version).tags
    return {"model_uri": outputs.model_uri, "version": outputs.version, "run_id": outputs.mlflow_run_id,
            "alias": outputs.model_uri.rsplit("@", 1)[-1], "reason": tags.get(TAG_REASON, "")}


def registry_client(cfg: RunConfig, tracking_uri: str | None = None, *, existing: bool = False) -> Any:
    """An MlflowClient of `tracking_uri`, else of the config's tracking (storage.root made absolute first).
    `existing`: the tracking store must exist already (models, promote: they never create one)."""
    from mlflow import MlflowClient

    from lmforge import tracking

    cfg = config_mod.resolve_storage(cfg)
    uri = tracking_uri or tracking.resolve_tracking_uri(cfg.tracking.uri, cfg.storage.root)
    return tracking.existing_registry_client(uri) if existing else MlflowClient(tracking_uri=uri)


def models(*, config: str | None, overrides: list[str], name: str | None, alias: str | None,
           tracking_uri: str | None) -> None:
    from lmforge.models import promotion

    client = registry_client(load_config(config, overrides), tracking_uri, existing=True)
    if not name:
        rows = promotion.describe_models(client)
        if not rows:
            print("no registered models")
        for row in rows:
            print(f"{row['name']}  latest v{row['latest']}  {row['aliases']}")
        return
    if alias:
        version = promotion.resolve_version(client, name, alias)
        print(json.dumps({"version": str(version.version), "run_id": version.run_id, "tags": dict(version.tags)},
                         indent=2, sort_keys=True))
        return
    for row in promotion.describe_versions(client, name):
        line = f"v{row['version']:<4} {row['aliases'] or '-':<22} ppl {row['perplexity'] or '-':<12} " \
               f"identity {row['identity'] or '-':<12} {row['reason']}"
        if row["override"]:
            line += f" [override: {row['override']}]"
        print(line)


def promote(*, config: str | None, overrides: list[str], name: str, version: str, to: str | None, reason: str,
            by: str | None, tracking_uri: str | None) -> None:
    from lmforge.models import promotion

    cfg = load_config(config, overrides)
    client = registry_client(cfg, tracking_uri, existing=True)
    result = promotion.promote(client, name, version, to or cfg.registry.alias, reason=reason, by=by)
    print(json.dumps(result, indent=2))


def config_(*, config: str | None, overrides: list[str], action: str) -> None:
    if action == "docs":
        for name, text, default in config_mod.field_docs():
            print(f"{name} (default {json.dumps(default)}):\n    {text}")
        return
    print(json.dumps(load_config(config, overrides).to_dict(), indent=2))


def worker(*, config: str, data: str, save_dir: str, tracking_uri: str, mlflow_run_id: str, cache_dir: str) -> None:
    from lmforge.training import worker as training_worker

    # run_from_args takes the worker's own parsed options (lmforge.training.worker.add_arguments adds them).
    args = argparse.Namespace(config=config, data=data, save_dir=save_dir, tracking_uri=tracking_uri,
                              mlflow_run_id=mlflow_run_id, cache_dir=cache_dir)
    # The status carries meaning for a PyTorchJob's restart policy (138, 143: retry): pass it on as it is.
    raise SystemExit(training_worker.run_from_args(args))


# --------------------------------------------------------------------------- options


def config_options(parser: argparse.ArgumentParser, *, default: str | None = "wikitext-2") -> None:
    parser.add_argument(
        "--config", "-c", default=None,
        help=f"run config YAML (default: the shipped {default} config)" if default else "run config YAML",
    )
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
        help="override one config field, e.g. --set train.max_epoch=3 (repeatable)",
    )


def kfp_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", required=True, help="Kubeflow Pipelines API URL, e.g. http://localhost:8080")
    parser.add_argument("--token", help="bearer token (default: LMFORGE_KFP_TOKEN, else a pod's KFP service-account token)")
    parser.add_argument("--experiment", help="KFP experiment (default: tracking.experiment of the config)")
    config_options(parser)


def run_options(p: argparse.ArgumentParser) -> None:
    from lmforge.pipeline.local_run import RUNNERS

    config_options(p)
    p.add_argument("--corpus", help="local corpus directory (train.txt, valid.txt, test.txt); replaces corpus.source")
    p.add_argument("--runner", choices=RUNNERS, default="subprocess",
                   help="subprocess: every step a process of this Python (default); docker: every step a "
                        "container of the steps image (`lmforge images build --role steps`)")


def compile_options(p: argparse.ArgumentParser) -> None:
    config_options(p)  # its cluster section sets each task's pod; the whole config is the UI's default
    p.add_argument("--out-dir", default=".", help="repository root to write pipelines/ and components/ into")


def submit_options(p: argparse.ArgumentParser) -> None:
    kfp_options(p)
    p.add_argument("--name", help="run name (default: <config name>-<time>)")


def schedule_options(p: argparse.ArgumentParser) -> None:
    kfp_options(p)
    p.add_argument("--cron", required=True, help="KFP cron, 6 fields with seconds first, e.g. '0 0 3 * * 0'")
    p.add_argument("--name", help="recurring run name (default: <config name>-retraining)")


def runs_options(p: argparse.ArgumentParser) -> None:
    kfp_options(p)
    p.add_argument("--limit", type=int, default=20, help="newest runs to show")
    p.add_argument("--json", dest="json_output", action="store_true", help="print JSON")


def images_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["build", "wheelhouse"],
                   help="build: the images; wheelhouse DIR: fill DIR with every wheel they install")
    p.add_argument("directory", nargs="?", help="wheelhouse: the directory to fill")
    p.add_argument("--context", default=".", help="lmforge source checkout (default: the current directory)")
    build = p.add_argument_group("build")
    build.add_argument("--push", metavar="REGISTRY", help="also tag as REGISTRY/lmforge-<role>:<version> and push")
    build.add_argument("--role", action="append", choices=["steps", "trainer"], help="only this image (repeatable)")
    build.add_argument("--base-image", help="the images' base (default: python:3.11-slim-bookworm)")
    build.add_argument("--wheelhouse", metavar="DIR",
                       help="install only from this filled wheelhouse; the build then has no network")
    build.add_argument("--trainer-variant", default="cu126", metavar="VARIANT",
                       help="the trainer's torch build: cu126 (default), another cuXYZ, or cpu")
    fill = p.add_argument_group("wheelhouse")
    fill.add_argument("--torch-variant", default="cpu", metavar="VARIANT", help="torch build to fetch (default: cpu)")
    fill.add_argument("--torch-index", metavar="URL",
                      help="where torch comes from (default: PyTorch's index for the variant; '' = pip's sources)")


def download_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--source", required=True,
        help="catalog name (see `lmforge corpora`), directory, file, file://, http(s):// or s3:// URI",
    )
    p.add_argument("--endpoint-url", help="S3 endpoint (default: AWS_ENDPOINT_URL)")
    p.add_argument("--out", required=True, help="output corpus directory")
    p.add_argument("--sha256", help="pinned sha256 of the downloaded file")
    p.add_argument("--size", type=int, help="pinned size in bytes")
    p.add_argument("--cache-dir", help="content-addressed download cache")


def preprocess_options(p: argparse.ArgumentParser) -> None:
    config_options(p)
    p.add_argument("--corpus", required=True, help="directory (or s3:// prefix) with train.txt, valid.txt, test.txt")
    p.add_argument("--out", required=True, help="output data-bin directory")
    p.add_argument("--workers", type=int, default=0, help="processes (default: preprocess.workers)")
    p.add_argument("--shards", type=int, default=0,
                   help="byte ranges per split (default: preprocess.shards, at least one per worker)")


def train_options(p: argparse.ArgumentParser) -> None:
    config_options(p)
    p.add_argument("--data-bin", required=True, help="preprocess output")
    p.add_argument(
        "--checkpoints", required=True, help="checkpoint directory or s3:// URI (training resumes from what it holds)"
    )
    p.add_argument(
        "--dry-run", action="store_true",
        help="check config, data-bin and environment, estimate updates/epoch and tokens/update, run one batch, stop",
    )


def evaluate_options(p: argparse.ArgumentParser) -> None:
    config_options(p)
    p.add_argument("--data-bin", required=True)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", help="also write the result (numbers and evaluation identity) to this metrics.json")


def register_options(p: argparse.ArgumentParser) -> None:
    config_options(p)
    p.add_argument("--data-bin", required=True, help="directory holding the checkpoint's dict.txt")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--run-id", help="MLflow run to log the model into (default: a new one)")
    p.add_argument("--metrics", help="metrics.json from `lmforge evaluate --out` (default: evaluate now)")


def models_options(p: argparse.ArgumentParser) -> None:
    config_options(p)
    p.add_argument("name", nargs="?", help="registered model name (default: list the names)")
    p.add_argument("--alias", help="show the version this alias (or version number) points at, with its tags")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: from the config)")


def promote_options(p: argparse.ArgumentParser) -> None:
    config_options(p)
    p.add_argument("name", help="registered model name")
    p.add_argument("version", help="version number or an alias naming it (e.g. challenger)")
    p.add_argument("--to", help="alias to set (default: registry.alias, the champion)")
    p.add_argument("--reason", required=True, help="why; kept as the version's lmforge.override tag")
    p.add_argument("--by", help="who (default: the current user)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: from the config)")


def config_command_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["show", "docs"])
    config_options(p)


def worker_options(p: argparse.ArgumentParser) -> None:
    from lmforge.training.worker import add_arguments

    add_arguments(p)


# --------------------------------------------------------------------------- the command table


@dataclass(frozen=True)
class Command:
    function: Callable[..., None]  # called with the parsed options as keyword arguments
    help: str
    options: Callable[[argparse.ArgumentParser], None] | None = None


COMMANDS: dict[str, Command] = {
    "run": Command(run, "run the whole pipeline on this machine (KFP local runner)", run_options),
    "compile": Command(compile_, "compile the pipeline and components to YAML for Kubeflow", compile_options),
    "submit": Command(submit, "upload the pipeline to Kubeflow Pipelines and start a run", submit_options),
    "schedule": Command(schedule, "a recurring run for scheduled retraining (one at a time, no catch-up)",
                        schedule_options),
    "runs": Command(runs, "list runs and recurring runs on Kubeflow Pipelines", runs_options),
    "images": Command(images, "build (and push) the steps and trainer images with Docker; fill a wheelhouse", images_options),
    "corpora": Command(corpora, "list the named corpora a config's corpus.source accepts"),
    "download": Command(download, "fetch and verify a corpus into a directory", download_options),
    "preprocess": Command(preprocess, "dict.txt and binarized splits, as fairseq-preprocess --only-source",
                          preprocess_options),
    "train": Command(train, "train with fairseq through the configured launcher", train_options),
    "evaluate": Command(evaluate, "loss and perplexity with fairseq's eval-lm logic", evaluate_options),
    "register": Command(register, "register a checkpoint in the MLflow model registry", register_options),
    "models": Command(models, "registered models; a name's versions, aliases and promotion reasons", models_options),
    "promote": Command(promote, "point an alias at a version by hand, recording who and why", promote_options),
    "config": Command(config_, "show the resolved config, or document every field", config_command_options),
    "worker": Command(worker, "one training process (started by torchrun or a PyTorchJob)", worker_options),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmforge", description="Train, evaluate and register fairseq language models.")
    parser.add_argument("--version", action="version", version=f"lmforge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in COMMANDS.items():
        p = sub.add_parser(name, help=command.help)
        if command.options is not None:
            command.options(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    from lmforge.logs import setup_logging

    setup_logging()
    options = vars(build_parser().parse_args(argv))
    command = COMMANDS[options.pop("command")]
    return run_guarded(lambda: command.function(**options))


if __name__ == "__main__":
    raise SystemExit(main())
