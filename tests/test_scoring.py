"""lmforge.scoring: the pyfunc language model against fairseq's own scoring.

A tiny fairseq transformer LM is trained for real (fairseq-preprocess + fairseq-train on 300
WikiText-2 lines, 5 updates, CPU) once per session; `tiny_lm_files` is shared with
tests/test_register.py.
"""

from __future__ import annotations

import math
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest

from lmforge.errors import LmforgeError
from lmforge.scoring import COLUMNS, FairseqLanguageModel, model_signature

WIKITEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2"
BIN = Path(sys.executable).parent

SENTENCES = [
    "the cat sat on the mat",
    "",
    "Homarus gammarus , known as the European lobster , is a species of lobster",
    "zzzqqq unknownword",
    "The",
]


@dataclass(frozen=True)
class TinyLM:
    checkpoint: Path  # fairseq checkpoint_last.pt, optimizer state included
    dict_path: Path  # data-bin/dict.txt
    data_bin: Path


def tiny_lm_files(base: Path) -> TinyLM:
    """Train the tiny LM under `base` (once: a second caller finds it done)."""
    lm = TinyLM(base / "ckpt" / "checkpoint_last.pt", base / "data-bin" / "dict.txt", base / "data-bin")
    if (base / "done").exists():
        return lm
    valid = WIKITEXT / "valid.txt"
    if not valid.is_file():
        pytest.skip(f"WikiText-2 sample not found at {valid} (the tiny LM is trained on it)")
    base.mkdir(parents=True, exist_ok=True)
    lines = valid.read_text(encoding="utf-8").splitlines(keepends=True)
    (base / "train.txt").write_text("".join(lines[:300]), encoding="utf-8")
    (base / "valid.txt").write_text("".join(lines[300:350]), encoding="utf-8")
    _run(
        [BIN / "fairseq-preprocess", "--only-source", "--trainpref", base / "train.txt",
         "--validpref", base / "valid.txt", "--destdir", lm.data_bin, "--workers", "1"],
    )
    # decoder input/output dims 32 (default 512): a 0.9 MB model instead of 13 MB.
    _run(
        [BIN / "fairseq-train", lm.data_bin, "--task", "language_modeling",
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


def _run(cmd: list) -> str:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{cmd[0]} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


def load_hub(lm: TinyLM):
    """fairseq's own hub interface on the original checkpoint."""
    from fairseq.models.transformer_lm import TransformerLanguageModel

    hub = TransformerLanguageModel.from_pretrained(
        str(lm.checkpoint.parent), lm.checkpoint.name, data_name_or_path=str(lm.data_bin)
    )
    return hub.eval()


def reference_positional_scores(hub, text: str):
    """Per-token natural-log probabilities of text + eos, from one unbatched forward pass."""
    import torch

    ids = hub.encode(text)  # words..., eos
    src = torch.cat([ids.new_tensor([hub.task.source_dictionary.eos()]), ids[:-1]]).unsqueeze(0)
    model = hub.models[0]
    with torch.no_grad():
        lprobs = model.get_normalized_probs(model(src), log_probs=True)[0]
    return lprobs.gather(-1, ids.unsqueeze(-1)).squeeze(-1)


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory) -> TinyLM:
    return tiny_lm_files(tmp_path_factory.getbasetemp() / "tiny-lm")


@pytest.fixture(scope="module")
def model(tiny_lm) -> FairseqLanguageModel:
    return FairseqLanguageModel.from_files(tiny_lm.checkpoint, tiny_lm.dict_path)


@pytest.fixture(scope="module")
def hub(tiny_lm):
    return load_hub(tiny_lm)


def test_scores_are_fairseq_hub_scores_plus_the_eos_token(model, hub):
    out = model.predict(None, SENTENCES)
    assert list(out.columns) == list(COLUMNS) and len(out) == len(SENTENCES)
    for text, row in zip(SENTENCES, out.itertuples()):
        ref = reference_positional_scores(hub, text)
        hub_scores = hub.score(text)["positional_scores"]
        # The reference is fairseq's hub scoring over the words, plus the eos position the
        # hub leaves out.
        assert len(hub_scores) == len(ref) - 1 == len(text.split())
        assert ref[:-1].tolist() == pytest.approx(hub_scores.tolist(), abs=1e-4)
        assert row.log_prob == pytest.approx(float(ref.sum()), abs=1e-4)
        assert row.log_prob == pytest.approx(float(hub_scores.sum()) + float(ref[-1]), abs=1e-4)
        assert row.tokens == len(text.split()) + 1
        assert row.perplexity == pytest.approx(math.exp(-row.log_prob / row.tokens), rel=1e-9)


@pytest.mark.slow
def test_totals_match_fairseq_eval_lm(model, tiny_lm, tmp_path):
    """fairseq-eval-lm --sample-break-mode eos scores each line the same way, eos included."""
    texts = SENTENCES  # the empty line too: fairseq-preprocess keeps it as a lone eos
    (tmp_path / "test.txt").write_text("\n".join(texts) + "\n", encoding="utf-8")
    data = tmp_path / "bin"
    # One interpreter for both CLIs: fairseq's import costs seconds.
    script = (
        "import sys\n"
        "from fairseq_cli import preprocess, eval_lm\n"
        f"sys.argv = ['fairseq-preprocess', '--only-source', '--srcdict', {str(tiny_lm.dict_path)!r},"
        f" '--testpref', {str(tmp_path / 'test.txt')!r}, '--destdir', {str(data)!r}, '--workers', '1']\n"
        "preprocess.cli_main()\n"
        f"sys.argv = ['fairseq-eval-lm', {str(data)!r}, '--path', {str(tiny_lm.checkpoint)!r},"
        " '--gen-subset', 'test', '--sample-break-mode', 'eos', '--max-tokens', '512', '--cpu',"
        " '--num-workers', '0']\n"
        "eval_lm.cli_main()\n"
    )
    log = _run([sys.executable, "-c", script])
    evaluated = int(re.search(r"Evaluated ([\d,]+) tokens", log).group(1).replace(",", ""))
    loss_base2 = float(re.search(r"Loss \(base 2\): ([\d.]+)", log).group(1))

    out = model.predict(None, texts)
    assert int(out.tokens.sum()) == evaluated
    ours = -out.log_prob.sum() / out.tokens.sum() / math.log(2)
    assert ours == pytest.approx(loss_base2, abs=1e-4)  # eval-lm prints 4 decimals


def test_batched_scores_equal_one_text_at_a_time(model):
    texts = SENTENCES + [" ".join(["the"] * n) for n in (3, 17, 40, 62)] + ["a b c"] * 5
    together = model.predict(None, texts)
    alone = pd.concat([model.predict(None, [t]) for t in texts], ignore_index=True)
    assert together.tokens.tolist() == alone.tokens.tolist()
    assert together.log_prob.tolist() == pytest.approx(alone.log_prob.tolist(), abs=1e-4)


def test_every_input_form_gives_the_same_frame(model):
    expected = model.predict(None, SENTENCES[:3])
    assert expected.dtypes.astype(str).tolist() == ["float64", "int64", "float64"]
    for given in (
        pd.DataFrame({"id": [1, 2, 3], "text": SENTENCES[:3]}),  # the `text` column
        pd.DataFrame({"sentence": SENTENCES[:3]}),  # else the first column
        pd.Series(SENTENCES[:3]),
        tuple(SENTENCES[:3]),
    ):
        pd.testing.assert_frame_equal(model.predict(None, given), expected)
    pd.testing.assert_frame_equal(model.predict(None, SENTENCES[0]), expected.iloc[:1])


def test_empty_text_is_the_eos_token_alone(model):
    row = model.predict(None, [""]).iloc[0]
    assert row.tokens == 1
    assert row.log_prob < 0
    assert row.perplexity == pytest.approx(math.exp(-row.log_prob))


def test_no_texts_give_an_empty_frame(model):
    out = model.predict(None, [])
    assert list(out.columns) == list(COLUMNS) and len(out) == 0


def test_a_text_longer_than_the_model_is_a_one_line_error(model):
    with pytest.raises(LmforgeError) as err:
        model.predict(None, ["short", " ".join(["word"] * 100)])
    message = str(err.value)
    assert "\n" not in message
    assert "text #1 has 101 tokens" in message and "at most 64" in message


def test_a_non_string_is_a_one_line_error(model):
    with pytest.raises(LmforgeError, match=r"text #1 is None"):
        model.predict(None, pd.DataFrame({"text": ["fine", None]}))


def test_signature_is_a_text_column_in_and_three_columns_out():
    sig = model_signature()
    assert sig.inputs.input_names() == ["text"]
    assert [c.type.name for c in sig.inputs.inputs] == ["string"]
    assert sig.outputs.input_names() == list(COLUMNS)
    assert [c.type.name for c in sig.outputs.inputs] == ["double", "long", "double"]


def test_importing_the_module_loads_neither_torch_nor_fairseq():
    code = "import sys, lmforge.scoring; print(sorted({'torch', 'fairseq'} & set(sys.modules)))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
