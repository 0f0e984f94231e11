"""KFP components: each is an interface plus one call into `lmforge.steps`.

They are lightweight Python components on the steps image with
`install_kfp_package=False` (the image has kfp pinned), which is what lets
KFP's local runner execute the same DAG without Docker. Their bodies are
extracted as source by KFP, so each import happens inside the function.
"""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Metrics, Output

from lmforge.pipeline.images import STEPS_IMAGE


@dsl.component(base_image=STEPS_IMAGE, install_kfp_package=False)
def configure(config_json: str) -> NamedTuple(
    "ConfigureOutputs", [("config_json", str), ("download_json", str), ("preprocess_json", str)]
):
    """Validate the run config; output it and the slices the cached data stages depend on."""
    from lmforge.steps import configure as step

    return step(config_json)


@dsl.component(base_image=STEPS_IMAGE, install_kfp_package=False)
def download(download_json: str) -> NamedTuple("DownloadOutputs", [("corpus_dir", str), ("corpus_sha256", str)]):
    """Fetch and verify the corpus; output its directory and sha256."""
    from lmforge.steps import download as step

    return step(download_json)


@dsl.component(base_image=STEPS_IMAGE, install_kfp_package=False)
def preprocess(preprocess_json: str, corpus_dir: str, corpus_sha256: str) -> NamedTuple(
    "PreprocessOutputs", [("data_bin", str), ("dict_sha256", str)]
):
    """Build dict.txt and the binarized splits (fairseq's formats)."""
    from lmforge.steps import preprocess as step

    return step(preprocess_json, corpus_dir, corpus_sha256)


@dsl.component(base_image=STEPS_IMAGE, install_kfp_package=False)
def train(config_json: str, pipeline_run_id: str, corpus_dir: str, data_bin: str) -> str:
    """Train with fairseq through the configured launcher; output the best checkpoint."""
    from lmforge.steps import train as step

    return step(config_json, pipeline_run_id, corpus_dir, data_bin)


@dsl.component(base_image=STEPS_IMAGE, install_kfp_package=False)
def evaluate(config_json: str, pipeline_run_id: str, data_bin: str, checkpoint: str, metrics: Output[Metrics]) -> NamedTuple(
    "EvaluateOutputs", [("perplexity", float), ("metrics_file", str), ("evaluation_json", str)]
):
    """Loss and perplexity on the held-out splits with fairseq's eval-lm logic, and the evaluation's identity."""
    from lmforge.steps import evaluate as step

    return step(config_json, pipeline_run_id, data_bin, checkpoint, metrics)


@dsl.component(base_image=STEPS_IMAGE, install_kfp_package=False)
def register(
    config_json: str, pipeline_run_id: str, data_bin: str, checkpoint: str, corpus_sha256: str,
    dict_sha256: str, evaluation_json: str,
) -> NamedTuple("RegisterOutputs", [("model_uri", str), ("version", str), ("mlflow_run_id", str)]):
    """Register the model in MLflow as a pyfunc that scores text, with lineage tags; the promotion
    gate gives it the champion alias only if it beats the champion on the same evaluation."""
    from lmforge.steps import register as step

    return step(config_json, pipeline_run_id, data_bin, checkpoint, corpus_sha256, dict_sha256, evaluation_json)


ALL = [configure, download, preprocess, train, evaluate, register]
