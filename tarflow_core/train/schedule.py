"""The learning-rate schedule (the reference's): linear warm-up from `min_lr`, then cosine decay
back to `min_lr` at the end of the run. The run length and the warm-up are worked out here only."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from ..config import TrainConfig


def lr_at(step: int, *, lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Learning rate for the step with 0-based index `step`: linear warm-up from `min_lr`
    over `warmup_steps`, then cosine decay to `min_lr` at `total_steps` (the reference schedule)."""
    if warmup_steps > 0 and step < warmup_steps:
        return min_lr + step / warmup_steps * (lr - min_lr)
    t = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr + 0.5 * (1 + math.cos(math.pi * t)) * (lr - min_lr)


@dataclass(frozen=True)
class Schedule:
    """One run's schedule; `asdict` of it is the `schedule` entry of `train_state.pt`."""

    lr: float
    min_lr: float
    warmup_steps: int
    total_steps: int

    @classmethod
    def for_run(cls, cfg: TrainConfig, steps_per_epoch: int, total_steps: int | None = None) -> Schedule:
        """The schedule of `cfg` (or of a run of `total_steps`, say the length a resumed run had).
        The warm-up defaults to one epoch and always leaves the last step to the cosine."""
        if total_steps is None:
            total_steps = run_length(cfg, steps_per_epoch)
        warmup = steps_per_epoch if cfg.warmup_steps is None else int(cfg.warmup_steps)
        total_steps = int(total_steps)
        return cls(cfg.lr, cfg.min_lr, min(warmup, max(0, total_steps - 1)), total_steps)

    def at(self, step: int) -> float:
        return lr_at(step, **asdict(self))


def run_length(cfg: TrainConfig, steps_per_epoch: int) -> int:
    """Steps in the run: `max_steps` when given, else `epochs` worth (at least one)."""
    if cfg.max_steps is not None:
        return int(cfg.max_steps)
    return max(1, math.ceil(float(cfg.epochs) * steps_per_epoch))
