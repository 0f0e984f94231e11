"""The lmforge pipeline: download -> preprocess -> train -> evaluate -> register.

The pipeline function only wires tasks; every computation happens in the
steps. Its parameters are the run config as JSON plus a few run-form fields
(corpus, model size, training length, where outputs and MLflow live; empty or 0
means "as in config_json"), so a Kubeflow UI user changes a run without
editing code. Each task's Kubernetes settings (lmforge.pipeline.task_settings)
are applied next to it, from the `cluster` section of the config the pipeline
is built with:

    build_pipeline(cfg)   what `lmforge compile --config FILE` compiles
    lmforge_pipeline      the same DAG for KFP's local runner (`lmforge run`)
"""

import functools
import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

from kfp import dsl

from lmforge import config as config_mod
from lmforge.config import RunConfig
from lmforge.pipeline import components as c
from lmforge.pipeline import task_settings as ts

PIPELINE_NAME = "lmforge"
PIPELINE_DESCRIPTION = "Train, evaluate and register a fairseq language model."
# The default shown in the Kubeflow UI: the shipped WikiText-2 config (build_pipeline puts the config it is
# given there instead).
DEFAULT_CONFIG_JSON = config_mod.default_config().to_json()


def preprocess_tasks(preprocess_json: Any, corpus_dir: Any, corpus_sha256: Any) -> dsl.PipelineTask:
    """Wire preprocessing (plan, map 1, reduce, map 2, merge) inside a pipeline; returns the merge task,
    whose outputs are `data_bin` and `dict_sha256`. Called from the pipeline function (and from tests,
    which run these tasks alone with KFP's local runner)."""
    cluster = ts.cluster()
    # Each fan-out iterates over JSON shard descriptors; every stage adds its output's URI to them. A
    # task inside a loop takes only the loop item (KFP's local runner replaces a loop body's inputs
    # from other tasks' outputs with the item), so the descriptor carries the settings and corpus.
    # a. Tokenizer trained or loaded once; each split cut into preprocess.shards byte ranges.
    plan = c.preprocess_plan(
        preprocess_json=preprocess_json, corpus_dir=corpus_dir, corpus_sha256=corpus_sha256
    ).set_display_name("preprocess plan")
    ts.data_stage(plan, cluster, "preprocess")
    ts.uses_storage(plan, cluster)
    ts.network_step(plan, cluster)
    # b. Map 1: tokenize and count each shard, reading only its byte ranges.
    with dsl.ParallelFor(plan.output, name="count-shards") as shard:
        count = c.preprocess_count(shard=shard).set_display_name("tokenize+count")
        ts.data_stage(count, cluster, "preprocess_shard")
        ts.uses_storage(count, cluster)
        ts.network_step(count, cluster)
    # c. Reduce: dict.txt from all counts.
    dictionary = c.preprocess_dictionary(
        preprocess_json=preprocess_json, counts=dsl.Collected(count.output)
    ).set_display_name("dictionary")
    ts.data_stage(dictionary, cluster, "preprocess")
    ts.uses_storage(dictionary, cluster)
    ts.network_step(dictionary, cluster)
    # d. Map 2: binarize each shard against the dictionary.
    with dsl.ParallelFor(dictionary.output, name="binarize-shards") as counted:
        binarize = c.preprocess_binarize(shard=counted).set_display_name("binarize")
        ts.data_stage(binarize, cluster, "preprocess_shard")
        ts.uses_storage(binarize, cluster)
        ts.network_step(binarize, cluster)
    # e. Shards joined in order: the data-bin train, evaluate and register read.
    merge = c.preprocess_merge(
        preprocess_json=preprocess_json, corpus_sha256=corpus_sha256, parts=dsl.Collected(binarize.output)
    ).set_display_name("merge")
    ts.data_stage(merge, cluster, "preprocess")
    ts.uses_storage(merge, cluster)
    ts.network_step(merge, cluster)
    return merge


def pipeline_func(
    config_json: str = DEFAULT_CONFIG_JSON, corpus_source: str = "", corpus_sha256: str = "", arch: str = "",
    decoder_layers: int = 0, decoder_embed_dim: int = 0, max_epoch: int = 0, max_update: int = 0, lr: float = 0.0,
    storage_root: str = "", tracking_uri: str = "", model_name: str = "",
) -> NamedTuple("Outputs", [("model_uri", str), ("perplexity", float), ("mlflow_run_id", str)]):
    run_id = dsl.PIPELINE_JOB_ID_PLACEHOLDER
    cluster = ts.cluster()

    # 1. Validate the config once, with the run form's values applied; cut out the slices the cached data
    #    stages depend on. In a cluster pod it also checks that storage and MLflow are reachable by every pod.
    configure = c.configure(
        config_json=config_json, corpus_source=corpus_source, corpus_sha256=corpus_sha256, arch=arch,
        decoder_layers=decoder_layers, decoder_embed_dim=decoder_embed_dim, max_epoch=max_epoch,
        max_update=max_update, lr=lr, storage_root=storage_root, tracking_uri=tracking_uri, model_name=model_name,
    ).set_display_name("configure").set_caching_options(False)
    ts.step_pod(configure, cluster, "configure")
    ts.uses_mlflow(configure, cluster)  # MLFLOW_TRACKING_URI fills an empty tracking.uri
    config = configure.outputs["config_json"]

    # 2. Download and verify the corpus. Cached on the corpus settings. The step retries transient HTTP
    #    errors itself; the task-level retry covers the pod (eviction, S3 restarts).
    download = c.download(download_json=configure.outputs["download_json"]).set_display_name("download")
    ts.data_stage(download, cluster, "download")
    ts.uses_storage(download, cluster)
    ts.network_step(download, cluster)

    # 3. Dictionary and binarized splits: a map-reduce over shards of every split (preprocess_tasks),
    #    each task cached on the preprocess settings, the corpus digest and its upstream outputs.
    preprocess = preprocess_tasks(
        configure.outputs["preprocess_json"], download.outputs["corpus_dir"], download.outputs["corpus_sha256"]
    )

    # 4. Training (never cached: a re-run means new weights are wanted). It also records the
    #    config, corpus and data-bin in the run's MLflow run, since the data stages may be cached.
    train = c.train(
        config_json=config, pipeline_run_id=run_id, corpus_dir=download.outputs["corpus_dir"],
        data_bin=preprocess.outputs["data_bin"],
    )
    train.set_display_name("train")
    ts.never_cached(train, cluster, "train")
    ts.uses_storage(train, cluster)
    ts.uses_mlflow(train, cluster)
    ts.torch_step(train, cluster)
    ts.network_step(train, cluster)

    # 5. Perplexity on the held-out splits, with the evaluation's identity (what makes two comparable).
    #    Never cached: it logs into this run's MLflow run.
    evaluate = c.evaluate(
        config_json=config, pipeline_run_id=run_id, data_bin=preprocess.outputs["data_bin"], checkpoint=train.output
    ).set_display_name("evaluate")
    ts.never_cached(evaluate, cluster, "evaluate")
    ts.uses_storage(evaluate, cluster)
    ts.uses_mlflow(evaluate, cluster)
    ts.torch_step(evaluate, cluster)
    ts.network_step(evaluate, cluster)

    # 6. Registration in the MLflow model registry through the promotion gate (never cached).
    register = c.register(
        config_json=config, pipeline_run_id=run_id, data_bin=preprocess.outputs["data_bin"],
        checkpoint=train.output, corpus_sha256=download.outputs["corpus_sha256"],
        dict_sha256=preprocess.outputs["dict_sha256"], evaluation_json=evaluate.outputs["evaluation_json"],
    )
    register.set_display_name("register")
    ts.never_cached(register, cluster, "register")
    ts.uses_storage(register, cluster)
    ts.uses_mlflow(register, cluster)
    ts.network_step(register, cluster)

    Outputs = NamedTuple("Outputs", [("model_uri", str), ("perplexity", float), ("mlflow_run_id", str)])
    return Outputs(
        model_uri=register.outputs["model_uri"], perplexity=evaluate.outputs["perplexity"],
        mlflow_run_id=register.outputs["mlflow_run_id"],
    )


def _with_default(func: Callable[..., Any], name: str, value: Any) -> Callable[..., Any]:
    """`func` with another default for parameter `name` (KFP reads the pipeline's defaults from its signature)."""
    signature = inspect.signature(func)
    parameters = [p.replace(default=value) if p.name == name else p for p in signature.parameters.values()]

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return func(*args, **kwargs)

    wrapper.__signature__ = signature.replace(parameters=parameters)  # type: ignore[attr-defined]
    return wrapper


def build_pipeline(cfg: RunConfig | None = None) -> Any:
    """The pipeline for a cluster, its tasks configured from `cfg.cluster` and `cfg` as the UI's default
    config_json; None: for KFP's local runner (no pod settings, no retries)."""
    func = pipeline_func if cfg is None else _with_default(pipeline_func, "config_json", cfg.to_json())
    with ts.compiling_for(None if cfg is None else cfg.cluster):
        return dsl.pipeline(name=PIPELINE_NAME, description=PIPELINE_DESCRIPTION)(func)


lmforge_pipeline = build_pipeline()
