"""Per-step hooks of the training loop: TensorBoard scalars (tensorboardX) and the progress bar.

`PodTrainer.run(on_step=...)` calls a hook with a `StepInfo` (loss, tokens/s, MFU, learning rate,
batch size) after every step; `Hooks` fans one call out to several, so a metrics gauge can be
attached beside these without touching the loop.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from model.pods import StepInfo

StepHook = Callable[[StepInfo], None]


class Hooks:
    """Calls each hook in turn with the same StepInfo."""

    def __init__(self, hooks: Sequence[StepHook] = ()) -> None:
        self.hooks = list(hooks)

    def add(self, hook: StepHook) -> None:
        self.hooks.append(hook)

    def __call__(self, info: StepInfo) -> None:
        for hook in self.hooks:
            hook(info)


class TensorBoardScalars:
    """Writes train/loss, train/tokens_per_s, train/mfu, train/learning_rate, train/batch_size per
    step and eval/loss, eval/perplexity per evaluation to a TensorBoard event file in `logdir`."""

    def __init__(self, logdir: str) -> None:
        from tensorboardX import SummaryWriter

        self.writer = SummaryWriter(logdir)

    def __call__(self, info: StepInfo) -> None:
        self.writer.add_scalar("train/loss", info.loss, info.step)
        self.writer.add_scalar("train/tokens_per_s", info.tokens_per_s, info.step)
        self.writer.add_scalar("train/learning_rate", info.learning_rate, info.step)
        self.writer.add_scalar("train/batch_size", info.batch_size, info.step)
        if info.mfu is not None:
            self.writer.add_scalar("train/mfu", info.mfu, info.step)

    def evaluation(self, step: int, result: dict[str, Any]) -> None:
        for name in ("loss", "cross_entropy", "perplexity"):
            self.writer.add_scalar(f"eval/{name}", result[name], step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class ProgressBar:
    """A tqdm bar over global steps: shows "compiling" until the first step reports, then the step
    number (the same K as checkpoint step_K), loss and tokens/s (and MFU when known)."""

    def __init__(self, name: str, start: int, total: int, *, disable: bool = False) -> None:
        from tqdm import tqdm

        self.name = name
        self._compiling = True
        self.bar = tqdm(total=total, initial=start, desc=f"{name} (compiling)", unit="step",
                        disable=disable)

    def __call__(self, info: StepInfo) -> None:
        if self._compiling:
            self._compiling = False
            self.bar.set_description(self.name)
        postfix = {"step": info.step, "loss": f"{info.loss:.4f}", "tok_s": f"{info.tokens_per_s:,.0f}"}
        if info.mfu is not None:
            postfix["mfu"] = f"{100 * info.mfu:.1f}%"
        self.bar.set_postfix(postfix, refresh=False)
        self.bar.n = info.step  # a rewind after a loss spike moves it back
        self.bar.refresh()

    def write(self, text: str) -> None:
        self.bar.write(text)

    def close(self) -> None:
        self.bar.close()
