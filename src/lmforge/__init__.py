"""lmforge: fairseq language models trained, evaluated and registered as a Kubeflow Pipelines DAG."""

__version__ = "0.1.0"
