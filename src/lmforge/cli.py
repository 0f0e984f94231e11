"""The `lmforge` command: the whole pipeline, each step by hand, compile, and the worker.

    lmforge run --config pipelines/configs/tiny.yaml --corpus DIR
    lmforge compile [--config FILE]
    lmforge submit|schedule|runs --host URL ...   (Kubeflow Pipelines)
    lmforge images build [--push REGISTRY]
    lmforge download|preprocess|train|evaluate|register ...
    lmforge models [NAME] / lmforge promote NAME VERSION --reason TEXT
    lmforge worker ...            (what every training process runs)
    lmforge config show|docs

A user's mistake prints one line (`lmforge: error: ...`) and exits non-zero:
2 for an invalid config, 1 for anything else the user can fix.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lmforge import __version__
from lmforge import config as config_mod
from lmforge.config import RunConfig
from lmforge.errors import ConfigError, LmforgeError


def run_guarded(action: Callable[[], Any]) -> int:
    """Run `action`; a user error becomes one line on stderr and its exit status."""
    try:
        action()
    except LmforgeError as exc:
        print(f"lmforge: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("lmforge: interrupted", file=sys.stderr)
        return 130
    return 0


# --------------------------------------------------------------------------- config helpers


def add_config_arguments(parser: argparse.ArgumentParser, *, default: str | None = "wikitext-2") -> None:
    parser.add_argument(
        "--config", "-c", default=None,
        help=f"run config YAML (default: the shipped {default} config)" if default else "run config YAML",
    )
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
        help="override one config field, e.g. --set train.max_epoch=3 (repeatable)",
    )


def load_config(args: argparse.Namespace, *, corpus: str | None = None) -> RunConfig:
    path = args.config or config_mod.shipped_config_path("wikitext-2")
    overrides = list(args.overrides)
    cfg = config_mod.load(path, overrides)
    if corpus:
        # A corpus given on the command line replaces the config's source and
        # everything that described that source (pins, archive members).
        cfg = cfg.replace(corpus=config_mod.CorpusConfig(source=corpus))
    return cfg


def resolve_local_paths(cfg: RunConfig) -> RunConfig:
    """Absolute paths for the local parts of the config: steps run in other processes and directories."""
    from lmforge.data import catalog

    corpus = cfg.corpus
    if "://" not in corpus.source and catalog.lookup(corpus.source) is None:
        source = Path(corpus.source).expanduser()
        if not source.exists():
            raise LmforgeError(
                f"corpus {corpus.source} does not exist; pass --corpus DIR (train.txt, valid.txt, test.txt) "
                "or set corpus.source"
            )
        corpus = config_mod.CorpusConfig(
            source=str(source.resolve()), sha256=corpus.sha256, size=corpus.size, members=corpus.members
        )
    return resolve_storage(cfg.replace(corpus=corpus))


def check_against_fairseq(cfg: RunConfig) -> None:
    """Names fairseq must know, checked before any step starts."""
    from lmforge import fairseq_api

    problems = []
    if cfg.model.arch not in fairseq_api.architectures():
        lm_archs = sorted(a for a in fairseq_api.architectures() if "lm" in a)
        problems.append(f"model.arch: unknown fairseq architecture {cfg.model.arch!r} (language models: {', '.join(lm_archs)})")
    if cfg.model.criterion not in fairseq_api.criteria():
        problems.append(f"model.criterion: unknown fairseq criterion {cfg.model.criterion!r}")
    if problems:
        raise ConfigError(problems)


# --------------------------------------------------------------------------- commands


def cmd_run(args: argparse.Namespace) -> None:
    from lmforge.pipeline.local_run import run_pipeline

    cfg = resolve_local_paths(load_config(args, corpus=args.corpus))
    # embedded: training runs on this machine even inside a pod (a notebook server), unless the config says pytorchjob
    cfg = config_mod.resolve_launcher(cfg, {})
    check_against_fairseq(cfg)
    result = run_pipeline(cfg)
    print(f"test perplexity: {result['perplexity']:.2f}")
    print(f"outputs:         {result['run_dir']}")
    print(f"MLflow:          {result['tracking_uri']} (run {result['mlflow_run_id']})")
    print(f"model:           {result['model_uri']}")


def cmd_compile(args: argparse.Namespace) -> None:
    from lmforge.pipeline.compile import compile_all

    for path in compile_all(Path(args.out_dir), load_config(args)):
        print(path)


def cmd_submit(args: argparse.Namespace) -> None:
    from lmforge.pipeline.client import submit

    result = submit(load_config(args), args.host, experiment=args.experiment, token=args.token, run_name=args.name)
    print(json.dumps(result, indent=2))


def cmd_schedule(args: argparse.Namespace) -> None:
    from lmforge.pipeline.client import schedule

    result = schedule(load_config(args), args.host, args.cron, experiment=args.experiment, token=args.token,
                      name=args.name)
    print(json.dumps(result, indent=2))


def cmd_runs(args: argparse.Namespace) -> None:
    from lmforge.pipeline.client import format_runs, list_runs

    listing = list_runs(load_config(args), args.host, experiment=args.experiment, token=args.token, limit=args.limit)
    print(json.dumps(listing, indent=2) if args.json else format_runs(listing))


def cmd_images(args: argparse.Namespace) -> None:
    from lmforge.pipeline.image_build import build_images

    for spec in build_images(Path(args.context), registry=args.push, roles=args.role or None):
        print(" ".join(spec.tags))


def add_kfp_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", required=True, help="Kubeflow Pipelines API URL, e.g. http://localhost:8080")
    parser.add_argument("--token", help="bearer token (default: LMFORGE_KFP_TOKEN, else a pod's KFP service-account token)")
    parser.add_argument("--experiment", help="KFP experiment (default: tracking.experiment of the config)")
    add_config_arguments(parser)


def cmd_corpora(args: argparse.Namespace) -> None:
    from lmforge.data.catalog import format_catalog, list_corpora

    print(format_catalog(list_corpora()))


def cmd_download(args: argparse.Namespace) -> None:
    from lmforge.data.download import download_corpus

    manifest = download_corpus(
        args.source, args.out, sha256=args.sha256, size=args.size, cache_dir=args.cache_dir,
        endpoint_url=args.endpoint_url,
    )
    print(json.dumps(manifest, indent=2))


def cmd_preprocess(args: argparse.Namespace) -> None:
    from lmforge.io import storage
    from lmforge.data.preprocess import preprocess, settings_kwargs

    cfg = load_config(args)
    storage.use_endpoint(cfg.storage.s3_endpoint)
    p = cfg.preprocess
    workers = args.workers or p.workers
    summary = preprocess(args.corpus, args.out, workers=workers, shards=args.shards or max(p.shards, workers),
                         **settings_kwargs(p))
    print(json.dumps(summary, indent=2))


def cmd_train(args: argparse.Namespace) -> None:
    from lmforge.training.train import dry_run, train

    cfg = load_config(args)
    check_against_fairseq(cfg)
    if args.dry_run:
        print(json.dumps(dry_run(cfg, args.data_bin, args.checkpoints), indent=2))
        return
    print(json.dumps(train(cfg, args.data_bin, args.checkpoints), indent=2))


def cmd_evaluate(args: argparse.Namespace) -> None:
    from lmforge.models.evaluate import evaluate, write_metrics

    result = evaluate(load_config(args), args.data_bin, args.checkpoint)
    if args.out:
        write_metrics(result, Path(args.out))
    print(json.dumps(result, indent=2, sort_keys=True))


def cmd_register(args: argparse.Namespace) -> None:
    from lmforge import tracking
    from lmforge.models.evaluate import evaluate, read_metrics
    from lmforge.models.register import register_model

    cfg = resolve_storage(load_config(args))
    for path, what in ((Path(args.checkpoint), "checkpoint"), (Path(args.data_bin) / "dict.txt", "dictionary")):
        if not path.is_file():  # checked before a tracking run is created for nothing
            prefix = "checkpoint without its dictionary: " if what == "dictionary" else ""
            raise LmforgeError(
                f"{prefix}{what} {path} does not exist; pass --checkpoint FILE and --data-bin DIR with dict.txt"
            )
    # The gate needs the evaluation: the one `lmforge evaluate --out` wrote, or a fresh one.
    evaluation = read_metrics(args.metrics) if args.metrics else evaluate(cfg, args.data_bin, args.checkpoint)
    uri = tracking.resolve_tracking_uri(cfg.tracking.uri, cfg.storage.root)
    run_id = args.run_id or tracking.pipeline_run(
        uri, cfg.tracking.experiment, f"manual-{Path(args.checkpoint).resolve().parent.name}",
        storage_root=cfg.storage.root,
    )
    result = register_model(
        checkpoint=args.checkpoint, dict_path=Path(args.data_bin) / "dict.txt", data_bin=args.data_bin,
        model_name=cfg.registry.model_name, alias=cfg.registry.alias, challenger_alias=cfg.registry.challenger_alias,
        tracking_uri=uri, run_id=run_id, tags={"config_hash": cfg.config_hash()}, evaluation=evaluation,
    )
    print(json.dumps(result, indent=2))


def _registry_client(args: argparse.Namespace):
    from mlflow import MlflowClient

    from lmforge import tracking

    cfg = resolve_storage(load_config(args))
    return MlflowClient(tracking_uri=args.tracking_uri or tracking.resolve_tracking_uri(cfg.tracking.uri, cfg.storage.root))


def cmd_models(args: argparse.Namespace) -> None:
    from lmforge.models import promotion

    client = _registry_client(args)
    if not args.name:
        rows = promotion.describe_models(client)
        if not rows:
            print("no registered models")
        for row in rows:
            print(f"{row['name']}  latest v{row['latest']}  {row['aliases']}")
        return
    if args.alias:
        version = promotion.resolve_version(client, args.name, args.alias)
        print(json.dumps({"version": str(version.version), "run_id": version.run_id, "tags": dict(version.tags)},
                         indent=2, sort_keys=True))
        return
    for row in promotion.describe_versions(client, args.name):
        line = f"v{row['version']:<4} {row['aliases'] or '-':<22} ppl {row['perplexity'] or '-':<12} " \
               f"identity {row['identity'] or '-':<12} {row['reason']}"
        if row["override"]:
            line += f" [override: {row['override']}]"
        print(line)


def cmd_promote(args: argparse.Namespace) -> None:
    from lmforge.models import promotion

    cfg = load_config(args)
    result = promotion.promote(
        _registry_client(args), args.name, args.version, args.to or cfg.registry.alias, reason=args.reason, by=args.by
    )
    print(json.dumps(result, indent=2))


def resolve_storage(cfg: RunConfig) -> RunConfig:
    """An absolute storage.root: steps run in other processes and directories."""
    if "://" in cfg.storage.root:
        return cfg
    root = str(Path(cfg.storage.root).expanduser().resolve())
    return cfg.replace(storage=dataclasses.replace(cfg.storage, root=root))


def cmd_config(args: argparse.Namespace) -> None:
    if args.action == "docs":
        for name, text, default in config_mod.field_docs():
            print(f"{name} (default {json.dumps(default)}):\n    {text}")
        return
    print(json.dumps(load_config(args).to_dict(), indent=2))


def cmd_worker(args: argparse.Namespace) -> None:
    from lmforge.training import worker

    # The status carries meaning for a PyTorchJob's restart policy (138, 143: retry): pass it on as it is.
    raise SystemExit(worker.run_from_args(args))


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmforge", description="Train, evaluate and register fairseq language models.")
    parser.add_argument("--version", action="version", version=f"lmforge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="run the whole pipeline on this machine (KFP local runner)")
    add_config_arguments(p)
    p.add_argument("--corpus", help="local corpus directory (train.txt, valid.txt, test.txt); replaces corpus.source")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("compile", help="compile the pipeline and components to YAML for Kubeflow")
    add_config_arguments(p)  # its cluster section sets each task's pod; the whole config is the UI's default
    p.add_argument("--out-dir", default=".", help="repository root to write pipelines/ and components/ into")
    p.set_defaults(func=cmd_compile)

    p = sub.add_parser("submit", help="upload the pipeline to Kubeflow Pipelines and start a run")
    add_kfp_arguments(p)
    p.add_argument("--name", help="run name (default: <config name>-<time>)")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("schedule", help="a recurring run for scheduled retraining (one at a time, no catch-up)")
    add_kfp_arguments(p)
    p.add_argument("--cron", required=True, help="KFP cron, 6 fields with seconds first, e.g. '0 0 3 * * 0'")
    p.add_argument("--name", help="recurring run name (default: <config name>-retraining)")
    p.set_defaults(func=cmd_schedule)

    p = sub.add_parser("runs", help="list runs and recurring runs on Kubeflow Pipelines")
    add_kfp_arguments(p)
    p.add_argument("--limit", type=int, default=20, help="newest runs to show")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_runs)

    p = sub.add_parser("images", help="build (and push) the steps and trainer images with Docker")
    p.add_argument("action", choices=["build"])
    p.add_argument("--push", metavar="REGISTRY", help="also tag as REGISTRY/lmforge-<role>:<version> and push")
    p.add_argument("--context", default=".", help="lmforge source checkout (default: the current directory)")
    p.add_argument("--role", action="append", choices=["steps", "trainer"], help="only this image (repeatable)")
    p.set_defaults(func=cmd_images)

    p = sub.add_parser("corpora", help="list the named corpora a config's corpus.source accepts")
    p.set_defaults(func=cmd_corpora)

    p = sub.add_parser("download", help="fetch and verify a corpus into a directory")
    p.add_argument(
        "--source", required=True,
        help="catalog name (see `lmforge corpora`), directory, file, file://, http(s):// or s3:// URI",
    )
    p.add_argument("--endpoint-url", help="S3 endpoint (default: AWS_ENDPOINT_URL)")
    p.add_argument("--out", required=True, help="output corpus directory")
    p.add_argument("--sha256", help="pinned sha256 of the downloaded file")
    p.add_argument("--size", type=int, help="pinned size in bytes")
    p.add_argument("--cache-dir", help="content-addressed download cache")
    p.set_defaults(func=cmd_download)

    p = sub.add_parser("preprocess", help="dict.txt and binarized splits, as fairseq-preprocess --only-source")
    add_config_arguments(p)
    p.add_argument("--corpus", required=True, help="directory (or s3:// prefix) with train.txt, valid.txt, test.txt")
    p.add_argument("--out", required=True, help="output data-bin directory")
    p.add_argument("--workers", type=int, default=0, help="processes (default: preprocess.workers)")
    p.add_argument("--shards", type=int, default=0,
                   help="byte ranges per split (default: preprocess.shards, at least one per worker)")
    p.set_defaults(func=cmd_preprocess)

    p = sub.add_parser("train", help="train with fairseq through the configured launcher")
    add_config_arguments(p)
    p.add_argument("--data-bin", required=True, help="preprocess output")
    p.add_argument(
        "--checkpoints", required=True, help="checkpoint directory or s3:// URI (training resumes from what it holds)"
    )
    p.add_argument(
        "--dry-run", action="store_true",
        help="check config, data-bin and environment, estimate updates/epoch and tokens/update, run one batch, stop",
    )
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="loss and perplexity with fairseq's eval-lm logic")
    add_config_arguments(p)
    p.add_argument("--data-bin", required=True)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", help="also write the result (numbers and evaluation identity) to this metrics.json")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("register", help="register a checkpoint in the MLflow model registry")
    add_config_arguments(p)
    p.add_argument("--data-bin", required=True, help="directory holding the checkpoint's dict.txt")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--run-id", help="MLflow run to log the model into (default: a new one)")
    p.add_argument("--metrics", help="metrics.json from `lmforge evaluate --out` (default: evaluate now)")
    p.set_defaults(func=cmd_register)

    p = sub.add_parser("models", help="registered models; a name's versions, aliases and promotion reasons")
    add_config_arguments(p)
    p.add_argument("name", nargs="?", help="registered model name (default: list the names)")
    p.add_argument("--alias", help="show the version this alias (or version number) points at, with its tags")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: from the config)")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("promote", help="point an alias at a version by hand, recording who and why")
    add_config_arguments(p)
    p.add_argument("name", help="registered model name")
    p.add_argument("version", help="version number or an alias naming it (e.g. challenger)")
    p.add_argument("--to", help="alias to set (default: registry.alias, the champion)")
    p.add_argument("--reason", required=True, help="why; kept as the version's lmforge.override tag")
    p.add_argument("--by", help="who (default: the current user)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: from the config)")
    p.set_defaults(func=cmd_promote)

    p = sub.add_parser("config", help="show the resolved config, or document every field")
    p.add_argument("action", choices=["show", "docs"])
    add_config_arguments(p)
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("worker", help="one training process (started by torchrun or a PyTorchJob)")
    from lmforge.training.worker import add_arguments

    add_arguments(p)
    p.set_defaults(func=cmd_worker)
    return parser


def main(argv: list[str] | None = None) -> int:
    from lmforge.logs import setup_logging

    setup_logging()
    args = build_parser().parse_args(argv)
    return run_guarded(lambda: args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
