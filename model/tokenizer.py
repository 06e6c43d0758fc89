"""A lossless SentencePiece tokenizer, trained by the project on its own corpus.

PaLM (Chowdhery et al. 2022, Section 2, "Vocabulary") uses a SentencePiece vocabulary that is
"completely lossless and reversible": whitespace is preserved (important for code), out-of-vocabulary
Unicode characters are split into UTF-8 bytes, and numbers are split into individual digit tokens.
Those choices map onto SentencePiece trainer options:

    byte_fallback=True                 unknown characters become <0xNN> byte pieces, never <unk>
    split_digits=True                  "2022" -> "2" "0" "2" "2"
    allow_whitespace_only_pieces=True  runs of spaces (indentation) can be single pieces
    remove_extra_whitespaces=False     keep repeated, leading and trailing spaces
    normalization_rule_name=identity   no NFKC folding: decode(encode(s)) == s byte for byte
    add_dummy_prefix=False             no invented leading space

The shipped model (model/data/tokenizer_512.model) has 512 pieces, for the small presets. Retrain
with `python -m model.tokenizer` (tests/test_tokenizer.py checks retraining reproduces it).

One documented gap: SentencePiece writes spaces as U+2581 ("▁") internally, so a literal U+2581 in
the input decodes as a space. PaLM's tokenizer shares this property.
"""

from __future__ import annotations

import argparse
import io
from collections.abc import Iterable, Sequence
from pathlib import Path

import sentencepiece as spm

from model.corpus import CORPUS_PATH, DATA_DIR

DEFAULT_VOCAB_SIZE = 512
DEFAULT_MODEL_PATH = DATA_DIR / f"tokenizer_{DEFAULT_VOCAB_SIZE}.model"
PAD_ID, EOS_ID, UNK_ID = 0, 1, 2

_TRAINER_OPTIONS = dict(
    model_type="unigram",
    byte_fallback=True,
    split_digits=True,
    allow_whitespace_only_pieces=True,
    remove_extra_whitespaces=False,
    normalization_rule_name="identity",
    add_dummy_prefix=False,
    character_coverage=0.9995,  # rarer characters fall back to bytes
    pad_id=PAD_ID,
    eos_id=EOS_ID,
    unk_id=UNK_ID,
    bos_id=-1,  # a decoder-only LM needs no BOS; EOS separates documents
    num_threads=1,  # single-threaded training is reproducible
    max_sentence_length=16384,
    hard_vocab_limit=True,
)


class Tokenizer:
    """Text <-> token ids with a SentencePiece model; `decode(encode(s)) == s` for any string
    without U+2581."""

    def __init__(self, model_path: str | Path = DEFAULT_MODEL_PATH) -> None:
        self.model_path = Path(model_path)
        self._sp = spm.SentencePieceProcessor(model_file=str(self.model_path))

    @property
    def vocab_size(self) -> int:
        """Number of pieces, including the 256 byte-fallback pieces and pad/eos/unk."""
        return self._sp.get_piece_size()

    @property
    def pad_id(self) -> int:
        return self._sp.pad_id()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; no EOS is appended."""
        return self._sp.encode(text, out_type=int)

    def decode(self, ids: Sequence[int] | Iterable[int]) -> str:
        """Text of `ids`; pad and EOS pieces decode to nothing."""
        return self._sp.decode([int(i) for i in ids])

    def pieces(self, text: str) -> list[str]:
        """The pieces `text` splits into, for inspection."""
        return self._sp.encode(text, out_type=str)


def train_tokenizer(
    corpus_path: str | Path = CORPUS_PATH, vocab_size: int = DEFAULT_VOCAB_SIZE
) -> bytes:
    """Trains a SentencePiece model on a text file and returns the serialized model.

    Every line of the corpus is a training sentence (SentencePiece never sees newlines; they encode
    through byte fallback). Training is single-threaded so the bytes are reproducible.
    """
    lines = Path(corpus_path).read_text(encoding="utf-8").splitlines()
    writer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([line for line in lines if line]),
        model_writer=writer,
        vocab_size=vocab_size,
        minloglevel=2,
        **_TRAINER_OPTIONS,
    )
    return writer.getvalue()


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m model.tokenizer [--vocab-size N] [--out PATH]`: retrains the shipped model."""
    parser = argparse.ArgumentParser(description="Retrain the project's SentencePiece tokenizer.")
    parser.add_argument("--corpus", default=str(CORPUS_PATH), help="training text (default: shipped corpus)")
    parser.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE)
    parser.add_argument("--out", default=None, help="output .model path (default: model/data/tokenizer_<N>.model)")
    args = parser.parse_args(argv)
    out = Path(args.out) if args.out else DATA_DIR / f"tokenizer_{args.vocab_size}.model"
    out.write_bytes(train_tokenizer(args.corpus, args.vocab_size))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
