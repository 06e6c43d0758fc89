"""Training batches from the shipped corpus: random windows of one token stream, or (as PaLM
trained) documents separated by end-of-document tokens and packed into consecutive sequences.

Batches are numpy on the host; the caller places them (`jax.device_put` with a batch sharding, or
the runtime's transfer). Sampling is driven by an explicit `numpy.random.Generator`, so a seed fixes
the batch sequence, and splitting a global batch into island halves is plain slicing.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import numpy as np

from model.corpus import load_corpus
from model.tokenizer import DEFAULT_MODEL_PATH, EOS_ID, Tokenizer


@functools.lru_cache(maxsize=4)
def corpus_tokens(model_path: str = str(DEFAULT_MODEL_PATH)) -> np.ndarray:
    """The shipped corpus encoded with a tokenizer, as a read-only int32 array (cached)."""
    tokens = np.asarray(Tokenizer(model_path).encode(load_corpus()), np.int32)
    tokens.flags.writeable = False
    return tokens


def sample_batch(tokens: np.ndarray, batch_size: int, seq_len: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A batch {'inputs', 'targets'} of [batch_size, seq_len] windows at random offsets."""
    if tokens.shape[0] < seq_len + 1:
        raise ValueError(f"a stream of {tokens.shape[0]} tokens cannot fill windows of {seq_len + 1}")
    starts = rng.integers(0, tokens.shape[0] - seq_len, size=batch_size)
    windows = np.stack([tokens[s : s + seq_len + 1] for s in starts])
    return {"inputs": windows[:, :-1], "targets": windows[:, 1:]}


def random_batches(
    tokens: np.ndarray, batch_size: int, seq_len: int, seed: int = 0
) -> Iterator[dict[str, np.ndarray]]:
    """An endless, seed-determined stream of `sample_batch` batches."""
    rng = np.random.default_rng(seed)
    while True:
        yield sample_batch(tokens, batch_size, seq_len, rng)


def split_batch(batch: dict[str, np.ndarray], parts: int) -> list[dict[str, np.ndarray]]:
    """Splits a batch along its first axis into `parts` equal slices (one per island)."""
    size = next(iter(batch.values())).shape[0]
    if size % parts:
        raise ValueError(f"batch of {size} does not split into {parts} equal parts")
    step = size // parts
    return [{k: v[i * step : (i + 1) * step] for k, v in batch.items()} for i in range(parts)]


# -- packed documents, as PaLM trained ---------------------------------------------------------------
# PaLM (Section 5, "Sequence length"): "examples are concatenated together and then split into
# sequences of exactly 2048 tokens, so that there are no padding tokens, but examples may be split
# in the middle", with an end-of-document token between examples. Here the documents are the
# corpus's blank-line-separated blocks; every HELD_OUT_EVERY-th is held out for evaluation.

HELD_OUT_EVERY = 20


@functools.lru_cache(maxsize=4)
def corpus_documents(model_path: str = str(DEFAULT_MODEL_PATH)) -> tuple[tuple[np.ndarray, ...],
                                                                      tuple[np.ndarray, ...]]:
    """(training documents, held-out documents) of the shipped corpus, each an int32 token array
    ending in the end-of-document token. Repeated blocks are kept once, so no held-out document
    also appears in training."""
    tokenizer = Tokenizer(model_path)
    blocks = list(dict.fromkeys(b for b in load_corpus().split("\n\n") if b.strip()))
    docs = [np.asarray([*tokenizer.encode(b), EOS_ID], np.int32) for b in blocks]
    for doc in docs:
        doc.flags.writeable = False
    train = tuple(d for i, d in enumerate(docs) if i % HELD_OUT_EVERY)
    held_out = tuple(d for i, d in enumerate(docs) if i % HELD_OUT_EVERY == 0)
    return train, held_out


class _Documents:
    """A tuple of documents hashed by identity, so epochs of it can be cached."""

    def __init__(self, docs: tuple[np.ndarray, ...]) -> None:
        self.docs = docs

    def __hash__(self) -> int:
        return id(self.docs)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Documents) and other.docs is self.docs


@functools.lru_cache(maxsize=8)
def _epoch_stream(docs: _Documents, seed: int, epoch: int) -> np.ndarray:
    count = len(docs.docs)
    order = np.random.default_rng([seed, epoch]).permutation(count) if seed >= 0 else range(count)
    stream = np.concatenate([docs.docs[i] for i in order])
    stream.flags.writeable = False
    return stream


def sequences_per_epoch(docs: tuple[np.ndarray, ...], seq_len: int) -> int:
    """How many packed sequences of `seq_len` (+1 for the shifted target) one pass yields."""
    return (sum(len(d) for d in docs) - 1) // seq_len


def packed_sequences(docs: tuple[np.ndarray, ...], seq_len: int, start: int, count: int,
                     seed: int) -> dict[str, np.ndarray]:
    """Sequences start..start+count-1 of the endless packed stream: {'inputs', 'targets'}
    [count, seq_len].

    Epoch e concatenates the documents (each ending in EOS) in an order drawn from (seed, e), or in
    corpus order for seed < 0, and cuts it into consecutive windows; a window's targets are its
    inputs shifted by one token. Sequence i is a pure function of (docs, seq_len, seed, i), so any
    step's batch can be rebuilt after a restart or a skip.
    """
    per_epoch = sequences_per_epoch(docs, seq_len)
    if per_epoch < 1:
        raise ValueError(f"{sum(len(d) for d in docs)} tokens cannot fill one window of {seq_len + 1}")
    rows = []
    for i in range(start, start + count):
        epoch, j = divmod(i, per_epoch)
        stream = _epoch_stream(_Documents(docs), seed, epoch)
        rows.append(stream[j * seq_len: j * seq_len + seq_len + 1])
    windows = np.stack(rows) if rows else np.zeros((0, seq_len + 1), np.int32)
    return {"inputs": windows[:, :-1], "targets": windows[:, 1:]}
