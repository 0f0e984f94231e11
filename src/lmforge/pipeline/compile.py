"""Compile the pipeline and each component to YAML for Kubeflow.

In: the pipeline and components defined in this package. Out:
`pipelines/lmforge.yaml` (upload it in the Kubeflow UI) and
`components/<step>.yaml` (load with kfp.components.load_component_from_file).

    lmforge compile [--out-dir REPO_ROOT]
"""

from __future__ import annotations

from pathlib import Path

PIPELINE_FILE = Path("pipelines") / "lmforge.yaml"
COMPONENTS_DIR = Path("components")


def compile_all(out_dir: Path) -> list[Path]:
    from kfp import compiler

    from lmforge.pipeline import components
    from lmforge.pipeline.definition import lmforge_pipeline

    written = []
    pipeline_file = out_dir / PIPELINE_FILE
    pipeline_file.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(lmforge_pipeline, str(pipeline_file))
    written.append(pipeline_file)
    (out_dir / COMPONENTS_DIR).mkdir(parents=True, exist_ok=True)
    for component in components.ALL:
        path = out_dir / COMPONENTS_DIR / f"{component.name.replace('-', '_')}.yaml"
        compiler.Compiler().compile(component, str(path))
        written.append(path)
    return written
