"""lmforge.models.register: a real MLflow registry (SQLite in tmp_path) and a real tiny fairseq LM.

The tiny LM, the texts and fairseq's own scores for them (`hub_expected`) come from
tests/conftest.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from conftest import TINY_CONFIG, nudged_checkpoint
from lmforge.errors import LmforgeError
from lmforge.models import requirements
from lmforge.models.register import register_model
from lmforge.models.scoring import IMPORTS

NAME, ALIAS = "tiny-lm", "champion"
TAGS = {
    "corpus_sha256": "a" * 64,
    "config_hash": "c" * 64,
    "pipeline_run_id": "pipeline-123",
}
IDENTITY = {"scorer": "fairseq-eval-lm", "split": "test", "split_sha256": "d" * 64, "dict_sha256": "b" * 64,
            "tokens_per_sample": 64, "context_window": 0, "sample_break_mode": "none"}


def evaluation(perplexity: float, **identity) -> dict:
    """What lmforge.models.evaluate returns, as far as registration reads it."""
    from lmforge.models.evaluate import identity_sha256

    ident = {**IDENTITY, **identity}
    return {"split": "test", "perplexity": perplexity, "identity": ident, "identity_sha256": identity_sha256(ident)}


def variant(lm, directory: Path, k: int) -> Path:
    return nudged_checkpoint(lm.checkpoint, directory, k)


def assert_scores_like_fairseq(out: pd.DataFrame, expected: pd.DataFrame) -> None:
    """`out` (a loaded model's predictions) against fairseq's scores of the same texts."""
    assert out.columns.tolist() == ["log_prob", "tokens", "perplexity", "eos_log_prob", "unk_tokens", "unk_fraction"]
    assert out.tokens.tolist() == expected.tokens.tolist()  # hub.score()'s positional_scores.numel()
    # log_prob is hub.score(text)["positional_scores"].sum()
    assert out.log_prob.tolist() == pytest.approx(expected.log_prob.tolist(), abs=1e-4)
    assert out.eos_log_prob.tolist() == pytest.approx(expected.eos_log_prob.tolist(), abs=1e-4)


@pytest.fixture
def tracking(tmp_path, monkeypatch, empty_mlflow_db):
    """A SQLite tracking store with artifacts under tmp_path, and a RUNNING pipeline run."""
    from mlflow.tracking import MlflowClient

    shutil.copyfile(empty_mlflow_db, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # The process default points at the same store: register_model must leave it as it was. (An
    # earlier test's mlflow.set_tracking_uri would override the variable: cleared for this test.)
    from mlflow.tracking._tracking_service import utils

    monkeypatch.setattr(utils, "_tracking_uri", None)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("lmforge", artifact_location=(tmp_path / "artifacts").as_uri())
    run = client.create_run(experiment)
    return uri, client, run.info.run_id


def register(lm, tracking, **overrides):
    uri, _, run_id = tracking
    kwargs = dict(
        checkpoint=lm.checkpoint, dict_path=lm.dict_path, model_name=NAME, alias=ALIAS,
        tracking_uri=uri, run_id=run_id, tags=TAGS, evaluation=evaluation(100.0),
    )
    return register_model(**{**kwargs, **overrides})


def test_registers_a_model_that_scores_like_fairseq(tiny_lm, tracking, hub_expected, scored_texts):
    import mlflow
    import torch

    uri, client, run_id = tracking
    from lmforge import __version__
    from lmforge.io.hashing import file_sha256
    from lmforge.models.register import data_bin_digest

    result = register(tiny_lm, tracking)
    assert result == {"model_uri": f"models:/{NAME}@{ALIAS}", "version": "1", "run_id": run_id, "alias": ALIAS,
                      "reason": "first model for this name", "created": True}
    assert os.environ["MLFLOW_TRACKING_URI"] == uri

    version = client.get_model_version_by_alias(NAME, ALIAS)
    assert str(version.version) == "1" and version.run_id == run_id
    assert {k: version.tags[k] for k in TAGS} == TAGS
    ev = evaluation(100.0)
    assert version.tags.items() >= {
        "dict_sha256": file_sha256(tiny_lm.dict_path),
        "checkpoint_sha256": file_sha256(tiny_lm.checkpoint),
        "tokenizer_kind": "none", "tokenizer_sha256": "none",
        "data_bin_digest": data_bin_digest(tiny_lm.data_bin),
        "lmforge_version": __version__, "task": "language_modeling",
        "eval_identity": ev["identity_sha256"], "eval_identity_json": json.dumps(IDENTITY, sort_keys=True),
        "eval_perplexity": "100.0", "test_perplexity": "100",
        "lmforge.promotion": "champion", "lmforge.promotion_reason": "first model for this name",
        "lmforge.gate": "decided",
    }.items()
    assert "transformer_lm" in version.description and "test perplexity 100" in version.description
    assert "champion" in client.get_registered_model(NAME).description
    # The run still belongs to the pipeline: registering must not close it (the register step does),
    # and the caller's fluent state is as it was.
    assert client.get_run(run_id).info.status == "RUNNING"
    assert mlflow.active_run() is None

    model = mlflow.pyfunc.load_model(result["model_uri"])
    # A plain list and a DataFrame with a text column: both pass the signature.
    from_list = model.predict(scored_texts)
    assert_scores_like_fairseq(from_list, hub_expected)
    pd.testing.assert_frame_equal(model.predict(pd.DataFrame({"text": scored_texts})), from_list)
    assert model.metadata.get_input_schema().to_dict() == [{"type": "any", "required": True}]

    # The registered checkpoint is the weights without the optimizer state.
    local = Path(mlflow.artifacts.download_artifacts(result["model_uri"]))
    registered = torch.load(local / "artifacts" / "model.pt", map_location="cpu", weights_only=False)
    manifest = json.loads((local / "artifacts" / "tokenizer" / "tokenizer.json").read_text())
    assert manifest == {"kind": "none", "model": None, "sha256": None}
    assert (local / "artifacts" / "dict.txt").read_bytes() == tiny_lm.dict_path.read_bytes()
    assert model.metadata.get_params_schema().to_dict()[0]["name"] == "continuation_tokens"
    assert "last_optimizer_state" not in registered
    assert (local / "artifacts" / "model.pt").stat().st_size < tiny_lm.checkpoint.stat().st_size / 2
    # Self-contained: the exact closure of what the pyfunc imports, and lmforge's own source.
    pins = (local / "requirements.txt").read_text().splitlines()
    assert pins == requirements.pins(IMPORTS)
    assert "ve-fairseq==0.12.3" in pins and "torch==2.13.0" in pins
    assert model.metadata.flavors["python_function"]["code"] == "code"
    import lmforge.models.scoring

    assert (local / "code" / "lmforge" / "models" / "scoring.py").read_bytes() == Path(
        lmforge.models.scoring.__file__).read_bytes()
    assert not list((local / "code").rglob("__pycache__"))
    assert model.metadata.metadata == {"lmforge_install": requirements.INSTALL_NOTE}
    assert requirements.INSTALL_NOTE in version.description and "--no-deps" in version.description


def predict_in_a_fresh_process(uri: str, model_uri: str, texts: list[str], cwd: Path) -> tuple:
    """mlflow.pyfunc.load_model + predict in a new interpreter, as a user would: a plain list, then a
    DataFrame with a text column. Returns both predictions, the loaded python model's class path, and
    the top-level packages the process imported from site-packages."""
    code = (
        "import json, sys, mlflow, pandas as pd\n"
        "model = mlflow.pyfunc.load_model(sys.argv[1])\n"
        "texts = json.loads(sys.argv[2])\n"
        "from_list = model.predict(texts)\n"
        "from_frame = model.predict(pd.DataFrame({'text': texts}))\n"
        "cls = type(model.unwrap_python_model())\n"
        # The top-level entries of site-packages that the imported modules' files lie in.
        "import sysconfig; from pathlib import Path\n"
        "site = {Path(sysconfig.get_paths()[k]) for k in ('purelib', 'platlib')}\n"
        "files = [Path(f) for f in (getattr(m, '__file__', None) for m in list(sys.modules.values())) if f]\n"
        "top = sorted({f.relative_to(s).parts[0].split('.')[0] for f in files for s in site if f.is_relative_to(s)})\n"
        "rows = lambda out: json.loads(out.to_json(orient='records'))\n"
        "print(json.dumps([rows(from_list), rows(from_frame), cls.__module__, top]))\n"
    )
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    proc = subprocess.run(
        [sys.executable, "-c", code, model_uri, json.dumps(texts)],
        capture_output=True, text=True, timeout=300, env=env, cwd=cwd,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    from_list, from_frame, module, imported = json.loads(proc.stdout.strip().splitlines()[-1])
    return pd.DataFrame(from_list), pd.DataFrame(from_frame), module, imported


@pytest.mark.slow
def test_a_fresh_process_loads_the_model_by_alias(tiny_lm, tracking, hub_expected, scored_texts, tmp_path):
    uri, _, _ = tracking
    result = register(tiny_lm, tracking)
    from_list, from_frame, module, imported = predict_in_a_fresh_process(uri, result["model_uri"], scored_texts,
                                                                         tmp_path)
    assert_scores_like_fairseq(from_list, hub_expected)
    assert_scores_like_fairseq(from_frame, hub_expected)
    assert module == "lmforge.models.scoring"
    # What loading and scoring imported is in the model's requirements (lmforge: the model carries it).
    # pygments: mako (alembic's) imports it where it is installed, and does without it.
    from importlib import metadata

    providers = metadata.packages_distributions()
    pinned = {pin.split("==")[0] for pin in requirements.pins(IMPORTS)} | {"lmforge"}
    unpinned = {name for name in imported if not {requirements.canonical(d) for d in providers.get(name, [])} & pinned}
    assert unpinned <= {"pygments"}, f"imported when scoring, not in requirements.txt: {sorted(unpinned)}"
    assert {"torch", "fairseq", "mlflow"} <= set(imported)


#: Run in the bare base's container: the model's own requirements into a fresh venv, from the wheelhouse
#: only, then load and score. It prints `pip check`'s findings, then one JSON line.
IN_A_BARE_CONTAINER = r"""
set -eu
python3 -m venv /tmp/venv
start=$(date +%s)
/tmp/venv/bin/pip install --quiet --no-index --find-links /wheelhouse --no-deps --no-cache-dir \
    -r /model/requirements.txt
echo "INSTALL_SECONDS $(( $(date +%s) - start ))"
/tmp/venv/bin/pip check | sed 's/^/PIP_CHECK /' || true
exec /tmp/venv/bin/python -c "$SCORE" "$TEXTS"
"""
SCORE_IN_THE_CONTAINER = """
import importlib.util, json, sys, time
before = importlib.util.find_spec('lmforge')
start = time.monotonic()
import mlflow
model = mlflow.pyfunc.load_model('/model')
import lmforge
out = model.predict(json.loads(sys.argv[1]))
print('RESULT ' + json.dumps({'lmforge_before': before is not None, 'lmforge': lmforge.__file__,
                              'predictions': json.loads(out.to_json(orient='records')),
                              'seconds': time.monotonic() - start}))
"""


@pytest.mark.docker
@pytest.mark.slow
def test_the_model_loads_and_scores_where_only_its_own_requirements_are_installed(
    tiny_lm, tracking, scored_texts, tmp_path, docker_client, base_image, wheelhouse,
):
    """In a container of the bare Debian base (python3, no venv, no lmforge) with only the model
    directory (read-only) and the wheelhouse: `pip install --no-index --no-deps -r requirements.txt`
    into a new venv gives an environment in which `pip check` misses only ve-fairseq's torchaudio,
    lmforge is importable only from the model's code/, and the model scores as in this venv."""
    import secrets
    import time

    import mlflow

    result = register(tiny_lm, tracking)
    model_dir = Path(mlflow.artifacts.download_artifacts(result["model_uri"], dst_path=str(tmp_path / "model")))
    start = time.monotonic()
    expected = mlflow.pyfunc.load_model(str(model_dir)).predict(scored_texts)
    host_seconds = time.monotonic() - start

    # network "none": the install needs no index at all. User nobody: the bare base has no user
    # of its own, and the test needs none of root's rights (its venv goes to /tmp).
    started = time.monotonic()
    container = docker_client.containers.run(
        base_image, ["sh", "-c", IN_A_BARE_CONTAINER], name=f"lmforge-selfmodel-{secrets.token_hex(4)}",
        detach=True, network_mode="none", user="65534:65534",
        environment={"HOME": "/tmp", "SCORE": SCORE_IN_THE_CONTAINER, "TEXTS": json.dumps(scored_texts),
                     "PIP_DISABLE_PIP_VERSION_CHECK": "1", "GIT_PYTHON_REFRESH": "quiet"},
        volumes={str(model_dir): {"bind": "/model", "mode": "ro"},
                 str(wheelhouse): {"bind": "/wheelhouse", "mode": "ro"}},
    )
    try:
        status = container.wait(timeout=1200)["StatusCode"]
        log = container.logs().decode(errors="replace")
    finally:
        container.remove(force=True)
    seconds = time.monotonic() - started
    assert status == 0, log[-4000:]
    lines = log.splitlines()
    install_seconds = next(int(line.split()[1]) for line in lines if line.startswith("INSTALL_SECONDS "))
    found = json.loads(next(line for line in lines if line.startswith("RESULT "))[len("RESULT "):])
    print(f"bare container: {len(requirements.pins(IMPORTS))} wheels installed in {install_seconds} s, "
          f"load+predict {found['seconds']:.1f} s (this venv, in-process: {host_seconds:.1f} s), "
          f"{seconds:.0f} s in all")
    assert [line for line in lines if line.startswith("PIP_CHECK ")] == [
        "PIP_CHECK ve-fairseq 0.12.3 requires torchaudio, which is not installed."
    ]
    assert found["lmforge_before"] is False, "lmforge must come from the model alone"
    assert found["lmforge"] == "/model/code/lmforge/__init__.py"
    got = pd.DataFrame(found["predictions"])
    assert got.tokens.tolist() == expected.tokens.tolist()
    for column in ("log_prob", "eos_log_prob"):
        assert got[column].tolist() == pytest.approx(expected[column].tolist(), abs=1e-5), column


def test_a_model_pickled_under_the_old_module_name_still_loads_and_scores(
    tiny_lm, tracking, hub_expected, scored_texts, tmp_path, monkeypatch,
):
    """Models registered before lmforge 0.2 pickled their pyfunc as lmforge.scoring.FairseqLanguageModel
    (cloudpickle pickles an importable class by reference: module and name). Registered so here, the
    model loads in a fresh process through the lmforge.scoring re-export and scores as fairseq does."""
    import mlflow

    import lmforge.scoring  # the old module must be importable for cloudpickle to pickle by reference
    from lmforge.models.scoring import FairseqLanguageModel

    uri, _, _ = tracking
    assert lmforge.scoring.FairseqLanguageModel is FairseqLanguageModel
    with monkeypatch.context() as patch:  # undone on leaving: the fresh process sees today's class
        patch.setattr(FairseqLanguageModel, "__module__", "lmforge.scoring")
        result = register(tiny_lm, tracking)
    assert FairseqLanguageModel.__module__ == "lmforge.models.scoring"

    local = Path(mlflow.artifacts.download_artifacts(result["model_uri"], dst_path=str(tmp_path / "download")))
    pickled = (local / "python_model.pkl").read_bytes()
    assert b"lmforge.scoring" in pickled and b"lmforge.models.scoring" not in pickled
    from_list, from_frame, module, _ = predict_in_a_fresh_process(uri, result["model_uri"], scored_texts, tmp_path)
    assert_scores_like_fairseq(from_list, hub_expected)
    assert_scores_like_fairseq(from_frame, hub_expected)
    assert module == "lmforge.models.scoring"  # unpickled through the re-export: the one class


def test_registering_the_same_checkpoint_twice_yields_one_version(tiny_lm, tracking):
    _, client, _ = tracking
    first = register(tiny_lm, tracking)
    again = register(tiny_lm, tracking)
    assert again == {**first, "created": False}
    assert [str(v.version) for v in client.search_model_versions(f"name = '{NAME}'")] == ["1"]


def test_the_gate_promotes_better_and_keeps_worse_and_incomparable_as_challengers(tiny_lm, tracking, tmp_path):
    _, client, _ = tracking
    first = register(tiny_lm, tracking, evaluation=evaluation(100.0))
    worse = register(tiny_lm, tracking, checkpoint=variant(tiny_lm, tmp_path, 1), evaluation=evaluation(120.0))
    other = register(tiny_lm, tracking, checkpoint=variant(tiny_lm, tmp_path, 2),
                     evaluation=evaluation(50.0, context_window=32))
    better = register(tiny_lm, tracking, checkpoint=variant(tiny_lm, tmp_path, 3), evaluation=evaluation(90.0))
    assert [r["alias"] for r in (first, worse, other, better)] == ["champion", "challenger", "challenger", "champion"]
    assert worse["reason"] == "worse: perplexity 120 does not beat champion v1's 100"
    assert other["reason"] == "not comparable with champion v1: differs in context_window (32 vs 0)"
    assert better["reason"] == "better: perplexity 90 beats champion v1's 100"
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "4"
    assert str(client.get_model_version_by_alias(NAME, "challenger").version) == "3"
    tags = {v: client.get_model_version(NAME, v).tags for v in ("1", "2", "3", "4")}
    assert [tags[v]["lmforge.promotion"] for v in "1234"] == ["champion", "challenger", "challenger", "champion"]
    assert tags["2"]["lmforge.promotion_reason"].startswith("worse:")
    assert tags["3"]["lmforge.promotion_reason"].startswith("not comparable")
    assert tags["1"]["lmforge.promotion_reason"] == "replaced by v4: better: perplexity 90 beats champion v1's 100"


def _assert_nothing_registered(client):
    assert client.search_registered_models() == []


def test_a_missing_checkpoint_is_a_one_line_error(tiny_lm, tracking, tmp_path):
    _, client, _ = tracking
    with pytest.raises(LmforgeError) as err:
        register(tiny_lm, tracking, checkpoint=tmp_path / "nope.pt")
    assert "\n" not in str(err.value) and "nope.pt does not exist" in str(err.value)
    _assert_nothing_registered(client)


def test_a_missing_dictionary_is_a_one_line_error(tiny_lm, tracking, tmp_path):
    _, client, _ = tracking
    with pytest.raises(LmforgeError) as err:
        register(tiny_lm, tracking, dict_path=tmp_path / "dict.txt")
    assert "\n" not in str(err.value) and "checkpoint without its dictionary" in str(err.value)
    _assert_nothing_registered(client)


def test_a_dictionary_of_another_model_is_a_one_line_error(tiny_lm, tracking, tmp_path):
    _, client, _ = tracking
    other = tmp_path / "other" / "dict.txt"
    other.parent.mkdir()
    lines = tiny_lm.dict_path.read_text(encoding="utf-8").splitlines()
    other.write_text("\n".join(lines + [f"extra{i} 1" for i in range(8)]) + "\n", encoding="utf-8")
    with pytest.raises(LmforgeError) as err:
        register(tiny_lm, tracking, dict_path=other)
    assert "\n" not in str(err.value) and "does not load with" in str(err.value)
    _assert_nothing_registered(client)


def test_an_unknown_run_id_is_a_one_line_error(tiny_lm, tracking):
    _, client, _ = tracking
    with pytest.raises(LmforgeError) as err:
        register(tiny_lm, tracking, run_id="0" * 32)
    assert "\n" not in str(err.value) and "not found" in str(err.value)
    _assert_nothing_registered(client)


def test_cli_register_without_the_dictionary_is_a_one_line_error(tiny_lm, tmp_path, capsys):
    from lmforge.cli import main

    bare = tmp_path / "data-bin"
    bare.mkdir()
    status = main(["register", "--config", str(TINY_CONFIG),
                   "--set", f"storage.root={tmp_path / 'runs'}", "--data-bin", str(bare),
                   "--checkpoint", str(tiny_lm.checkpoint)])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 1 and err[-1].startswith("lmforge: error: checkpoint without its dictionary: ")
    assert not (tmp_path / "runs").exists()  # nothing created, not even a tracking run


@pytest.fixture(scope="module")
def bpe_lm(tmp_path_factory):
    """A tiny LM on a byte-level BPE data-bin built by lmforge.data.preprocess, trained for real (fairseq-train, 3 updates)."""
    from conftest import VENV_BIN, run_checked, write_corpus
    from lmforge.data.preprocess import preprocess

    base = tmp_path_factory.mktemp("bpe-lm")
    corpus = write_corpus(base / "corpus", train_lines=200)
    for split in ("valid", "test"):  # small held-out splits: only training time matters here
        lines = (corpus / f"{split}.txt").read_text(encoding="utf-8").splitlines(keepends=True)
        (corpus / f"{split}.txt").write_text("".join(lines[:50]), encoding="utf-8")
    data = base / "data-bin"
    preprocess(corpus, data, tokenizer="bpe", vocab_size=500)
    run_checked(
        [VENV_BIN / "fairseq-train", data, "--task", "language_modeling", "--arch", "transformer_lm",
         "--decoder-layers", "1", "--decoder-embed-dim", "32", "--decoder-ffn-embed-dim", "64",
         "--decoder-attention-heads", "2", "--tokens-per-sample", "64", "--max-tokens", "512", "--max-update", "3",
         "--optimizer", "adam", "--lr", "0.001", "--cpu", "--no-epoch-checkpoints", "--num-workers", "0",
         "--save-dir", base / "ckpt"],
    )
    return base / "ckpt" / "checkpoint_last.pt", data


def test_a_bpe_model_carries_its_tokenizer_and_scores_raw_text(bpe_lm, tracking):
    """predict(raw text) equals fairseq's hub on the text as preprocessing tokenized it; continuations decode."""
    import mlflow
    from fairseq.models.transformer_lm import TransformerLanguageModel

    from lmforge.data.tokenization import load_tokenizer

    checkpoint, data = bpe_lm
    uri, client, run_id = tracking
    result = register_model(checkpoint=checkpoint, dict_path=data / "dict.txt", model_name="bpe-lm", tracking_uri=uri,
                            run_id=run_id, tags={}, evaluation=evaluation(100.0))
    tokenizer = load_tokenizer(data)
    version = client.get_model_version("bpe-lm", result["version"])
    assert tokenizer.kind == "bpe" and version.tags["tokenizer_sha256"] == tokenizer.sha256 != ""
    local = Path(mlflow.artifacts.download_artifacts(result["model_uri"]))
    assert sorted(p.name for p in (local / "artifacts" / "tokenizer").iterdir()) == sorted(p.name for p in tokenizer.files())

    text = "The game's release in Japan, however, was delayed."
    model = mlflow.pyfunc.load_model(result["model_uri"])
    row = model.predict([text]).iloc[0]
    hub = TransformerLanguageModel.from_pretrained(str(checkpoint.parent), checkpoint.name, data_name_or_path=str(data))
    expected = hub.eval().score(tokenizer.encode(text))["positional_scores"]
    assert row.tokens == expected.numel() > len(text.split())  # subword tokens
    assert row.log_prob == pytest.approx(float(expected.sum()), abs=1e-4)
    continuation = model.predict([text], params={"continuation_tokens": 4, "seed": 1})["continuation"][0]
    assert continuation and "\u0120" not in continuation  # decoded text, not byte-level BPE symbols
