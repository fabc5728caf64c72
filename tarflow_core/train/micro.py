"""Gradient accumulation's micro-batch: what `--micro-batch` makes of each process's share of the
global batch. A size must divide that share (every micro-batch then weighs the same); `auto` takes the
largest size the memory plan (`tarflow_core/memory.py`) fits on the CUDA device and confirms it with one
probe step; off CUDA, and without --micro-batch, the whole share is one micro-batch.

The global batch, the data order and the random draws do not depend on the micro-batch: a step sees
the same images, noise and dropped labels however it is split (`step.Stepper`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .. import memory
from ..config import ConfigError, ModelConfig, TrainConfig
from ..dist import DistInfo, any_flag
from ..model import TarFlow
from .outcome import classify_failure
from .step import objective

PROBE_TRIES = 4  # sizes a probe step tries, largest first, before `auto` gives up


@dataclass(frozen=True)
class MicroBatch:
    size: int  # images per forward and backward
    steps: int  # micro-batches per optimisation step (the accumulation)
    planned_peak: int | None  # the plan's peak bytes per process at this size (None: no plan for the device)
    note: str = ""  # how `auto` chose, told in the start event ("" when nothing to tell)


def micro_batch_for(
    cfg: TrainConfig, model_cfg: ModelConfig, d: DistInfo, precision: str, probe: Callable[[int], bool]
) -> MicroBatch:
    """The micro-batch of this run. `probe(size)`: whether one training step of `size` images fits
    (CUDA `auto` only; it must leave the model, optimizer and random streams as they were)."""
    check_micro_batch(cfg, d)
    share = cfg.batch_size // d.world_size
    setting, note = cfg.micro_batch, ""
    if setting is None or (setting == "auto" and d.device.type != "cuda"):
        size = share
    elif setting == "auto":
        size, note = _auto(cfg, model_cfg, d, precision, share, probe)
    else:
        size = setting
    steps = share // size
    return MicroBatch(size, steps, planned_peak(cfg, model_cfg, d, precision, size, steps > 1), note)


def check_micro_batch(cfg: TrainConfig, d: DistInfo) -> None:
    """A given size must divide each process's share of the global batch (equal micro-batches)."""
    share, setting = cfg.batch_size // d.world_size, cfg.micro_batch
    if isinstance(setting, int) and share % setting:
        where = f" over {d.world_size} processes" if d.distributed else ""
        raise ConfigError(
            f"--micro-batch {setting} must divide each process's share of --batch-size {cfg.batch_size} "
            f"({share} images{where}), e.g. {largest_divisor(share, setting)}"
        )


def largest_divisor(n: int, at_most: int) -> int:
    """The largest divisor of `n` that is at most `at_most` (1 at least)."""
    return next(k for k in range(min(n, max(at_most, 1)), 0, -1) if n % k == 0)


def planned_peak(
    cfg: TrainConfig, model_cfg: ModelConfig, d: DistInfo, precision: str, size: int, accumulating: bool
) -> int | None:
    """The memory plan's peak bytes per process for this run at micro-batch `size` (None: no plan for
    this device or precision)."""
    if d.device.type not in ("cuda", "cpu") or precision not in memory.PRECISIONS:
        return None
    return memory.training_memory(
        model_cfg,
        size,
        precision,
        cfg.checkpointing,
        bool(cfg.ema_decay),
        world=d.world_size,
        accumulating=accumulating,
        device=d.device.type,
    ).peak


def _auto(cfg, model_cfg, d: DistInfo, precision: str, share: int, probe) -> tuple[int, str]:
    """`--micro-batch auto` on CUDA: the largest divisor of the share that the plan fits in the
    device's memory, confirmed (or stepped down) by probe steps. (size, what to tell)."""
    total = torch.cuda.get_device_properties(d.device).total_memory
    settings = dict(precision=precision, checkpointing=cfg.checkpointing, ema=bool(cfg.ema_decay))
    fits = min(share, memory.largest_micro_batch(total, model_cfg, world=d.world_size, accumulating=True, **settings))
    sizes = [k for k in range(max(fits, 1), 0, -1) if share % k == 0]  # divisors of the share, largest first
    gib = total / 2**30
    for size in sizes[:PROBE_TRIES]:
        if not any_flag(not probe(size), d):  # every process must fit it
            told = f"the plan fits {fits} in {gib:.1f} GiB" if fits < share else "the plan fits the whole share"
            return size, (
                f"--micro-batch auto: {size} images per micro-batch, {share // size} per step ({told}; a "
                "probe step confirmed it)"
            )
    raise ConfigError(
        f"--micro-batch auto: no micro-batch of up to {sizes[0]} images fitted the {gib:.1f} GiB of {d.device} "
        "in a probe step; give --micro-batch smaller or use --checkpointing blocks"
    )


def probe_step(model: TarFlow, size: int, autocast_dtype: torch.dtype | None) -> bool:
    """Whether one forward and backward of `size` images fits in memory. Zero images and labels (no
    random draw), and the gradients dropped afterwards: the run's weights, optimizer and random streams
    are left as they were."""
    mc, device = model.config, model.var.device
    x = torch.zeros(size, mc.in_channels, mc.img_size, mc.img_size, device=device)
    y = torch.zeros(size, dtype=torch.long, device=device) if mc.conditional else None
    fits = True
    try:
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            z, logdet = model(x, y)
        objective(z.float(), logdet, mc.data_dim).backward()
    except (torch.OutOfMemoryError, RuntimeError) as e:
        if classify_failure(e, started=True, distributed=False) != "oom":
            raise
        fits = False
    finally:
        model.zero_grad(set_to_none=True)
    if device.type == "cuda":  # the probe's cached blocks go back, and the run's peak starts from here
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    return fits
