"""Saving a run's checkpoints: the weights and config.json (a checkpoint every command loads),
then the resume state (`state.py`), then pruning the older ones. Rank 0 writes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from ..checkpoint import save_checkpoint
from ..config import TrainConfig
from ..dist import DistInfo, broadcast_object
from ..ema import EMA
from ..model import TarFlow
from .outcome import TrainError
from .report import RunLog
from .run_dir import TRAIN_STATE_FILE, RunDir, checkpoint_dir
from .schedule import Schedule
from .state import TrainState


@dataclass
class Checkpointer:
    run_dir: RunDir
    d: DistInfo
    log: RunLog
    cfg: TrainConfig
    data_info: dict
    precision: str
    steps_per_epoch: int
    schedule: Schedule
    environment: dict  # torch, device, threads, precision: told on resume when they differ
    model: TarFlow
    optimizer: torch.optim.Optimizer
    loader: Any
    noise_gen: torch.Generator
    ema: EMA | None
    last: Path | None = None  # the newest checkpoint of the run (saved, or resumed from)

    def save(self, step: int, bad_steps: int) -> Path:
        """Checkpoint (rank 0 writes; every rank learns whether it worked)."""
        error = None
        target = checkpoint_dir(self.run_dir.path, step)
        if self.d.is_main:
            try:
                self._write(target, step, bad_steps)
            except (OSError, SafetensorError) as e:
                error = f"could not write checkpoint {target}: {getattr(e, 'strerror', None) or e}"
        error = broadcast_object(error, self.d)
        if error:
            raise TrainError(error)
        self.last = target
        self.log.emit("checkpoint", step, path=str(target))
        return target

    def saved_at(self, step: int) -> bool:
        return self.last is not None and self.last == checkpoint_dir(self.run_dir.path, step)

    def rescue(self, step: int, bad_steps: int) -> bool:
        """After the data or the disk failed mid-run: save the progress since the last checkpoint
        if that can be done safely (one process, sound weights). Whether it was saved."""
        if self.d.distributed or step == 0 or self.saved_at(step) or bad_steps:
            return False  # a collective save could hang when only one rank failed
        try:
            self.save(step, bad_steps)
            return True
        except (TrainError, OSError, SafetensorError):
            return False

    def _write(self, target: Path, step: int, bad_steps: int) -> None:
        cfg = self.cfg
        training = {
            **cfg.to_dict(),
            "steps_per_epoch": self.steps_per_epoch,
            "total_steps": self.schedule.total_steps,
            "world_size": self.d.world_size,
            "precision": self.precision,
            "environment": self.environment,
        }
        ema_state = self.ema.state_dict() if self.ema is not None else None
        save_checkpoint(
            target,
            self.model,
            noise=cfg.noise_spec,
            step=step,
            data=self.data_info,
            training=training,
            ema_state=ema_state,
        )
        state = TrainState.capture(
            step,
            self.optimizer,
            self.schedule,
            self.loader,
            self.noise_gen,
            self.ema,
            bad_steps=bad_steps,
            world_size=self.d.world_size,
        )
        state.save(target / TRAIN_STATE_FILE)
        self.run_dir.prune(cfg.keep_checkpoints)
