"""lmforge.models.scoring: the pyfunc language model against fairseq's own scoring.

The tiny fairseq LM (trained for real once per session), fairseq's hub interface on it and
the texts scored come from tests/conftest.py (`tiny_lm`, `tiny_hub`, `scored_texts`).
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys

import pandas as pd
import pytest

from lmforge.errors import LmforgeError
from lmforge.models.scoring import COLUMNS, FairseqLanguageModel, ScoringInputError, input_example, model_signature


@pytest.fixture(scope="module")
def model(tiny_lm) -> FairseqLanguageModel:
    return FairseqLanguageModel.from_files(tiny_lm.checkpoint, tiny_lm.dict_path)


def assert_scores_like_the_hub(out: pd.DataFrame, texts: list[str], hub, reference_scores) -> None:
    assert list(out.columns) == list(COLUMNS) and len(out) == len(texts)
    for text, row in zip(texts, out.itertuples()):
        hub_scores = hub.score(text)["positional_scores"]
        assert row.log_prob == pytest.approx(float(hub_scores.sum()), abs=1e-4), text
        assert row.tokens == hub_scores.numel(), text
        if row.tokens:
            assert row.perplexity == pytest.approx(math.exp(-row.log_prob / row.tokens), rel=1e-9)
        else:
            assert row.perplexity is pd.NA
        # The eos term, from one unbatched forward pass; its other positions are the hub's.
        ref = reference_scores(text)
        assert ref[:-1].tolist() == pytest.approx(hub_scores.tolist(), abs=1e-4)
        assert row.eos_log_prob == pytest.approx(float(ref[-1]), abs=1e-4), text


def test_scores_are_fairseq_hub_scores(model, tiny_hub, reference_scores, scored_texts):
    out = model.predict(None, scored_texts)
    assert_scores_like_the_hub(out, scored_texts, tiny_hub, reference_scores)
    assert out.tokens.tolist() == [len(text.split()) for text in scored_texts]
    assert (out.eos_log_prob < 0).all()


@pytest.mark.slow
def test_log_prob_plus_eos_matches_fairseq_eval_lm(model, tiny_lm, scored_texts, tmp_path):
    """fairseq-eval-lm --sample-break-mode eos scores each line with its eos: the words'
    log_prob plus eos_log_prob, over tokens + 1 per line."""
    texts = scored_texts  # the empty line too: fairseq-preprocess keeps it as a lone eos
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
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    evaluated = int(re.search(r"Evaluated ([\d,]+) tokens", log).group(1).replace(",", ""))
    loss_base2 = float(re.search(r"Loss \(base 2\): ([\d.]+)", log).group(1))

    out = model.predict(None, texts)
    total_tokens = int((out.tokens + 1).sum())
    assert total_tokens == evaluated
    ours = -(out.log_prob + out.eos_log_prob).sum() / total_tokens / math.log(2)
    assert ours == pytest.approx(loss_base2, abs=1e-4)  # eval-lm prints 4 decimals


def test_batched_scores_equal_one_text_at_a_time(model, scored_texts):
    texts = scored_texts + [" ".join(["the"] * n) for n in (3, 17, 40, 62, 63)] + ["a b c"] * 5
    together = model.predict(None, texts)
    alone = pd.concat([model.predict(None, [t]) for t in texts], ignore_index=True)
    assert together.tokens.tolist() == alone.tokens.tolist()
    for column in ("log_prob", "eos_log_prob"):
        assert together[column].tolist() == pytest.approx(alone[column].tolist(), abs=1e-4)


def test_the_longest_text_the_model_takes_scores_like_the_hub(model, tiny_hub, reference_scores):
    # max positions 64 = the start token and 63 words
    texts = [" ".join(["the", "game", "was"] * 21), " ".join(["lobster"] * 62)]
    assert_scores_like_the_hub(model.predict(None, texts), texts, tiny_hub, reference_scores)


def test_a_literal_eos_word_is_treated_as_the_hub_treats_it(model, tiny_hub):
    # The hub strips eos from both ends of the encoded text, not from its middle.
    texts = ["</s> the cat </s>", "the </s> cat", "</s>"]
    out = model.predict(None, texts)
    for text, row in zip(texts, out.itertuples()):
        hub_scores = tiny_hub.score(text)["positional_scores"]
        assert row.log_prob == pytest.approx(float(hub_scores.sum()), abs=1e-4), text
        assert row.tokens == hub_scores.numel(), text
    # At either end "</s>" is no word: the same scores as without it.
    pd.testing.assert_frame_equal(out.iloc[[0]], model.predict(None, ["the cat"]))
    pd.testing.assert_frame_equal(out.iloc[[2]].reset_index(drop=True), model.predict(None, [""]))
    assert out.tokens.tolist() == [2, 3, 0]


def test_every_input_form_gives_the_same_frame(model, scored_texts):
    texts = scored_texts[:3]
    expected = model.predict(None, texts)
    # perplexity and unk_fraction: nullable, <NA> (JSON null) for an empty text
    assert expected.dtypes.astype(str).tolist() == ["float64", "int64", "Float64", "float64", "int64", "Float64"]
    for given in (
        pd.DataFrame({"id": [1, 2, 3], "text": texts}),  # the `text` column
        pd.DataFrame({"sentence": texts}),  # else the first column
        pd.DataFrame({0: texts}),  # what MLflow makes of a list for the unnamed signature
        pd.Series(texts),
        tuple(texts),
    ):
        pd.testing.assert_frame_equal(model.predict(None, given), expected)
    pd.testing.assert_frame_equal(model.predict(None, texts[0]), expected.iloc[:1])


def test_an_empty_text_has_no_words_and_only_the_eos_term(model, tiny_hub):
    hub_scores = tiny_hub.score("")["positional_scores"]
    assert hub_scores.numel() == 0  # what fairseq gives: nothing
    row = model.predict(None, [""]).iloc[0]
    assert row.tokens == 0 and row.log_prob == 0.0 and row.unk_tokens == 0
    # No words, no mean over them: missing, not NaN (which is no JSON).
    assert row.perplexity is pd.NA and row.unk_fraction is pd.NA
    assert row.eos_log_prob < 0  # log p(</s> | nothing): an empty line's probability


def test_no_texts_give_an_empty_frame(model):
    out = model.predict(None, [])
    assert list(out.columns) == list(COLUMNS) and len(out) == 0


def test_unknown_words_are_counted_so_an_all_unknown_text_cannot_pass_as_fluent(model, tiny_lm):
    vocabulary = {line.split()[0] for line in tiny_lm.dict_path.read_text(encoding="utf-8").splitlines()}
    texts = ["zzzqqq unknownword qqqzzz", "the game was", "the zzzqqq was"]
    assert {w for t in texts for w in t.split()} - vocabulary == {"zzzqqq", "unknownword", "qqqzzz"}
    out = model.predict(None, texts)
    assert out.unk_tokens.tolist() == [3, 0, 1]
    assert out.unk_fraction.tolist() == pytest.approx([1.0, 0.0, 1 / 3])
    # A literal "<unk>" is the unknown word too.
    assert model.predict(None, ["<unk> game"]).unk_tokens.tolist() == [1]


def test_a_text_longer_than_the_model_is_a_one_line_error(model):
    with pytest.raises(LmforgeError) as err:
        model.predict(None, ["short", " ".join(["word"] * 64)])
    message = str(err.value)
    assert "\n" not in message
    assert "text #1 has 64 tokens" in message and "at most 63" in message


@pytest.mark.parametrize("value,shown", [(None, "null (NoneType)"), (3, "3 (int)"), (float("nan"), "nan (float)"),
                                         (["a"], "['a'] (list)"), (True, "True (bool)")])
def test_a_non_string_is_a_one_line_error(model, value, shown):
    with pytest.raises(LmforgeError) as err:
        model.predict(None, pd.DataFrame({"text": ["fine", value]}))
    assert str(err.value) == f'text #1 is {shown}, not a string: send every text as a string (an empty text as "")'


def test_a_scoring_input_error_is_an_mlflow_400_whose_message_stays_one_line():
    """What MLflow's scoring server makes of an exception raised in predict: an MlflowException keeps
    its error code (INVALID_PARAMETER_VALUE: status 400) and its message, which the server rewrites
    to 'Failed to predict data ...' (lmforge.models.scoring.ScoringInputError says why it stays)."""
    from mlflow.exceptions import MlflowException

    error = ScoringInputError("text #0 is null (NoneType), not a string")
    assert isinstance(error, LmforgeError) and isinstance(error, MlflowException)
    assert error.get_http_status_code() == 400
    error.message = f"Failed to predict data '{'x' * 100}'. \nError: {error.message}"
    assert json.loads(error.serialize_as_json())["message"] == "text #0 is null (NoneType), not a string"
    assert str(error) == "text #0 is null (NoneType), not a string"


def test_signature_is_one_unnamed_column_in_the_columns_out_and_sampling_params():
    sig = model_signature()
    # Unnamed: MLflow then accepts a plain list of str as well as a DataFrame. Of any type: the
    # model refuses what is not a string (a string column would turn null into "None" first).
    assert not sig.inputs.has_input_names() and len(sig.inputs.inputs) == 1
    assert sig.inputs.to_dict() == [{"type": "any", "required": True}]
    assert sig.outputs.input_names() == [*COLUMNS, "continuation"]
    assert [c.type.name for c in sig.outputs.inputs] == ["double", "long", "double", "double", "long", "double",
                                                          "string"]
    assert not sig.outputs.inputs[-1].required  # only with continuation_tokens > 0
    assert {p.name: p.default for p in sig.params.params} == {
        "continuation_tokens": 0, "temperature": 1.0, "top_k": 0, "seed": 0}


@pytest.mark.slow
def test_a_saved_model_takes_a_list_and_a_dataframe(tiny_lm, tiny_hub, reference_scores, scored_texts, tmp_path):
    """mlflow.pyfunc.save_model + load_model: the signature is enforced on both input forms."""
    import mlflow

    path = tmp_path / "model"
    mlflow.pyfunc.save_model(
        path,
        python_model=FairseqLanguageModel(),
        artifacts={"checkpoint": str(tiny_lm.checkpoint), "dict": str(tiny_lm.dict_path)},
        signature=model_signature(),
        input_example=input_example(),
        pip_requirements=["mlflow"],  # not inferred: that would load the model once more
    )
    loaded = mlflow.pyfunc.load_model(str(path))
    from_list = loaded.predict(scored_texts)
    assert_scores_like_the_hub(from_list, scored_texts, tiny_hub, reference_scores)
    for frame in (
        pd.DataFrame({"text": scored_texts}),
        pd.DataFrame({"text": scored_texts, "id": range(len(scored_texts))}),
        pd.Series(scored_texts),
    ):
        pd.testing.assert_frame_equal(loaded.predict(frame), from_list)
    pd.testing.assert_frame_equal(loaded.predict(scored_texts[0]), from_list.iloc[:1])


def test_importing_the_module_loads_neither_torch_nor_fairseq():
    code = "import sys, lmforge.models.scoring; print(sorted({'torch', 'fairseq'} & set(sys.modules)))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


# --------------------------------------------------------------------------- continuations, tokenizer


def test_a_continuation_is_sampled_with_the_parameter_and_repeats_with_its_seed(model, tiny_lm):
    texts = ["the game was", ""]
    params = {"continuation_tokens": 6, "seed": 7, "top_k": 20, "temperature": 0.9}
    first = model.predict(None, texts, params=params)
    again = model.predict(None, texts, params=params)
    pd.testing.assert_frame_equal(first, again)
    # The scores are those without the parameter; the continuation is one more column.
    pd.testing.assert_frame_equal(first[list(COLUMNS)], model.predict(None, texts))
    vocabulary = {line.split()[0] for line in tiny_lm.dict_path.read_text(encoding="utf-8").splitlines()}
    for continuation in first["continuation"]:
        words = continuation.split()
        assert 1 <= len(words) <= 6 and set(words) <= vocabulary | {"<unk>"}
    other_seed = model.predict(None, texts, params={**params, "seed": 8})
    assert other_seed["continuation"].tolist() != first["continuation"].tolist()


def test_a_continuation_matches_fairseq_hub_sampling(model, tiny_hub):
    """The same seed through the hub's own sample(): the same words after the prompt."""
    import torch

    prompt = "the game was"
    torch.manual_seed(3)
    expected = tiny_hub.sample(prompt, beam=1, sampling=True, sampling_topk=-1, temperature=1.0, max_len_a=0, max_len_b=3 + 5)
    ours = model.predict(None, [prompt], params={"continuation_tokens": 5, "seed": 3})["continuation"][0]
    assert expected == f"{prompt} {ours}".strip()


@pytest.mark.parametrize(
    "params,needle",
    [({"continuation_tokens": -1}, ">= 0"), ({"beam": 2}, "unknown parameter 'beam'"), ({"seed": "x"}, "seed='x'")],
)
def test_bad_parameters_are_one_line_errors(model, params, needle):
    with pytest.raises(LmforgeError, match=re.escape(needle)):
        model.predict(None, ["a"], params=params)


def test_the_tokenizer_encodes_before_scoring(tiny_lm, tmp_path):
    """Raw text goes through the data-bin's tokenizer (kind none: whitespace tokens) before the dictionary."""
    (tmp_path / "tokenizer.json").write_text('{"kind": "none", "model": null, "sha256": null}')
    model = FairseqLanguageModel.from_files(tiny_lm.checkpoint, tiny_lm.dict_path, tokenizer_dir=tmp_path)
    assert model._tokenizer.kind == "none"
    spaced, plain = model.predict(None, ["  the   game\twas  ", "the game was"]).itertuples(index=False)
    assert spaced == plain


# --------------------------------------------------------------------------- through `mlflow models serve`


@pytest.fixture(scope="module")
def served(tiny_lm, empty_mlflow_db, tmp_path_factory):
    """The tiny LM registered by lmforge.models.register (SQLite store), served by a real `mlflow models serve`
    on 127.0.0.1 (tests/test_mlflow_server.py's helpers); its base URL."""
    import shutil

    from lmforge import tracking
    from lmforge.models.register import register_model
    from mlflow_server import model_server

    base = tmp_path_factory.mktemp("served")
    shutil.copyfile(empty_mlflow_db, base / "mlflow.db")
    uri = f"sqlite:///{base / 'mlflow.db'}"
    run_id = tracking.pipeline_run(uri, "lmforge-serving", "pipeline-1", storage_root=base)
    result = register_model(checkpoint=tiny_lm.checkpoint, dict_path=tiny_lm.dict_path, model_name="served-lm",
                            tracking_uri=uri, run_id=run_id, tags={})
    with model_server(result["model_uri"], uri, base) as url:
        yield url


def strict_json(body: str):
    """json.loads that refuses NaN and Infinity, as JavaScript's JSON.parse and most other parsers do."""
    def refuse(constant: str):
        raise ValueError(f"not JSON: {constant}")

    return json.loads(body, parse_constant=refuse)


NOT_A_STRING = 'not a string: send every text as a string (an empty text as "")'
BAD_REQUESTS = {
    "null": ({"inputs": [None]}, f"text #0 is null (NoneType), {NOT_A_STRING}"),
    "null after a text": ({"inputs": ["the game was", None]}, f"text #1 is null (NoneType), {NOT_A_STRING}"),
    "a number": ({"inputs": [3]}, f"text #0 is 3 (int), {NOT_A_STRING}"),
    "true": ({"inputs": [True]}, f"text #0 is True (bool), {NOT_A_STRING}"),
    "null in a frame": ({"dataframe_split": {"columns": ["text"], "data": [[None]]}},
                        f"text #0 is null (NoneType), {NOT_A_STRING}"),
    "too long": ({"inputs": [" ".join(["the"] * 64)]},
                 "text #0 has 64 tokens; this model scores at most 63 per text (its max positions, 64, less the start "
                 "token): split the text"),
    "a bad parameter": ({"inputs": ["the game"], "params": {"top_k": -1}},
                        "continuation_tokens and top_k must be >= 0 and temperature > 0"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", BAD_REQUESTS, ids=list(BAD_REQUESTS))
def test_the_model_server_answers_bad_input_400_with_lmforges_line(served, case):
    from mlflow_server import post_invocations

    payload, line = BAD_REQUESTS[case]
    status, body = post_invocations(served, payload)
    answer = strict_json(body)
    assert status == 400, body
    assert answer["error_code"] == "INVALID_PARAMETER_VALUE"
    assert answer["message"] == line  # the line itself: no "Failed to predict data ...", no echo of the request
    assert "stack_trace" not in answer


@pytest.mark.slow
def test_the_model_server_scores_the_empty_text_as_valid_json_with_null_perplexity(served):
    from mlflow_server import post_invocations

    status, body = post_invocations(served, {"inputs": ["", "the game was"]})
    assert status == 200, body
    empty, words = strict_json(body)["predictions"]
    assert empty["tokens"] == 0 and empty["log_prob"] == 0.0 and empty["eos_log_prob"] < 0
    assert empty["perplexity"] is None and empty["unk_fraction"] is None and empty["unk_tokens"] == 0
    assert words["tokens"] == 3 and words["perplexity"] > 1 and words["unk_fraction"] == 0.0


@pytest.mark.slow
def test_the_model_server_says_how_much_of_a_text_was_unknown(served):
    """Unknown words all score as <unk>, often better than real words: the count is what gives it away.
    The text "None" is a word like any other (the JSON null is refused, above)."""
    from mlflow_server import post_invocations

    status, body = post_invocations(served, {"inputs": ["zzzqqq unknownword qqqzzz", "the game was", "None"]})
    assert status == 200, body
    unknown, real, none = strict_json(body)["predictions"]
    assert (unknown["unk_tokens"], unknown["unk_fraction"]) == (3, 1.0)
    assert (real["unk_tokens"], real["unk_fraction"]) == (0, 0.0)
    assert (none["tokens"], none["unk_tokens"]) == (1, 1)


def test_a_damaged_checkpoint_or_dictionary_is_one_line(tiny_lm, tmp_path):
    """The scorer (the pyfunc's load_context and from_files) names the damaged file, as train,
    evaluate and register do (lmforge.data.integrity), instead of fairseq's traceback."""
    from lmforge.errors import LmforgeError
    from lmforge.models.scoring import FairseqLanguageModel

    truncated = tmp_path / "checkpoint.pt"
    truncated.write_bytes(tiny_lm.checkpoint.read_bytes()[:4096])
    with pytest.raises(LmforgeError) as info:
        FairseqLanguageModel.from_files(truncated, tiny_lm.dict_path, tokenizer_dir=tiny_lm.data_bin)
    line = str(info.value)
    assert line.startswith("cannot load the model: checkpoint ") and str(truncated) in line and "\n" not in line
    duplicated = tmp_path / "dict.txt"
    first = tiny_lm.dict_path.read_text().splitlines()[0]
    duplicated.write_text(tiny_lm.dict_path.read_text() + first + "\n")
    with pytest.raises(LmforgeError, match=r"cannot load the model: .*dict\.txt lists a symbol twice"):
        FairseqLanguageModel.from_files(tiny_lm.checkpoint, duplicated, tokenizer_dir=tiny_lm.data_bin)
