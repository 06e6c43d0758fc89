"""Training batches from the shipped corpus: one token stream, random windows of T + 1 tokens.

Batches are numpy on the host; the caller places them (`jax.device_put` with a batch sharding, or
the runtime's transfer). Sampling is driven by an explicit `numpy.random.Generator`, so a seed fixes
the batch sequence, and splitting a global batch into island halves is plain slicing.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import numpy as np

from model.corpus import load_corpus
from model.tokenizer import DEFAULT_MODEL_PATH, Tokenizer


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
