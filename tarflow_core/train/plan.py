"""`tarflow train --plan`: the memory plan (`tarflow_core/memory.py`) for a run's settings, resolved as the
run resolves them (preset, options, the data's shape and classes, the micro-batch rule of `micro.py`),
without building the model or training."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import memory
from ..config import ConfigError, TrainConfig
from ..dist import DistInfo, env_world
from .parts import open_data


def plan_for(cfg: TrainConfig, budget: int | None = None) -> RunPlan:
    """The plan of run `cfg` (`memory.plan_run` for the data's shape and classes), for the CUDA device of
    `budget` bytes per process (None: the memory of this machine's CUDA device; without one, a
    ConfigError), or for the CPU where `cfg` says --device cpu."""
    world = env_world().world_size
    data = open_data(cfg, DistInfo(world_size=world))  # the shape and classes, as the run reads them
    cfg = data.cfg
    device = "cpu" if str(cfg.device).strip().lower() == "cpu" else "cuda"
    source = "--memory"
    if budget is None:
        if device != "cuda" or not torch.cuda.is_available():
            raise ConfigError("--plan: no CUDA device here to size the plan by; give --memory SIZE, e.g. 80GiB")
        index = torch.device(cfg.device if ":" in str(cfg.device) else "cuda").index or 0
        budget, source = torch.cuda.get_device_properties(index).total_memory, f"cuda:{index}"
    info = data.info
    shape = dict(in_channels=info["channels"], img_size=info["image_size"], num_classes=info["num_classes"])
    plan = memory.plan_run(cfg, budget, device=device, world=world, **shape)
    return RunPlan(plan, device, source, {k: info[k] for k in ("source", "channels", "image_size", "num_classes")})


@dataclass(frozen=True)
class RunPlan:
    plan: memory.TrainingPlan
    device: str  # what the plan is for: cuda, or cpu where the settings say --device cpu
    budget_from: str  # --memory, or the CUDA device whose memory it is
    data: dict  # source, channels, image_size, num_classes

    def to_dict(self) -> dict:
        """One JSON object: the plan's fields, then the device, where the budget came from and the data."""
        return {**self.plan.to_dict(), "device": self.device, "budget_from": self.budget_from, "data": self.data}

    def describe(self) -> str:
        """The lines `tarflow train --plan` prints."""
        d = self.data
        shape = f"{d['channels']}x{d['image_size']}x{d['image_size']}"
        where = f"{d['num_classes']} classes; planned for {self.device}, memory from {self.budget_from}"
        return f"data {d['source']}: {shape}, {where}\n" + memory.describe(self.plan)
