"""KFP components: each is an interface plus one call into `lmforge.steps`.

They are lightweight Python components on the steps image with
`install_kfp_package=False` (the image has kfp pinned), which is what lets
KFP's local runner execute the same DAG without Docker. Their bodies are
extracted as source by KFP, so each import happens inside the function.
"""

from typing import List, NamedTuple

from kfp import dsl
from kfp.dsl import Metrics, Output

from lmforge.images import STEPS_IMAGE


@dsl.component(base_image=STEPS_IMAGE, install_kfp_package=False)
def configure(
    config_json: str, corpus_source: str = "", corpus_sha256: str = "", arch: str = "", decoder_layers: int = 0,
    decoder_embed_dim: int = 0, max_epoch: int = 0, max_update: int = 0, lr: float = 0.0, storage_root: str = "",
    tracking_uri: str = "", model_name: str = "",
) -> NamedTuple("ConfigureOutputs", [("config_json", str), ("download_json", str), ("preprocess_json", str)]):
    """Validate the run config with the run form's values applied (empty or 0: as in config_json); output it
    and the slices the cached data stages depend on."""
    from lmforge.steps import configure as step

    return step(
        config_json, corpus_source=corpus_source, corpus_sha256=corpus_sha256, arch=arch,
        decoder_layers=decoder_layers, decoder_embed_dim=decoder_embed_dim, max_epoch=max_epoch,
        max_update=max_update, lr=lr, storage_root=storage_root, tracking_uri=tracking_uri, model_name=model_name,
    )


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
def preprocess_plan(preprocess_json: str, corpus_dir: str, corpus_sha256: str) -> List[str]:
    """Train or load the tokenizer once; cut every split into shards at fairseq's line boundaries."""
    from lmforge.steps import preprocess_plan as step

    return step(preprocess_json, corpus_dir, corpus_sha256)


@dsl.component(base_image=STEPS_IMAGE, install_kfp_package=False)
def preprocess_count(shard: str) -> str:
    """Map 1: tokenize and count one shard (a JSON descriptor from preprocess_plan), reading only its byte ranges."""
    from lmforge.steps import preprocess_count as step

    return step(shard)


@dsl.component(base_image=STEPS_IMAGE, install_kfp_package=False)
def preprocess_dictionary(preprocess_json: str, counts: List[str]) -> List[str]:
    """Reduce: merge the shards' counts into fairseq's dict.txt."""
    from lmforge.steps import preprocess_dictionary as step

    return step(preprocess_json, counts)


@dsl.component(base_image=STEPS_IMAGE, install_kfp_package=False)
def preprocess_binarize(shard: str) -> str:
    """Map 2: binarize one shard (a JSON descriptor from preprocess_dictionary) against the dictionary."""
    from lmforge.steps import preprocess_binarize as step

    return step(shard)


@dsl.component(base_image=STEPS_IMAGE, install_kfp_package=False)
def preprocess_merge(preprocess_json: str, corpus_sha256: str, parts: List[str]) -> NamedTuple(
    "PreprocessOutputs", [("data_bin", str), ("dict_sha256", str)]
):
    """Join the binarized shards in order into the data-bin, byte-identical to fairseq-preprocess."""
    from lmforge.steps import preprocess_merge as step

    return step(preprocess_json, corpus_sha256, parts)


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


ALL = [
    configure, download, preprocess, preprocess_plan, preprocess_count, preprocess_dictionary, preprocess_binarize,
    preprocess_merge, train, evaluate, register,
]
