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

    # 1. Download and verify the corpus. No task-level retry: the step retries transient
    #    network errors itself, and a wrong pin or a missing file will not heal on a retry.
    download = c.download(config_json=config_json, pipeline_run_id=run_id).set_display_name("download")

    # 2. Dictionary and binarized splits.
    preprocess = c.preprocess(
        config_json=config_json, pipeline_run_id=run_id, corpus_dir=download.outputs["corpus_dir"]
    ).set_display_name("preprocess")
    preprocess.set_cpu_request("2").set_memory_request("4G")

    # 3. Training (never cached: a re-run means new weights are wanted).
    train = c.train(config_json=config_json, pipeline_run_id=run_id, data_bin=preprocess.outputs["data_bin"])
    train.set_display_name("train").set_caching_options(False)

    # 4. Perplexity on the held-out split.
    evaluate = c.evaluate(
        config_json=config_json, pipeline_run_id=run_id, data_bin=preprocess.outputs["data_bin"], checkpoint=train.output
    ).set_display_name("evaluate")

    # 5. Registration in the MLflow model registry (never cached).
    register = c.register(
        config_json=config_json, pipeline_run_id=run_id, data_bin=preprocess.outputs["data_bin"],
        checkpoint=train.output, corpus_sha256=download.outputs["corpus_sha256"],
        dict_sha256=preprocess.outputs["dict_sha256"], perplexity=evaluate.outputs["perplexity"],
    )
    register.set_display_name("register").set_caching_options(False)

    Outputs = NamedTuple("Outputs", [("model_uri", str), ("perplexity", float), ("mlflow_run_id", str)])
    return Outputs(
        model_uri=register.outputs["model_uri"], perplexity=evaluate.outputs["perplexity"],
        mlflow_run_id=register.outputs["mlflow_run_id"],
    )
