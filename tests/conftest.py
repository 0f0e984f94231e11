"""Shared fixtures: text for every stage, and small corpora, models and stores built from it.

The text is WikiText-2's valid and test splits from ../shared/data where that folder is present,
and seeded WikiText-shaped text (tests/synthetic_text.py) where it is absent, as on a fresh clone:
every stage runs either way. Only tests whose point is WikiText itself (catalog pins, published
sizes and digests) carry `needs_wikitext` and skip without it. LMFORGE_TEST_SHARED_DATA names
another shared data folder; a path that does not exist acts as a fresh clone. Upstream schemas
(the Training Operator's PyTorchJob CRD) come from ../shared/schemas the same way
(LMFORGE_TEST_SHARED_SCHEMAS); the tests that check against them skip without it:

    LMFORGE_TEST_SHARED_DATA=/nonexistent PYTHONPATH=src .venv/bin/python -m pytest
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import synthetic_text

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("LMFORGE_TEST_SHARED_DATA") or REPO.parent / "shared" / "data")
WIKITEXT_DIR = SHARED_DATA / "wikitext-2"
HAVE_WIKITEXT = (WIKITEXT_DIR / "valid.txt").is_file() and (WIKITEXT_DIR / "test.txt").is_file()
SHARED_SCHEMAS = Path(os.environ.get("LMFORGE_TEST_SHARED_SCHEMAS") or REPO.parent / "shared" / "schemas")
VENV_BIN = Path(sys.executable).parent

needs_wikitext = pytest.mark.skipif(
    not HAVE_WIKITEXT, reason=f"checks WikiText-2 itself; its text is not at {WIKITEXT_DIR} (the shared data folder is absent)"
)


_session: dict[str, pytest.TempPathFactory] = {}


@pytest.fixture(autouse=True)
def _print_restored():
    """builtins.print as it was before each test. KFP's local runner indents task logs by swapping
    builtins.print per task, which is not thread-safe: a test that runs a ParallelFor through
    kfp.local directly can leave an indenting print behind, and every later test's output would
    start with spaces (`lmforge run` restores it itself: pipeline/local_run.py)."""
    import builtins

    original = builtins.print
    yield
    builtins.print = original


@pytest.fixture(scope="session", autouse=True)
def _temp_for_generated_text(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Lets corpus_text() write the generated text under this session's temporary folder."""
    _session["tmp"] = tmp_path_factory


def corpus_text() -> Path:
    """A folder with valid.txt and test.txt: WikiText-2's where the shared data is present, else the
    generated stand-in of the same line counts (written once per session)."""
    if HAVE_WIKITEXT:
        return WIKITEXT_DIR
    dest = _session["tmp"].getbasetemp() / "generated-text"
    if not (dest / "test.txt").is_file():  # written after valid.txt
        synthetic_text.write_splits(dest)
    return dest


def write_corpus(dest: Path, train_lines: int | None = None) -> Path:
    """train = valid.txt (optionally its first lines), valid/test = the two halves of test.txt (corpus_text())."""
    source = corpus_text()
    dest.mkdir(parents=True, exist_ok=True)
    valid = (source / "valid.txt").read_text(encoding="utf-8").splitlines(keepends=True)
    test = (source / "test.txt").read_text(encoding="utf-8").splitlines(keepends=True)
    half = len(test) // 2
    (dest / "train.txt").write_text("".join(valid[:train_lines]), encoding="utf-8")
    (dest / "valid.txt").write_text("".join(test[:half]), encoding="utf-8")
    (dest / "test.txt").write_text("".join(test[half:]), encoding="utf-8")
    return dest


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """About 30k training tokens: enough for a model to learn something in seconds."""
    return write_corpus(tmp_path_factory.mktemp("corpus"), train_lines=600)


TINY_CONFIG = REPO / "pipelines" / "configs" / "tiny.yaml"


def lmforge_run_command(corpus: Path, root: Path, *overrides: str, runner: str = "subprocess") -> list[str]:
    """The `lmforge run` command line of the tiny config on `corpus` into `root`, `--set` each override."""
    return [sys.executable, "-m", "lmforge.cli", "run", "--config", str(TINY_CONFIG), "--corpus", str(corpus),
            "--set", f"storage.root={root}", *(x for o in overrides for x in ("--set", o)), "--runner", runner]


def lmforge_run(cwd: Path, corpus: Path, root: Path, *overrides: str, runner: str = "subprocess",
                timeout: int = 900, env: dict[str, str] | None = None) -> dict[str, str]:
    """`lmforge run` of the tiny config on `corpus` into `root`, in a subprocess as a user runs it (in `env`,
    default this process's); the summary it prints (test perplexity, outputs, MLflow, model), or a test
    failure with its log's tail."""
    command = lmforge_run_command(corpus, root, *overrides, runner=runner)
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = dict(line.split(":", 1) for line in result.stdout.splitlines() if ":" in line)
    return {k.strip(): v.strip() for k, v in summary.items()}


def registered_model_scores(tracking_uri: str, model_uri: str, texts: list[str]) -> list[dict]:
    """The registered pyfunc loaded from the registry in a fresh process, as a user would, and its rows for `texts`."""
    import json

    code = (
        f"import json, mlflow; m = mlflow.pyfunc.load_model({model_uri!r});"
        f"print(json.dumps(m.predict({list(texts)!r}).to_dict('records')))"
    )
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def small_data_bin(small_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from lmforge.data.preprocess import preprocess

    out = tmp_path_factory.mktemp("data") / "data-bin"
    preprocess(small_corpus, out, threshold=2)
    return out


@pytest.fixture(scope="session")
def trained_checkpoints(small_data_bin: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """A tiny model trained for real by the train stage: torchrun, 2 CPU processes, 12 updates."""
    from lmforge import config
    from lmforge.training.train import train

    base = tmp_path_factory.mktemp("train")
    cfg = config.load(TINY_CONFIG, ["train.max_update=12", "train.max_epoch=0", "train.log_interval=2",
                                    f"train.cache_dir={base / 'cache'}"])
    save_dir = base / "checkpoints"
    return save_dir, train(cfg, small_data_bin, save_dir)


# --------------------------------------------------------------------------------------------
# A tiny fairseq LM and fairseq's own scores for it, shared by test_scoring.py and
# test_register.py (neither test module imports the other).

from dataclasses import dataclass  # noqa: E402

#: What the scoring tests score: an empty text, out-of-vocabulary words, a one-word text.
SCORED_TEXTS = (
    "the cat sat on the mat",
    "",
    "Homarus gammarus , known as the European lobster , is a species of lobster",
    "zzzqqq unknownword",
    "The",
)


@dataclass(frozen=True)
class TinyLM:
    checkpoint: Path  # fairseq checkpoint_last.pt, optimizer state included
    dict_path: Path  # data-bin/dict.txt
    data_bin: Path


def run_checked(cmd: list, timeout: int = 300) -> str:
    """Run `cmd`; its stdout and stderr together, or a test failure with their tails."""
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd[0]} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


def train_tiny_lm(base: Path) -> TinyLM:
    """Train a tiny transformer LM for real under `base`: fairseq-preprocess + fairseq-train on
    300 lines of corpus_text(), 5 updates, CPU (once: a second caller finds it done)."""
    lm = TinyLM(base / "ckpt" / "checkpoint_last.pt", base / "data-bin" / "dict.txt", base / "data-bin")
    if (base / "done").exists():
        return lm
    valid = corpus_text() / "valid.txt"
    base.mkdir(parents=True, exist_ok=True)
    lines = valid.read_text(encoding="utf-8").splitlines(keepends=True)
    (base / "train.txt").write_text("".join(lines[:300]), encoding="utf-8")
    (base / "valid.txt").write_text("".join(lines[300:350]), encoding="utf-8")
    run_checked(
        [VENV_BIN / "fairseq-preprocess", "--only-source", "--trainpref", base / "train.txt",
         "--validpref", base / "valid.txt", "--destdir", lm.data_bin, "--workers", "1"],
    )
    # decoder input/output dims 32 (default 512): a 0.9 MB model instead of 13 MB.
    # --tokens-per-sample 64: the model's max positions, so a text scores 63 words at most.
    run_checked(
        [VENV_BIN / "fairseq-train", lm.data_bin, "--task", "language_modeling",
         "--arch", "transformer_lm", "--decoder-layers", "1", "--decoder-embed-dim", "32",
         "--decoder-input-dim", "32", "--decoder-output-dim", "32",
         "--decoder-ffn-embed-dim", "64", "--decoder-attention-heads", "2",
         "--tokens-per-sample", "64", "--max-tokens", "512", "--max-update", "5",
         "--optimizer", "adam", "--lr", "0.001", "--cpu", "--no-epoch-checkpoints",
         "--num-workers", "0", "--seed", "1", "--save-dir", lm.checkpoint.parent],
    )
    assert lm.checkpoint.is_file() and lm.dict_path.is_file()
    (base / "done").touch()
    return lm


def load_hub(lm: TinyLM):
    """fairseq's own hub interface on the original checkpoint."""
    from fairseq.models.transformer_lm import TransformerLanguageModel

    hub = TransformerLanguageModel.from_pretrained(
        str(lm.checkpoint.parent), lm.checkpoint.name, data_name_or_path=str(lm.data_bin)
    )
    return hub.eval()


def reference_positional_scores(hub, text: str):
    """Per-token natural-log probabilities of text + eos, from one unbatched forward pass
    (no SequenceScorer): the words' scores, which the hub's score() also gives, then eos's."""
    import torch

    ids = hub.encode(text)  # words..., eos
    src = torch.cat([ids.new_tensor([hub.task.source_dictionary.eos()]), ids[:-1]]).unsqueeze(0)
    model = hub.models[0]
    with torch.no_grad():
        lprobs = model.get_normalized_probs(model(src), log_probs=True)[0]
    return lprobs.gather(-1, ids.unsqueeze(-1)).squeeze(-1)


def hub_expected_row(hub, text: str) -> dict:
    """What the registered model must return for `text`, from fairseq itself: log_prob and
    tokens from the hub's score(), eos_log_prob from the unbatched reference pass."""
    words = hub.score(text)["positional_scores"]
    return {
        "log_prob": float(words.sum()),
        "tokens": int(words.numel()),
        "eos_log_prob": float(reference_positional_scores(hub, text)[-1]),
    }


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory: pytest.TempPathFactory) -> TinyLM:
    return train_tiny_lm(tmp_path_factory.getbasetemp() / "tiny-lm")


@pytest.fixture(scope="session")
def tiny_hub(tiny_lm: TinyLM):
    """fairseq's hub interface (TransformerLanguageModel.from_pretrained) on the tiny LM."""
    return load_hub(tiny_lm)


@pytest.fixture(scope="session")
def scored_texts() -> list[str]:
    return list(SCORED_TEXTS)


@pytest.fixture(scope="session")
def hub_expected(tiny_hub, scored_texts):
    """One row per scored text: log_prob, tokens and eos_log_prob as fairseq computes them."""
    import pandas as pd

    return pd.DataFrame([hub_expected_row(tiny_hub, text) for text in scored_texts])


@pytest.fixture(scope="session")
def reference_scores(tiny_hub):
    """text -> per-token log-probabilities of its words and eos (`reference_positional_scores`)."""
    return lambda text: reference_positional_scores(tiny_hub, text)


@pytest.fixture(scope="session")
def moto_s3(tmp_path_factory: pytest.TempPathFactory):
    """A real S3 HTTP endpoint on 127.0.0.1 (moto's server), with credentials in the environment.

    Yields the endpoint URL; tests create their own buckets. AWS_ENDPOINT_URL is
    set for the whole session so subprocesses (KFP's local runner) see it too.
    """
    pytest.importorskip("moto")
    import os

    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"})
    yield endpoint
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    server.stop()


# A real `mlflow server` (PostgreSQL store, artifacts in moto S3) for the modules that ask for one.
from mlflow_server import mlflow_server, postgres_uri  # noqa: E402,F401


# --------------------------------------------------------------------------------------------
# Training-worker fixtures (tests/training/: test_worker.py, test_checkpoints.py, test_train.py): a data-bin
# whose validation split is small, so that runs which validate at every save stay quick.


@pytest.fixture(scope="session")
def fast_data_bin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """train: 400 lines of corpus_text() (~20k tokens); valid and test: 40 lines each."""
    from lmforge.data.preprocess import preprocess

    lines = (corpus_text() / "valid.txt").read_text(encoding="utf-8").splitlines(keepends=True)
    corpus = tmp_path_factory.mktemp("fast-corpus")
    (corpus / "train.txt").write_text("".join(lines[:400]), encoding="utf-8")
    (corpus / "valid.txt").write_text("".join(lines[400:440]), encoding="utf-8")
    (corpus / "test.txt").write_text("".join(lines[440:480]), encoding="utf-8")
    out = tmp_path_factory.mktemp("fast-data") / "data-bin"
    preprocess(corpus, out, threshold=2)
    return out


#: Tiny-preset settings for training tests: one process, 1024-token batches, a loss per update.
FAST_TRAINING = ["train.nproc=1", "train.max_tokens=1024", "train.log_interval=1", "train.max_epoch=0"]


def worker_command(config_file: Path, data_bin: Path, save_dir: str | Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "lmforge.worker", "--config", str(config_file), "--data", str(data_bin),
            "--save-dir", str(save_dir), *extra]


def train_inner_losses(log_text: str, key: str = "loss") -> dict[int, str]:
    """num_updates -> loss (or another statistic, as fairseq printed it) from fairseq's JSON
    'train_inner' log lines."""
    import json

    losses = {}
    for line in log_text.splitlines():
        if "| train_inner |" in line:
            stats = json.loads(line.split("| train_inner |", 1)[1])
            losses[int(stats["num_updates"])] = stats[key]
    return losses


def bare_config_file(directory: Path) -> Path:
    """A run config that sets nothing a preset sets, so that `--set model.preset=NAME` brings the
    preset's own model and training settings (the tiny config's train section would mask them).
    corpus.source is required and unused by `lmforge train` and `lmforge evaluate`."""
    path = directory / "bare.yaml"
    path.write_text("name: bare\ncorpus:\n  source: unused-by-train-and-evaluate\n")
    return path


def lmforge_cli(capfd: pytest.CaptureFixture, *args: str) -> tuple[dict, str]:
    """`lmforge ARGS` through the CLI's entry point in this process (a train's workers are torchrun's
    processes, writing to the same stderr): the JSON it printed and everything written to stderr."""
    import json

    from lmforge import cli

    capfd.readouterr()
    status = cli.main(list(args))
    out, err = capfd.readouterr()
    assert status == 0, f"lmforge {args[0]} exited {status}:\n{err[-3000:]}"
    return json.loads(out), err


@pytest.fixture(scope="session")
def interval_run(fast_data_bin: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One uninterrupted single-process worker run: 12 updates, a checkpoint every 4, a loss per update.

    Returns its config file, checkpoint directory, cache directory and losses by update.
    """
    from lmforge import config

    base = tmp_path_factory.mktemp("interval-run")
    cfg = config.load(TINY_CONFIG, [*FAST_TRAINING, "train.max_update=12", "train.save_interval_updates=4",
                                    f"train.cache_dir={base / 'cache'}"])
    config_file = base / "run-config.json"
    config_file.write_text(cfg.to_json())
    proc = subprocess.run(worker_command(config_file, fast_data_bin, base / "checkpoints"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"config_file": config_file, "checkpoints": base / "checkpoints", "cache": base / "cache",
            "losses": train_inner_losses(proc.stderr), "log": proc.stderr}


@pytest.fixture(scope="session")
def empty_mlflow_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An initialized, empty MLflow SQLite store to copy: creating the tables takes ~10 s, a copy ms."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


def nudged_checkpoint(checkpoint: Path, directory: Path, k: int) -> Path:
    """A copy of `checkpoint` with one bias nudged by k/1000: another checkpoint (sha256) of the same shapes."""
    import torch

    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    key = next(name for name in state["model"] if name.endswith("bias"))
    state["model"][key] = state["model"][key] + 1e-3 * k
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(state, directory / f"checkpoint{k}.pt")
    return directory / f"checkpoint{k}.pt"


# --------------------------------------------------------------------------- containers

import docker_env  # noqa: E402


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Where a run includes the container tests (a `-m` that selects them), they run last: a stable
    sort keeps every other test in its order."""
    items.sort(key=lambda item: item.get_closest_marker("docker") is not None)


@pytest.fixture(scope="session")
def docker_client():
    """A live Docker engine (skips with the reason where none answers)."""
    client = docker_env.engine_or_skip()
    yield client
    client.close()


@pytest.fixture(scope="session")
def steps_image(docker_client) -> str:
    """The steps image of this checkout, built hermetically; its tag (the pipeline's name)."""
    return docker_env.build_image(docker_client, "steps")


@pytest.fixture(scope="session")
def trainer_image(docker_client) -> str:
    """The trainer image of this checkout, CPU variant, built hermetically; its tag."""
    return docker_env.build_image(docker_client, "trainer")


@pytest.fixture(scope="session")
def base_image(docker_client) -> str:
    """The bare Debian base with Python 3.11 the images are built on (no lmforge, no venv)."""
    return docker_env.make_base_image(docker_client)


@pytest.fixture(scope="session")
def wheelhouse(docker_client) -> Path:
    """The filled wheelhouse the images install from (only the container tests need one)."""
    return docker_env.filled_wheelhouse()
