"""The lmforge pipeline: download -> preprocess -> train -> evaluate -> register.

The pipeline function only wires tasks; every computation happens in the
steps. Its one parameter is the run config as JSON, so a Kubeflow UI user edits
corpus, model and training length in one place.
"""

from typing import Any, NamedTuple

from kfp import dsl

from lmforge import config as config_mod
from lmforge.pipeline import components as c

PIPELINE_NAME = "lmforge"
# The default shown in the Kubeflow UI: the shipped WikiText-2 config.
DEFAULT_CONFIG_JSON = config_mod.default_config().to_json()


def preprocess_tasks(preprocess_json: Any, corpus_dir: Any, corpus_sha256: Any) -> dsl.PipelineTask:
    """Wire preprocessing (plan, map 1, reduce, map 2, merge) inside a pipeline; returns the merge task,
    whose outputs are `data_bin` and `dict_sha256`. Called from the pipeline function (and from tests,
    which run these tasks alone with KFP's local runner)."""
    # Each fan-out iterates over JSON shard descriptors; every stage adds its output's URI to them. A
    # task inside a loop takes only the loop item (KFP's local runner replaces a loop body's inputs
    # from other tasks' outputs with the item), so the descriptor carries the settings and corpus.
    # a. Tokenizer trained or loaded once; each split cut into preprocess.shards byte ranges.
    plan = c.preprocess_plan(
        preprocess_json=preprocess_json, corpus_dir=corpus_dir, corpus_sha256=corpus_sha256
    ).set_display_name("preprocess plan")
    plan.set_cpu_request("1").set_memory_request("2G")
    # b. Map 1: tokenize and count each shard, reading only its byte ranges.
    with dsl.ParallelFor(plan.output, name="count-shards") as shard:
        count = c.preprocess_count(shard=shard).set_display_name("tokenize+count")
        count.set_cpu_request("1").set_memory_request("2G")
    # c. Reduce: dict.txt from all counts.
    dictionary = c.preprocess_dictionary(
        preprocess_json=preprocess_json, counts=dsl.Collected(count.output)
    ).set_display_name("dictionary")
    dictionary.set_cpu_request("1").set_memory_request("2G")
    # d. Map 2: binarize each shard against the dictionary.
    with dsl.ParallelFor(dictionary.output, name="binarize-shards") as counted:
        binarize = c.preprocess_binarize(shard=counted).set_display_name("binarize")
        binarize.set_cpu_request("1").set_memory_request("2G")
    # e. Shards joined in order: the data-bin train, evaluate and register read.
    merge = c.preprocess_merge(
        preprocess_json=preprocess_json, corpus_sha256=corpus_sha256, parts=dsl.Collected(binarize.output)
    ).set_display_name("merge")
    merge.set_cpu_request("1").set_memory_request("2G")
    return merge


@dsl.pipeline(name=PIPELINE_NAME, description="Train, evaluate and register a fairseq language model.")
def lmforge_pipeline(config_json: str = DEFAULT_CONFIG_JSON) -> NamedTuple(
    "Outputs", [("model_uri", str), ("perplexity", float), ("mlflow_run_id", str)]
):
    run_id = dsl.PIPELINE_JOB_ID_PLACEHOLDER

    # 1. Validate the config once; cut out the slices the cached data stages depend on.
    configure = c.configure(config_json=config_json).set_display_name("configure").set_caching_options(False)
    config = configure.outputs["config_json"]

    # 2. Download and verify the corpus. Cached on the corpus settings. No task-level retry: the
    #    step retries transient network errors itself, and a wrong pin will not heal on a retry.
    download = c.download(download_json=configure.outputs["download_json"]).set_display_name("download")

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
    train.set_display_name("train").set_caching_options(False)

    # 5. Perplexity on the held-out split.
    evaluate = c.evaluate(
        config_json=config, pipeline_run_id=run_id, data_bin=preprocess.outputs["data_bin"], checkpoint=train.output
    ).set_display_name("evaluate")

    # 6. Registration in the MLflow model registry (never cached).
    register = c.register(
        config_json=config, pipeline_run_id=run_id, data_bin=preprocess.outputs["data_bin"],
        checkpoint=train.output, corpus_sha256=download.outputs["corpus_sha256"],
        dict_sha256=preprocess.outputs["dict_sha256"], perplexity=evaluate.outputs["perplexity"],
    )
    register.set_display_name("register").set_caching_options(False)

    Outputs = NamedTuple("Outputs", [("model_uri", str), ("perplexity", float), ("mlflow_run_id", str)])
    return Outputs(
        model_uri=register.outputs["model_uri"], perplexity=evaluate.outputs["perplexity"],
        mlflow_run_id=register.outputs["mlflow_run_id"],
    )
