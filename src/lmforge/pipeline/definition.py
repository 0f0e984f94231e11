"""The lmforge pipeline: download -> preprocess -> train -> evaluate -> register.

The pipeline function only wires tasks; every computation happens in the
steps. Its one parameter is the run config as JSON, so a Kubeflow UI user edits
corpus, model and training length in one place.
"""

from typing import NamedTuple

from kfp import dsl

from lmforge import config as config_mod
from lmforge.pipeline import components as c

PIPELINE_NAME = "lmforge"
# The default shown in the Kubeflow UI: the shipped WikiText-2 config.
DEFAULT_CONFIG_JSON = config_mod.default_config().to_json()


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

    # 3. Dictionary and binarized splits, cached on the preprocess settings and the corpus digest.
    preprocess = c.preprocess(
        preprocess_json=configure.outputs["preprocess_json"], corpus_dir=download.outputs["corpus_dir"],
        corpus_sha256=download.outputs["corpus_sha256"],
    ).set_display_name("preprocess")
    preprocess.set_cpu_request("2").set_memory_request("4G")

    # 4. Training (never cached: a re-run means new weights are wanted). It also records the
    #    config, corpus and data-bin in the run's MLflow run, since the data stages may be cached.
    train = c.train(
        config_json=config, pipeline_run_id=run_id, corpus_dir=download.outputs["corpus_dir"],
        data_bin=preprocess.outputs["data_bin"],
    )
    train.set_display_name("train").set_caching_options(False)

    # 5. Perplexity on the held-out splits, with the evaluation's identity (what makes two comparable).
    evaluate = c.evaluate(
        config_json=config, pipeline_run_id=run_id, data_bin=preprocess.outputs["data_bin"], checkpoint=train.output
    ).set_display_name("evaluate")

    # 6. Registration in the MLflow model registry through the promotion gate (never cached).
    register = c.register(
        config_json=config, pipeline_run_id=run_id, data_bin=preprocess.outputs["data_bin"],
        checkpoint=train.output, corpus_sha256=download.outputs["corpus_sha256"],
        dict_sha256=preprocess.outputs["dict_sha256"], evaluation_json=evaluate.outputs["evaluation_json"],
    )
    register.set_display_name("register").set_caching_options(False)

    Outputs = NamedTuple("Outputs", [("model_uri", str), ("perplexity", float), ("mlflow_run_id", str)])
    return Outputs(
        model_uri=register.outputs["model_uri"], perplexity=evaluate.outputs["perplexity"],
        mlflow_run_id=register.outputs["mlflow_run_id"],
    )
