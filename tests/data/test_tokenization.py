"""lmforge.data.tokenization: training, the saved manifest, loading, encode/decode, for every kind."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from conftest import corpus_text
from lmforge.errors import LmforgeError
from lmforge.data.tokenization import (
    MODEL_FILES,
    TOKENIZER_MANIFEST,
    BpeTokenizer,
    install_tokenizer,
    load_tokenizer,
    save_none,
    train_tokenizer,
)

SAMPLES = [
    " = Homarus gammarus = ",
    "The cat sat on the mat , and <unk> followed .",
    "",
    "   ",
    "Ünïcödé 日本語 😀 tab\there nbsp\u00a0here",
]
TRAINED = [("bpe", "bpe"), ("sentencepiece", "bpe"), ("sentencepiece", "unigram")]


@pytest.fixture(scope="module")
def lines() -> list[str]:
    return (corpus_text() / "valid.txt").read_text(encoding="utf-8").split("\n")[:1500]


@pytest.fixture(scope="module")
def trained(lines, tmp_path_factory) -> dict[str, Path]:
    out = {}
    for kind, model_type in TRAINED:
        d = tmp_path_factory.mktemp(f"{kind}-{model_type}")
        train_tokenizer(kind, iter(lines), d, vocab_size=600, model_type=model_type)
        out[f"{kind}-{model_type}"] = d
    return out


@pytest.mark.parametrize("kind,model_type", TRAINED)
def test_trained_tokenizer_is_saved_with_its_manifest(kind, model_type, trained):
    d = trained[f"{kind}-{model_type}"]
    manifest = json.loads((d / TOKENIZER_MANIFEST).read_text())
    model = d / MODEL_FILES[kind]
    assert manifest == {"kind": kind, "model": model.name, "sha256": hashlib.sha256(model.read_bytes()).hexdigest()}
    tok = load_tokenizer(d)
    assert tok.kind == kind and tok.sha256 == manifest["sha256"]
    assert tok.files() == [d / TOKENIZER_MANIFEST, model]


@pytest.mark.parametrize("kind,model_type", TRAINED)
def test_training_is_deterministic(kind, model_type, trained, lines, tmp_path):
    again = train_tokenizer(kind, iter(lines), tmp_path, vocab_size=600, model_type=model_type)
    assert again.sha256 == load_tokenizer(trained[f"{kind}-{model_type}"]).sha256


@pytest.mark.parametrize("kind,model_type", TRAINED)
def test_encode_gives_whitespace_free_tokens_and_batches_agree(kind, model_type, trained):
    tok = load_tokenizer(trained[f"{kind}-{model_type}"])
    encoded = tok.encode_lines(SAMPLES)
    assert encoded == [tok.encode(s) for s in SAMPLES]
    for text, tokens in zip(SAMPLES, encoded):
        assert tokens == " ".join(tokens.split()), "single spaces between tokens, none inside one"
        assert "\n" not in tokens
        if text.strip():
            assert len(tokens.split()) > len(text.split()) // 2
    assert tok.encode("") == ""


def test_byte_level_bpe_round_trips_any_text(trained):
    tok = load_tokenizer(trained["bpe-bpe"])
    assert isinstance(tok, BpeTokenizer)
    for text in SAMPLES:
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode(" The cat").split()[0] == "ĠThe"
    assert tok.encode_lines(SAMPLES) == tok.encode_line_by_line(SAMPLES)


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_sentencepiece_decodes_to_normalized_text(model_type, trained):
    tok = load_tokenizer(trained[f"sentencepiece-{model_type}"])
    assert tok.decode(tok.encode(" = Homarus   gammarus = ")) == "= Homarus gammarus ="
    assert tok.encode("the cat").startswith("▁")


def test_none_is_whitespace_tokens_and_the_default_without_manifest(tmp_path):
    tok = load_tokenizer(tmp_path)  # no tokenizer.json
    assert tok.kind == "none" and tok.sha256 == "" and tok.files() == []
    assert tok.encode(" a\tb\u00a0c  ") == "a b c"
    assert tok.decode("a b c") == "a b c"
    saved = save_none(tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / TOKENIZER_MANIFEST).read_text()) == {
        "kind": "none", "model": None, "sha256": None}
    assert saved.files() == [tmp_path / "saved" / TOKENIZER_MANIFEST]
    assert load_tokenizer(tmp_path / "saved").kind == "none"


def test_install_copies_a_given_model_file(trained, tmp_path):
    source = trained["sentencepiece-unigram"] / MODEL_FILES["sentencepiece"]
    tok = install_tokenizer("sentencepiece", str(source), tmp_path / "copy")
    assert tok.sha256 == load_tokenizer(trained["sentencepiece-unigram"]).sha256
    assert load_tokenizer(tmp_path / "copy").encode("the cat") == tok.encode("the cat")


def test_install_rejects_a_file_of_the_wrong_kind(trained, tmp_path):
    source = trained["sentencepiece-bpe"] / MODEL_FILES["sentencepiece"]
    with pytest.raises(LmforgeError, match="not a HuggingFace tokenizers JSON"):
        install_tokenizer("bpe", str(source), tmp_path / "x")
    with pytest.raises(LmforgeError, match="does not exist"):
        install_tokenizer("bpe", str(tmp_path / "missing.json"), tmp_path / "y")


def test_a_changed_model_file_is_refused(trained, tmp_path):
    d = tmp_path / "tok"
    d.mkdir()
    for f in load_tokenizer(trained["bpe-bpe"]).files():
        (d / f.name).write_bytes(f.read_bytes())
    (d / MODEL_FILES["bpe"]).write_text((d / MODEL_FILES["bpe"]).read_text() + " ")
    with pytest.raises(LmforgeError, match="does not match the sha256"):
        load_tokenizer(d)
    (d / TOKENIZER_MANIFEST).write_text('{"kind": "wordpiece", "model": null, "sha256": null}')
    with pytest.raises(LmforgeError, match="unknown tokenizer kind"):
        load_tokenizer(d)
