"""PaLM's training recipe around the step: which sequences each step reads (batch ramp, skipped
batches) and when the loss has spiked.

PaLM (Chowdhery et al. 2022, Section 5):
  * batch ramp: "batch size 512 (1M tokens) until step 50k, then double it to 1024 (2M tokens)
    until step 115k, and finally double again to 2048 (4M tokens)" (`PalmConfig.batch_ramp`);
  * loss spikes: "we re-started training from a checkpoint roughly 100 steps before the spike
    started, and skipped roughly 200-500 data batches, which cover the batches that were seen
    before and during the spike" (`SpikeDetector`, `DataSchedule.skipping`).

Step s reads the packed sequences first_sequence(s) .. first_sequence(s) + batch_size(s) - 1: a
pure function of the ramp and the skips so far, which checkpoints record, so a resumed or rewound
run reads exactly what an uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections import deque
from typing import Any


@dataclasses.dataclass(frozen=True)
class Skip:
    """From step `at_step` on, the data stream jumps `batches` batches ahead."""

    at_step: int
    batches: int


@dataclasses.dataclass(frozen=True)
class DataSchedule:
    """Batch sizes and sequence offsets per step: `ramp` as (first step, sequences) pairs (empty:
    `batch` sequences every step), shifted by the `skips` taken so far."""

    batch: int
    ramp: tuple[tuple[int, int], ...] = ()
    skips: tuple[Skip, ...] = ()

    def batch_size(self, step: int) -> int:
        size = self.batch
        for first, sequences in self.ramp:
            if step >= first:
                size = sequences
        return size

    def _sequences_before(self, step: int) -> int:
        """Sequences the steps 0..step-1 read without skips."""
        if not self.ramp:
            return step * self.batch
        total = 0
        bounds = [first for first, _ in self.ramp[1:]] + [math.inf]
        for (first, sequences), end in zip(self.ramp, bounds):
            if step <= first:
                break
            total += (min(step, end) - first) * sequences
        return int(total)

    def first_sequence(self, step: int) -> int:
        """Index in the packed stream of the first sequence step `step` reads."""
        skipped = sum(self._sequences_before(s.at_step + s.batches) - self._sequences_before(s.at_step)
                      for s in self.skips if s.at_step <= step)
        return self._sequences_before(step) + skipped

    def skipping(self, at_step: int, batches: int) -> DataSchedule:
        """This schedule with `batches` more batches skipped from `at_step` on."""
        return dataclasses.replace(self, skips=(*self.skips, Skip(at_step, batches)))

    def as_json(self) -> list[dict[str, int]]:
        return [dataclasses.asdict(s) for s in self.skips]

    def with_skips_from_json(self, skips: list[dict[str, Any]]) -> DataSchedule:
        return dataclasses.replace(self, skips=tuple(Skip(int(s["at_step"]), int(s["batches"]))
                                                    for s in skips))


@dataclasses.dataclass(frozen=True)
class SpikePolicy:
    """What counts as a spike and what to do about it (the numbers are the paper's, as options).

    A step's loss spikes when it is not finite or exceeds `factor` times the median of the last
    `window` losses (after at least `window` of them). Training then restarts from the newest
    checkpoint at least `rewind` steps before the spike and skips `skip` batches; at most
    `max_restarts` times in one run. factor <= 0 turns detection off.
    """

    factor: float = 2.0
    window: int = 20
    rewind: int = 100
    skip: int = 300
    max_restarts: int = 10

    @property
    def enabled(self) -> bool:
        return self.factor > 0


class SpikeDetector:
    """Watches the training loss step by step (see SpikePolicy)."""

    def __init__(self, policy: SpikePolicy) -> None:
        self.policy = policy
        self._recent: deque[float] = deque(maxlen=max(1, policy.window))

    def reset(self) -> None:
        """Forgets the history (after a restart the losses before it no longer apply)."""
        self._recent.clear()

    def is_spike(self, loss: float) -> bool:
        """Records `loss`; True when it spikes (a spiking loss is not added to the history)."""
        if not self.policy.enabled:
            return False
        if not math.isfinite(loss):
            return True
        if len(self._recent) == self._recent.maxlen:
            if loss > self.policy.factor * statistics.median(self._recent):
                return True
        self._recent.append(loss)
        return False


def rewind_target(checkpoint_steps: list[int], spike_step: int, rewind: int) -> int | None:
    """The checkpoint to restart from for a spike at `spike_step`: the newest at least `rewind`
    steps before it, else the oldest before it, else None."""
    before = sorted(s for s in checkpoint_steps if s < spike_step)
    if not before:
        return None
    early = [s for s in before if s <= spike_step - rewind]
    return early[-1] if early else before[0]
