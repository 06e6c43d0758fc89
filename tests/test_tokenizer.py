"""Tests of the shipped lossless SentencePiece tokenizer and the corpus it is trained on."""

from __future__ import annotations

import pytest

from model.config import get_config
from model.corpus import generate_corpus, load_corpus
from model.tokenizer import DEFAULT_MODEL_PATH, UNK_ID, Tokenizer, train_tokenizer

TRICKY = [
    "",
    "hello world",
    "two  spaces,   three, and\ttabs\t\tdouble",
    "   leading and trailing   ",
    "line one\nline two\n\n\nafter blank lines\r\nwindows\n",
    "digits 0123456789 and 3.14159, -42, 1e-30, 2026-11-22",
    "emoji 🎉👍🏽 and a family 👨‍👩‍👧 (zero-width joiners)",
    "CJK 東京 北京 서울 and kana ひらがな カタカナ",
    "Cyrillic Привет, Greek Αθήνα, Arabic مرحبا, Hebrew שלום",
    "accents: café naïve Zoë Björn François crème brûlée",
    "combining: e\u0301 vs \u00e9, ligature \ufb01, full-width \uff21",
    "control \x00\x01\x7f and private use \ue000",
    "def f(x):\n\treturn {'a': [1, 2]}  # code\n    indented  \n",
    "\U0001f600" * 5 + " " * 17 + "end",
]


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer()


@pytest.mark.parametrize("text", TRICKY)
def test_round_trip_is_exact(tokenizer, text):
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert UNK_ID not in ids  # byte fallback: unknown characters become UTF-8 bytes, never <unk>


def test_round_trip_of_whole_corpus(tokenizer):
    corpus = load_corpus()
    assert tokenizer.decode(tokenizer.encode(corpus)) == corpus


def test_digits_are_split(tokenizer):
    pieces = tokenizer.pieces("year 20261122")
    assert pieces[-8:] == list("20261122")


def test_whitespace_is_kept(tokenizer):
    # Normalisation 'identity' and no whitespace folding: each space survives, none is invented.
    assert tokenizer.decode(tokenizer.encode("a    b")) == "a    b"
    assert tokenizer.decode(tokenizer.encode(" x")) == " x"
    assert tokenizer.decode(tokenizer.encode("x")) == "x"


def test_unknown_characters_fall_back_to_bytes(tokenizer):
    pieces = tokenizer.pieces("\u4e2d")  # a CJK character absent from the 512-piece vocabulary
    assert pieces == ["<0xE4>", "<0xB8>", "<0xAD>"]


def test_vocab_matches_small_presets(tokenizer):
    assert tokenizer.vocab_size == get_config("palm-tiny").vocab_size == get_config("palm-small").vocab_size
    assert (tokenizer.pad_id, tokenizer.eos_id) == (0, 1)


def test_shipped_corpus_is_current():
    assert generate_corpus() == load_corpus(), "model/data/corpus.txt is stale: run python -m model.corpus"
    assert len(load_corpus().encode("utf-8")) < 400_000


def test_retraining_reproduces_shipped_model():
    assert train_tokenizer() == DEFAULT_MODEL_PATH.read_bytes(), (
        "model/data/tokenizer_512.model is stale: run python -m model.tokenizer"
    )
