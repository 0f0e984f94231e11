"""The registered language model: an MLflow pyfunc model that scores texts with a fairseq LM.

In:  three MLflow artifacts, ``checkpoint`` (a fairseq language-model checkpoint, .pt),
     ``dict`` (the ``dict.txt`` it was trained with) and ``tokenizer`` (a directory with the
     tokenizer preprocessing applied, see `lmforge.data.tokenization`; optional), and texts to
     score: a list of str, a pandas Series, or a DataFrame with a ``text`` column (else its
     first column). Raw text: the tokenizer's ``encode`` runs first.
Out: a DataFrame with one row per text:

     - ``log_prob``: natural-log probability of the text's words, ``log p(w1..wn)``: exactly
       what fairseq's hub interface gives,
       ``TransformerLanguageModel.from_pretrained(...).score(text)["positional_scores"].sum()``
       (0.0 for an empty text);
     - ``tokens``: the number of words scored (the hub's ``positional_scores.numel()``);
     - ``perplexity``: ``exp(-log_prob / tokens)``; missing for an empty text, which has no
       words to average over (pandas ``<NA>`` in a nullable ``Float64`` column, JSON ``null``
       from a model server: never NaN, which strict JSON parsers reject);
     - ``eos_log_prob``: ``log p(</s> | w1..wn)``, the end-of-sentence token after the text.
       A whole-sentence probability, as fairseq-train and fairseq-eval-lm
       (``--sample-break-mode eos``) count a line, is ``log_prob + eos_log_prob`` over
       ``tokens + 1`` tokens;
     - ``unk_tokens`` and ``unk_fraction``: how many of the words are not in ``dict.txt`` and
       were scored as ``<unk>``, and their share of ``tokens`` (missing for an empty text). A
       text of unknown words gets the model's (often good) score of ``<unk>``: a low perplexity
       with ``unk_fraction`` 1.0 says nothing about the text;
     - ``continuation`` (only with the ``continuation_tokens`` parameter > 0): up to that
       many tokens sampled after the text (``temperature``, ``top_k``, ``seed`` parameters),
       decoded by the tokenizer: ``model.predict(texts, params={"continuation_tokens": 20})``.

Bad input (a text that is not a string, null included; a text longer than the model's
context; an unknown or bad parameter) raises `ScoringInputError`: one line naming the text
and what to change. Called in Python it is an `LmforgeError`; raised in `mlflow models serve`
it is the response, status 400, whose JSON ``message`` is that line.

`lmforge register ...` (see `lmforge.models.register`) logs and registers it with lmforge's code
and its exact requirements (`IMPORTS`' closure); anyone then loads it by name, in any process that
has those requirements (lmforge need not be installed), and passes a plain list of texts or a
DataFrame whose (first) column holds them:

    model = mlflow.pyfunc.load_model("models:/lmforge-lm@champion")
    model.predict(["the cat sat on the mat"])
    model.predict(pd.DataFrame({"text": ["the cat sat on the mat"]}))

The signature's input is one unnamed column, which is what lets MLflow accept both forms: it
turns a list into a one-column frame and checks a frame's first column. (A named ``text``
column would reject the plain list.) So a frame passed to a loaded model must have its texts
first; called directly (`from_files`), `predict` also finds a ``text`` column elsewhere. The
column's type is ``any``, not ``string``: for a string column MLflow's scoring server turns the
JSON values of ``{"inputs": [...]}`` into numpy strings before `predict` sees them (``null``
becomes the text "None", ``3`` "3", ``true`` "True"), so they would be scored as words. With
``any`` they arrive as sent and `as_texts` refuses every value that is not a string.

Texts pass through the tokenizer, then are split on whitespace, as fairseq's dictionary
expects; tokens missing from ``dict.txt`` score as ``<unk>``.

The model is loaded through fairseq's hub utilities exactly as
``TransformerLanguageModel.from_pretrained`` does, and batches are scored with fairseq's own
``SequenceScorer`` on the hub's input, ``[</s>, w1..wn]`` (``<s>`` first for
``--add-bos-token`` models). The target is ``[w1..wn, </s>]``, where the hub pads the last
position away: one forward pass gives the hub's word scores and the eos term together.

fairseq and torch are imported inside the methods: importing this module stays cheap.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Any, NamedTuple

import mlflow.pyfunc
import pandas as pd  # already loaded by mlflow.pyfunc; needed at import for the type hints
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from lmforge.errors import LmforgeError

#: Output columns, in order.
COLUMNS = ("log_prob", "tokens", "perplexity", "eos_log_prob", "unk_tokens", "unk_fraction")
CONTINUATION = "continuation"

#: predict() parameters and their defaults (the signature's params schema).
PARAMS = {"continuation_tokens": 0, "temperature": 1.0, "top_k": 0, "seed": 0}

#: Padded tokens per forward pass. 4096 fp32 positions x a 50k vocabulary is ~800 MB of
#: log-probabilities at most, the same order as fairseq-eval-lm's usual --max-tokens.
MAX_BATCH_TOKENS = 4096

#: The input example stored with the model (and used to check a model loads and scores).
EXAMPLE_TEXTS = ("the cat sat on the mat", "")

#: The top-level packages this pyfunc imports, lazy imports included (lmforge's own code travels
#: with the model): the registered model's requirements are their closure
#: (`lmforge.models.requirements`). cloudpickle unpickles the model; tokenizers and sentencepiece
#: are imported by `lmforge.data.tokenization` for the tokenizer kinds that need them.
IMPORTS = ("mlflow", "cloudpickle", "pandas", "numpy", "torch", "fairseq", "tokenizers", "sentencepiece")


class ScoringInputError(LmforgeError, MlflowException):
    """Input the model cannot score: one line naming the text or parameter and what to change.

    An LmforgeError for Python callers (the CLI prints the line). An MlflowException with
    INVALID_PARAMETER_VALUE, because that is what MLflow's scoring server answers with status 400
    and the exception's ``message`` (any other exception becomes a generic "Encountered an
    unexpected error while evaluating the model" with the line buried in ``stack_trace``).
    """

    def __init__(self, message: str) -> None:
        MlflowException.__init__(self, message, error_code=INVALID_PARAMETER_VALUE)

    # The scoring server (mlflow.pyfunc.scoring_server.invocations, MLflow 3.17) rewrites
    # `message` to "Failed to predict data '<the whole request>'. \nError: <message>" before
    # answering: two lines, and the request (a long text: all of it) echoed back. The answer's
    # message stays the one line.
    @property
    def message(self) -> str:
        return str(self.args[0])

    @message.setter
    def message(self, value: str) -> None:
        pass


def model_signature():
    """The pyfunc signature: one unnamed column of any type in (the module docstring says why
    any and why unnamed); the `COLUMNS` out, and the continuation when asked for."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema
    from mlflow.types.schema import AnyType

    return ModelSignature(
        inputs=Schema([ColSpec(AnyType())]),
        outputs=Schema(
            [
                ColSpec(DataType.double, "log_prob"),
                ColSpec(DataType.long, "tokens"),
                ColSpec(DataType.double, "perplexity"),  # null for an empty text
                ColSpec(DataType.double, "eos_log_prob"),
                ColSpec(DataType.long, "unk_tokens"),
                ColSpec(DataType.double, "unk_fraction"),  # null for an empty text
                ColSpec(DataType.string, CONTINUATION, required=False),
            ]
        ),
        params=ParamSchema(
            [
                ParamSpec("continuation_tokens", DataType.long, PARAMS["continuation_tokens"]),
                ParamSpec("temperature", DataType.double, PARAMS["temperature"]),
                ParamSpec("top_k", DataType.long, PARAMS["top_k"]),
                ParamSpec("seed", DataType.long, PARAMS["seed"]),
            ]
        ),
    )


def input_example() -> list[str]:
    """The example stored with the model: a plain list of texts, the simplest input."""
    return list(EXAMPLE_TEXTS)


def as_texts(model_input: Any) -> list[str]:
    """Normalize what `predict` accepts into a list of str; anything else is a user error."""
    if isinstance(model_input, str):
        values: list[Any] = [model_input]
    elif isinstance(model_input, pd.DataFrame):
        if model_input.shape[1] == 0:
            raise ScoringInputError("input DataFrame has no columns; pass a 'text' column of strings")
        column = "text" if "text" in model_input.columns else model_input.columns[0]
        values = model_input[column].tolist()
    elif isinstance(model_input, pd.Series):
        values = model_input.tolist()
    elif isinstance(model_input, (list, tuple)) or hasattr(model_input, "tolist"):
        values = list(model_input.tolist() if hasattr(model_input, "tolist") else model_input)
    else:
        raise ScoringInputError(
            f"cannot score a {type(model_input).__name__}; pass a list of str, a pandas Series "
            "or a DataFrame with a 'text' column"
        )
    for i, value in enumerate(values):
        if not isinstance(value, str):
            shown = "null" if value is None else _shortened(repr(value))
            raise ScoringInputError(
                f"text #{i} is {shown} ({type(value).__name__}), not a string: send every text as a string "
                '(an empty text as "")'
            )
    return values


def _shortened(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


class FairseqLanguageModel(mlflow.pyfunc.PythonModel):
    """Scores texts with a fairseq language model (see the module docstring).

    Artifacts: ``checkpoint``, ``dict`` and (optional) ``tokenizer``. Model config
    (optional): ``device`` ("cpu" by default, e.g. "cuda" or "cuda:1" where a GPU is present).
    """

    def __init__(self) -> None:
        # Filled by load_context/from_files; the instance pickled into the MLflow model
        # carries no weights (those are the artifacts).
        self._hub = None
        self._tokenizer = None

    # ------------------------------------------------------------------ loading

    def load_context(self, context) -> None:
        config = getattr(context, "model_config", None) or {}
        self._load(
            context.artifacts["checkpoint"], context.artifacts["dict"], config.get("device", "cpu"),
            context.artifacts.get("tokenizer"),
        )

    @classmethod
    def from_files(
        cls, checkpoint: str | os.PathLike, dict_path: str | os.PathLike, device: str = "cpu",
        tokenizer_dir: str | os.PathLike | None = None,
    ) -> FairseqLanguageModel:
        """The same model without MLflow: score straight from a checkpoint, its dict.txt and
        the directory holding the tokenizer (default: the dict's directory, a data-bin)."""
        model = cls()
        model._load(checkpoint, dict_path, device, tokenizer_dir if tokenizer_dir is not None else Path(dict_path).parent)
        return model

    def _load(
        self, checkpoint: str | os.PathLike, dict_path: str | os.PathLike, device: str,
        tokenizer_dir: str | os.PathLike | None = None,
    ) -> None:
        from lmforge.data.tokenization import load_tokenizer

        # No tokenizer directory (a model logged before tokenizers were packaged): whitespace tokens.
        self._tokenizer = load_tokenizer(tokenizer_dir) if tokenizer_dir is not None else _Whitespace()
        hub_utils = _import_fairseq_hub_utils()
        from lmforge.fairseq_api.calls import allow_legacy_checkpoints

        allow_legacy_checkpoints()  # an lstm_lm checkpoint pickles an argparse.Namespace
        checkpoint, dict_path = Path(checkpoint).resolve(), Path(dict_path).resolve()
        from lmforge.data import integrity

        # What fairseq's loader would meet as a traceback (a truncated checkpoint, a dictionary
        # with a duplicate), named in one line first.
        unreadable = integrity.model_problems(checkpoint, dict_path)
        if unreadable:
            raise LmforgeError("cannot load the model: " + "; ".join(unreadable))
        # fairseq's hub loader wants one directory holding the checkpoint, and reads the
        # dictionary from `data_name_or_path`/dict.txt. Staging both under fixed names in a
        # fresh directory makes the artifact file names irrelevant, keeps stray files (a
        # `code` or `merges.txt` next to the checkpoint would switch on BPE) out of sight,
        # and overrides the data path stored in the checkpoint (the training machine's).
        with tempfile.TemporaryDirectory(prefix="lmforge-lm-") as tmp:
            _link_or_copy(checkpoint, Path(tmp, "model.pt"))
            _link_or_copy(dict_path, Path(tmp, "dict.txt"))
            loaded = hub_utils.from_pretrained(tmp, checkpoint_file="model.pt", data_name_or_path=tmp)
        # The files are read completely by now: the dictionary and the weights live in memory.
        hub = hub_utils.GeneratorHubInterface(loaded["args"], loaded["task"], loaded["models"])
        self._hub = hub.to(device).eval()

    # ------------------------------------------------------------------ scoring

    # The pd.DataFrame hint tells MLflow to hand over the schema-checked frame as is (it also
    # accepts a list of str or a Series when called directly); without a hint MLflow warns.
    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        """Score texts; returns a DataFrame with the `COLUMNS` (see the module docstring)."""
        import numpy as np

        if self._hub is None:
            raise RuntimeError("FairseqLanguageModel used before load_context/from_files")
        settings = _params(params)
        texts = as_texts(model_input)
        scores = self.score_texts(texts)
        lp = np.array([s.log_prob for s in scores], dtype=np.float64)
        tokens = np.array([s.tokens for s in scores], dtype=np.int64)
        unk = np.array([s.unk_tokens for s in scores], dtype=np.int64)
        words = tokens > 0
        # An empty text has no words, so no mean over them: perplexity and unk_fraction are
        # missing (<NA>, JSON null), not NaN (0/0). A hopeless text has perplexity inf.
        with np.errstate(over="ignore"):
            ppl = np.exp(-lp / np.maximum(tokens, 1))
        out = pd.DataFrame(
            {
                "log_prob": lp,
                "tokens": tokens,
                "perplexity": pd.array(ppl, dtype="Float64", copy=False),
                "eos_log_prob": np.array([s.eos_log_prob for s in scores], dtype=np.float64),
                "unk_tokens": unk,
                "unk_fraction": pd.array(unk / np.maximum(tokens, 1), dtype="Float64"),
            },
            columns=list(COLUMNS),
        )
        out.loc[~words, ["perplexity", "unk_fraction"]] = pd.NA
        if settings["continuation_tokens"] > 0:
            out[CONTINUATION] = self.continue_texts(
                texts, settings["continuation_tokens"], temperature=settings["temperature"],
                top_k=settings["top_k"], seed=settings["seed"],
            )
        return out

    def continue_texts(self, texts: list[str], n: int, *, temperature: float = 1.0, top_k: int = 0,
                       seed: int = 0) -> list[str]:
        """Up to `n` tokens sampled after each text (fewer when the model ends it), decoded.

        fairseq's own generator (the hub's `generate`, sampling=True, beam 1), seeded: the
        same seed gives the same continuations, and the caller's RNG state is left alone.
        """
        import torch

        hub = self._hub
        eos = hub.task.source_dictionary.eos()
        limit = _max_positions(hub.max_positions)
        results = []
        with torch.random.fork_rng(devices=[hub.device] if hub.device.type == "cuda" else []):
            torch.manual_seed(seed)
            for text in texts:
                prompt = self.encode(text)[:-1]  # the words, without the eos the hub adds back
                budget = n if limit is None else max(0, min(n, limit - 1 - prompt.numel()))
                if budget == 0:
                    results.append("")
                    continue
                hypo = hub.generate(
                    [_append(prompt, eos)], beam=1, sampling=True, sampling_topk=top_k if top_k > 0 else -1,
                    temperature=temperature, max_len_a=0, max_len_b=prompt.numel() + budget,
                )[0][0]
                new = hypo["tokens"][prompt.numel():]
                if new.numel() and new[-1] == eos:
                    new = new[:-1]
                results.append(self._tokenizer.decode(hub.string(new)))
        return results

    def encode(self, text: str):
        """Token ids scored for `text`: its words, then eos (what fairseq-preprocess writes)."""
        # hub.encode is tokenize -> apply_bpe -> dictionary.encode_line (append_eos=True),
        # so a checkpoint configured with a tokenizer or BPE would be encoded the fairseq way.
        ids = self._hub.encode(self._tokenizer.encode(text))
        # The hub scores its encoding with eos stripped from both ends (StripTokenDataset):
        # a literal "</s>" word at either end is no word to it either.
        eos = self._hub.task.source_dictionary.eos()
        end = ids.numel()
        while end > 0 and ids[end - 1] == eos:
            end -= 1
        start = 0
        while start < end and ids[start] == eos:
            start += 1
        return _append(ids[start:end], eos)

    def score_texts(self, texts: list[str]) -> list[TextScore]:
        """For each text, in order: log p(words), the number of words, log p(eos | words), and how
        many of the words are <unk>."""
        import torch
        from fairseq.data import data_utils
        from fairseq.sequence_scorer import SequenceScorer

        hub = self._hub
        dictionary = hub.task.source_dictionary
        pad = dictionary.pad()
        # The first word is predicted from </s> (or <s> with --add-bos-token), as in training.
        add_bos = bool(getattr(getattr(hub.task, "args", None), "add_bos_token", False))
        start = dictionary.bos() if add_bos else dictionary.eos()
        limit = _max_positions(hub.max_positions)

        targets = [self.encode(text) for text in texts]  # words, then eos
        for i, target in enumerate(targets):
            # The input is the start token and the words: one position per word, plus one.
            if limit is not None and target.numel() > limit:
                raise ScoringInputError(
                    f"text #{i} has {target.numel() - 1} tokens; this model scores at most "
                    f"{limit - 1} per text (its max positions, {limit}, less the start token): "
                    "split the text"
                )

        scorer = SequenceScorer(hub.task.target_dictionary)
        results: list[TextScore | None] = [None] * len(texts)
        # Longest first, so each batch pads little and the first one shows the memory peak.
        order = sorted(range(len(texts)), key=lambda i: -targets[i].numel())
        for batch in _batches(order, [t.numel() for t in targets], MAX_BATCH_TOKENS):
            tgt = [targets[i] for i in batch]
            src = [torch.cat([tgt_i.new_tensor([start]), tgt_i[:-1]]) for tgt_i in tgt]
            sample = {
                "net_input": {
                    # Right padding: the decoder is causal, so pads after a text never reach it.
                    "src_tokens": data_utils.collate_tokens(src, pad, left_pad=False),
                    "src_lengths": torch.tensor([s.numel() for s in src], dtype=torch.long),
                },
                "target": data_utils.collate_tokens(tgt, pad, left_pad=False),
            }
            sample = _to_device(sample, hub.device)
            hypos = scorer.generate(hub.models, sample)
            for i, hypo in zip(batch, hypos):
                positional = hypo[0]["positional_scores"]
                words = positional[:-1]  # the last position is eos, which the hub does not score
                # .sum() of an empty tensor is 0.0, as the hub gives for an empty text.
                unknown = int((targets[i][:-1] == dictionary.unk()).sum())
                results[i] = TextScore(float(words.sum()), int(words.numel()), float(positional[-1]), unknown)
        return results  # type: ignore[return-value]


class TextScore(NamedTuple):
    """One text's numbers, as `score_texts` gives them."""

    log_prob: float  # log p(w1..wn), natural log
    tokens: int  # n, the words scored
    eos_log_prob: float  # log p(</s> | w1..wn)
    unk_tokens: int  # words scored as <unk> (not in dict.txt)


class _Whitespace:
    """The tokenizer of kind "none": text is already space-separated tokens."""

    kind, sha256 = "none", ""

    def encode(self, text: str) -> str:
        return text

    def decode(self, tokens: str) -> str:
        return tokens


def _params(params: dict | None) -> dict[str, Any]:
    """predict()'s parameters with their defaults; a bad value is a one-line error."""
    settings = dict(PARAMS)
    for key, value in (params or {}).items():
        if key not in PARAMS:
            raise ScoringInputError(f"unknown parameter {key!r}; known: {', '.join(PARAMS)}")
        try:
            settings[key] = type(PARAMS[key])(value)
        except (TypeError, ValueError):
            raise ScoringInputError(f"parameter {key}={value!r} is not a {type(PARAMS[key]).__name__}") from None
    if settings["continuation_tokens"] < 0 or settings["temperature"] <= 0 or settings["top_k"] < 0:
        raise ScoringInputError("continuation_tokens and top_k must be >= 0 and temperature > 0")
    return settings


def _import_fairseq_hub_utils():
    """`fairseq.hub_utils`, imported without fairseq's side effect on logging.

    Importing fairseq imports every model module, and some call `logging.basicConfig` at
    import (wav2vec2_classification with level=DEBUG): in a process whose logging is not
    configured yet (a serving process), the root logger would print every library's DEBUG
    lines. The root logger's level and handlers are put back as they were.
    """
    import logging

    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    try:
        from fairseq import hub_utils
    finally:
        for handler in root.handlers[:]:
            if handler not in handlers:
                root.removeHandler(handler)
        root.setLevel(level)
    return hub_utils


def _append(ids, token: int):
    import torch

    return torch.cat([ids, ids.new_tensor([token])])


def _link_or_copy(src: Path, dst: Path) -> None:
    if not src.is_file():
        raise LmforgeError(f"{src} does not exist (the registered model is incomplete)")
    try:
        dst.symlink_to(src)
    except OSError:  # no symlinks (some Windows setups, some FUSE mounts): copy instead
        import shutil

        shutil.copyfile(src, dst)


def _max_positions(value: Any) -> int | None:
    """fairseq's resolved max positions (an int, a tuple or None) as one int or None."""
    if value is None:
        return None
    if isinstance(value, (tuple, list)):
        values = [v for v in value if v is not None]
        return min(values) if values else None
    return int(value) if not math.isinf(value) else None


def _batches(order: list[int], sizes: list[int], max_tokens: int):
    """Split `order` (longest first) into batches whose padded size stays under max_tokens."""
    batch: list[int] = []
    for i in order:
        width = sizes[batch[0]] if batch else sizes[i]  # the first item of a batch is the longest
        if batch and (len(batch) + 1) * width > max_tokens:
            yield batch
            batch = []
        batch.append(i)
    if batch:
        yield batch


def _to_device(sample: dict, device) -> dict:
    if str(device) == "cpu":
        return sample
    from fairseq import utils

    return utils.apply_to_sample(lambda t: t.to(device), sample)
