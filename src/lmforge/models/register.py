"""Register a trained fairseq model in the MLflow model registry, through the gate.

In:  the training task (`lmforge.tasks`; language_modeling by default), a fairseq checkpoint
     (.pt), the data-bin it was trained on (``dict.txt`` and the tokenizer files), the
     evaluation of it (`lmforge.models.evaluate`: the task's gate metric and identity), the
     MLflow tracking URI and the pipeline's MLflow run, a registered-model name, the
     champion/challenger aliases and the caller's lineage tags (corpus_sha256, config_hash,
     pipeline_run_id, ...).
Out: a version of the registered model, the task's MLflow pyfunc model (language modeling:
     `lmforge.models.scoring.FairseqLanguageModel`) logged in that run with a signature, an input
     example, lmforge's code and the pinned closure of its requirements, carrying the lineage
     tags (plus the ones computed here: task, checkpoint, dict and tokenizer sha256, data-bin
     digest, package version, evaluation identity and gate metric) and a description; `lmforge.models.promotion`
     then gives it the champion or challenger alias. The pipeline's run is left RUNNING
     (`lmforge.tracking.step_run`): the register step, not this function, ends it.
     Returns ``{"model_uri": "models:/NAME@ALIAS",
     "version": "N", "run_id", "alias", "reason", "created"}``.

    lmforge register --config pipelines/configs/tiny.yaml \\
        --checkpoint runs/.../checkpoints/checkpoint_best.pt --data-bin runs/.../data-bin \\
        [--metrics runs/.../eval/metrics.json] [--run-id <mlflow run id>]

The optimizer state is dropped from the checkpoint first: it is about twice the size of the
weights (Adam keeps two moments per parameter) and serving never reads it. Before anything
is logged the slimmed checkpoint is loaded with its dictionary and scores a sentence, so a
checkpoint/dictionary mismatch fails here, not in the serving process.

The model is self-contained: it carries lmforge's package as its `code_paths` (the pickled
pyfunc refers to ``lmforge.models.scoring`` by name, and MLflow puts the model's ``code/`` on
sys.path before unpickling it) and, as requirements.txt, the exact closure of what the pyfunc
imports (`lmforge.models.requirements`), to be installed with ``pip install --no-deps``: ve-fairseq
declares torchaudio, which would pull another torch. It loads where lmforge is not installed.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from lmforge.config.validation import alias_problems
from lmforge import tasks, tracking
from lmforge.data import integrity
from lmforge.errors import LmforgeError
from lmforge.io.hashing import file_sha256
from lmforge.models import requirements


def lmforge_code_path() -> str:
    """lmforge's package directory, as the model's `code_paths`: MLflow copies it into the model's
    ``code/`` and puts that first on sys.path before unpickling the pyfunc, so the model loads
    where lmforge is not installed. All of it (~0.5 MB of source), not only what scoring imports:
    one directory cannot go stale when scoring starts importing another module."""
    import lmforge

    return str(Path(lmforge.__file__).resolve().parent)


def data_bin_digest(data_bin: Path) -> str:
    """sha256 over the data-bin's files: one "name sha256" line per file, sorted by name.

    Logs are left out (they hold timings); everything a model's numbers depend on is in.
    """
    import hashlib

    lines = [
        f"{path.relative_to(data_bin).as_posix()} {file_sha256(path)}\n"
        for path in sorted(data_bin.rglob("*"))
        if path.is_file() and path.suffix != ".log" and ".tmp" not in path.name
    ]
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def lineage_tags(
    *, checkpoint: Path, dict_path: Path, tokenizer: Any, data_bin: Path | None, evaluation: dict | None,
    task: str = tasks.DEFAULT,
) -> dict[str, str]:
    """The tags lmforge computes itself: what the model is made of and how it was evaluated."""
    from lmforge import __version__
    from lmforge.models.evaluate import identity_sha256
    from lmforge.models.promotion import TAG_CHECKPOINT, TAG_IDENTITY, TAG_IDENTITY_JSON, TAG_TASK

    metric = tasks.get(task).gate_metric
    tags = {
        TAG_TASK: task,
        TAG_CHECKPOINT: file_sha256(checkpoint),
        "dict_sha256": file_sha256(dict_path),
        "tokenizer_kind": tokenizer.kind,
        "tokenizer_sha256": tokenizer.sha256 or "none",
        "lmforge_version": __version__,
    }
    if data_bin is not None:
        tags["data_bin_digest"] = data_bin_digest(data_bin)
    if evaluation is not None:
        identity = evaluation["identity"]
        tags[TAG_IDENTITY] = evaluation.get("identity_sha256") or identity_sha256(identity)
        tags[TAG_IDENTITY_JSON] = json.dumps(identity, sort_keys=True)
        tags[metric.tag] = repr(float(evaluation[metric.name]))
        tags[f"{identity['split']}_{metric.name}"] = f"{float(evaluation[metric.name]):.6g}"
    return tags


def register_model(
    *,
    checkpoint: str | Path,
    dict_path: str | Path,
    model_name: str,
    tracking_uri: str,
    run_id: str,
    tags: dict[str, str],
    evaluation: dict | None = None,
    alias: str = "champion",
    challenger_alias: str = "challenger",
    data_bin: str | Path | None = None,
    gate_timeout_s: float | None = None,
    task: str = tasks.DEFAULT,
) -> dict:
    """Log the checkpoint as a pyfunc model in run `run_id`, register it, and pass it through the
    promotion gate (`lmforge.promotion`): it takes `alias` (champion) or `challenger_alias`.

    `task` names the training task (`lmforge.tasks`): it decides the pyfunc and the gate metric.
    `evaluation` is `lmforge.models.evaluate.evaluate`'s result (gate metric and identity); without it
    the version is not comparable and becomes challenger unless it is the first. `data_bin`
    (default: the dictionary's directory) holds the tokenizer files and is digested. A
    checkpoint already registered under `model_name` (same sha256) is not registered again:
    its version is returned. Returns {"model_uri": "models:/NAME@ALIAS", "version", "run_id",
    "alias", "reason", "created"}.
    """
    checkpoint, dict_path = _local_path(checkpoint), _local_path(dict_path)
    training_task = tasks.get(task)
    # Every check a user can act on comes before anything is written to MLflow.
    if not checkpoint.is_file():
        raise LmforgeError(f"checkpoint {checkpoint} does not exist; pass --checkpoint with a fairseq .pt file")
    if dict_path.is_dir():
        dict_path = dict_path / training_task.dictionary
    if not dict_path.is_file():
        raise LmforgeError(
            f"checkpoint without its dictionary: {dict_path} does not exist; "
            "pass --data-bin with the dict.txt the model was trained with"
        )
    data_bin = _local_path(data_bin) if data_bin is not None else dict_path.parent
    if not model_name or not model_name.strip():
        raise LmforgeError("model name is empty; set registry.model_name")
    problems = alias_problems(alias, challenger_alias, ("alias", "challenger alias"))
    if problems:
        raise LmforgeError("; ".join(problems))
    # What fairseq could not read, named before it is packaged (lmforge.data.integrity); after
    # the settings, which cost nothing to check.
    unreadable = integrity.model_problems(checkpoint, dict_path)
    if unreadable:
        raise LmforgeError("cannot register: " + "; ".join(unreadable))

    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from lmforge.models import promotion
    from lmforge.data.tokenization import TOKENIZER_MANIFEST, load_tokenizer

    client = MlflowClient(tracking_uri=tracking_uri)
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise LmforgeError(
            f"MLflow run {run_id!r} not found at {tracking_uri}; pass the run id of this pipeline run"
        ) from None
    if run.info.lifecycle_stage == "deleted":
        raise LmforgeError(f"MLflow run {run_id} at {tracking_uri} is deleted; restore it or pass another run id")

    tokenizer = load_tokenizer(data_bin)
    computed = lineage_tags(
        checkpoint=checkpoint, dict_path=dict_path, tokenizer=tokenizer, data_bin=data_bin, evaluation=evaluation,
        task=task,
    )
    all_tags = {**{k: str(v) for k, v in tags.items()}, **computed}
    gate = {"champion_alias": alias, "challenger_alias": challenger_alias}
    if gate_timeout_s is not None:
        gate["timeout_s"] = gate_timeout_s

    existing = _version_with_checkpoint(client, model_name, computed[promotion.TAG_CHECKPOINT])
    if existing is not None:  # the same checkpoint again: one version
        decision = promotion.run_gate(client, model_name, str(existing.version), **gate)
        return _result(model_name, existing.version, existing.run_id, decision, alias, challenger_alias, created=False)

    pyfunc = training_task.pyfunc()

    with tempfile.TemporaryDirectory(prefix="lmforge-register-") as tmp:
        staged = Path(tmp)
        arch = _strip_optimizer_state(checkpoint, staged / "model.pt")
        _copy(dict_path, staged / "dict.txt")
        tokenizer_dir = staged / "tokenizer"
        tokenizer_dir.mkdir()
        for path in tokenizer.files():
            _copy(path, tokenizer_dir / path.name)
        if not (tokenizer_dir / TOKENIZER_MANIFEST).exists():
            # Kind "none" has no file in the data-bin; the model still carries a manifest saying so.
            (tokenizer_dir / TOKENIZER_MANIFEST).write_text(
                json.dumps({"kind": tokenizer.kind, "model": None, "sha256": None}) + "\n"
            )
        _check_loads(pyfunc, staged, tokenizer_dir, checkpoint, dict_path)

        # The fluent API logs into "the active run" on "the tracking URI": both point at the
        # pipeline's for this block, and the run is left RUNNING (the register step ends it).
        with tracking.step_run(tracking_uri, run_id, "register"):
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=pyfunc.python_model,
                artifacts={
                    "checkpoint": str(staged / "model.pt"),
                    "dict": str(staged / "dict.txt"),
                    "tokenizer": str(tokenizer_dir),
                },
                signature=pyfunc.signature,
                input_example=pyfunc.input_example,
                pip_requirements=requirements.pins(pyfunc.imports),
                code_paths=[lmforge_code_path()],
                metadata={"lmforge_install": requirements.INSTALL_NOTE},
                tags=all_tags,
            )
            # Created "pending" in the same call: concurrent gates are serialized on that tag.
            version = mlflow.register_model(
                info.model_uri, model_name, tags={**all_tags, promotion.TAG_GATE: "pending"}
            ).version

    description = f"fairseq {arch} {training_task.title} from MLflow run {run_id}; {pyfunc.summary}"
    if evaluation is not None:
        description += " " + training_task.evaluation_note(evaluation)
    description += " " + requirements.INSTALL_NOTE
    client.update_model_version(model_name, version, description=description)
    if not client.get_registered_model(model_name).description:
        client.update_registered_model(
            model_name,
            description=(
                f"fairseq {training_task.title}s trained by lmforge. Aliases: "
                f"'{alias}' is the best version on a comparable evaluation ({training_task.gate_metric.name}), "
                f"'{challenger_alias}' the latest that did not beat it (see each version's "
                f"lmforge.promotion_reason tag). {pyfunc.summary}"
            ),
        )
    decision = promotion.run_gate(client, model_name, str(version), **gate)
    return _result(model_name, version, run_id, decision, alias, challenger_alias, created=True)


def _result(name, version, run_id, decision, alias, challenger_alias, *, created: bool) -> dict:
    from lmforge.models.promotion import CHAMPION

    given = alias if decision.role == CHAMPION else challenger_alias
    return {
        "model_uri": f"models:/{name}@{given}",
        "version": str(version),
        "run_id": run_id,
        "alias": given,
        "reason": decision.reason,
        "created": created,
    }


def _version_with_checkpoint(client, name: str, sha256: str):
    from lmforge.models.promotion import TAG_CHECKPOINT

    found = client.search_model_versions(f"name = '{name}' and tags.{TAG_CHECKPOINT} = '{sha256}'")
    return min(found, key=lambda v: int(v.version)) if found else None


def _local_path(value: str | Path) -> Path:
    text = str(value)
    if text.startswith("file://"):
        text = text[len("file://") :]
    elif "://" in text:
        raise LmforgeError(f"{text}: register reads local files; fetch the checkpoint and dict.txt first")
    return Path(text).expanduser()


def _copy(src: Path, dst: Path) -> None:
    import shutil

    shutil.copyfile(src, dst)


def _strip_optimizer_state(src: Path, dst: Path) -> str:
    """Write `src` without its optimizer state to `dst`; returns the architecture name."""
    import pickle

    import torch

    from lmforge.models.scoring import _import_fairseq_hub_utils

    # Unpickling a checkpoint imports fairseq (its cfg classes): do that import quietly first.
    _import_fairseq_hub_utils()

    try:
        # weights_only=False: fairseq checkpoints pickle an argparse Namespace / omegaconf cfg.
        # The file is our own training output, not untrusted input.
        state = torch.load(src, map_location="cpu", weights_only=False)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as exc:
        raise LmforgeError(f"{src} is not a readable PyTorch checkpoint ({_first_line(exc)})") from None
    if not isinstance(state, dict) or "model" not in state:
        raise LmforgeError(f"{src} is not a fairseq checkpoint (no 'model' entry)")
    state.pop("last_optimizer_state", None)
    torch.save(state, dst)
    return _arch(state)


def _arch(state: dict) -> str:
    cfg = state.get("cfg")
    try:
        name = cfg["model"]["_name"] if cfg is not None else None
    except (KeyError, TypeError):
        name = None
    if not name and state.get("args") is not None:
        name = getattr(state["args"], "arch", None)
    return str(name or "unknown-arch")


def _check_loads(pyfunc: Any, staged: Path, tokenizer_dir: Path, checkpoint: Path, dict_path: Path) -> None:
    """Load the staged files the way the registered model will, and predict the input example."""
    try:
        pyfunc.check(staged / "model.pt", staged / "dict.txt", tokenizer_dir)
    except (RuntimeError, ValueError) as exc:
        # RuntimeError: load_state_dict's "size mismatch for decoder.embed_tokens.weight", the
        # dictionary has a different number of symbols than the model was trained with.
        # ValueError: fairseq's "Incorrect dictionary format" for a file that is no dict.txt.
        raise LmforgeError(
            f"checkpoint {checkpoint} does not load with {dict_path} ({_first_line(exc)}); "
            "pass --data-bin with the dict.txt the model was trained with"
        ) from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    for line in text.splitlines():
        if line.strip() and not line.strip().startswith("Error(s) in loading"):
            return line.strip()[:200]
    return type(exc).__name__
