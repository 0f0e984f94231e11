"""Compile the pipeline and each component to YAML for Kubeflow.

In: the pipeline and components defined in this package, and a run config whose
`cluster` section fixes each task's pod settings and which becomes the run
form's default config_json. Out: `pipelines/lmforge.yaml` (upload it in the
Kubeflow UI) and `components/<step>.yaml` (load with
kfp.components.load_component_from_file).

    lmforge compile [--config FILE] [--out-dir REPO_ROOT]
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from lmforge.config import RunConfig
from lmforge.images import STEPS_IMAGE, TRAINER_IMAGE, image

PIPELINE_FILE = Path("pipelines") / "lmforge.yaml"
COMPONENTS_DIR = Path("components")


def compile_pipeline(cfg: RunConfig, path: Path) -> Path:
    """The pipeline for a cluster, built from `cfg`, written atomically to `path`."""
    from kfp import compiler

    from lmforge.pipeline.definition import build_pipeline

    registry = cfg.cluster.image_registry
    _compile_atomically(compiler.Compiler(), build_pipeline(cfg), path, images={
        STEPS_IMAGE: image("steps", registry), TRAINER_IMAGE: image("trainer", registry),
    } if registry else None)
    return path


def compile_all(out_dir: Path, cfg: RunConfig | None = None) -> list[Path]:
    """`pipelines/lmforge.yaml` for `cfg` (default: the shipped WikiText-2 config) and every component."""
    from kfp import compiler

    from lmforge import config as config_mod
    from lmforge.pipeline import components

    written = [compile_pipeline(cfg or config_mod.default_config(), out_dir / PIPELINE_FILE)]
    for component in components.ALL:
        path = out_dir / COMPONENTS_DIR / f"{component.name.replace('-', '_')}.yaml"
        _compile_atomically(compiler.Compiler(), component, path)
        written.append(path)
    return written


def _compile_atomically(compiler: object, what: object, path: Path, images: dict[str, str] | None = None) -> None:
    """A failed compile leaves the previous file in place, never half a file. `images`: image names to
    replace (the components are defined with lmforge's own registry; cluster.image_registry moves them)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=".yaml", dir=path.parent)
    os.close(fd)
    try:
        compiler.compile(what, tmp)  # type: ignore[attr-defined]
        if images:
            text = Path(tmp).read_text()
            for old, new in images.items():
                text = text.replace(f"image: {old}\n", f"image: {new}\n")
            Path(tmp).write_text(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
