"""What both checkpoint forms share: their description, the error for one that cannot be used,
and reading a safetensors file of weights.

A module of its own so that `reference_checkpoint` (the published `.pth` files) and `checkpoint`
(the native format, and loading any form) both build on it without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from . import __version__
from .config import ModelConfig

FORMAT = "tarflow-checkpoint"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint path that cannot be used; the message names it and says what was expected."""


@dataclass
class CheckpointInfo:
    path: str
    kind: str  # "native" or "reference"
    config: ModelConfig
    noise: dict[str, Any] = field(default_factory=lambda: {"type": None, "std": None})
    step: int | None = None
    data: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    has_ema: bool = False
    tarflow_version: str | None = None

    @property
    def noise_std(self) -> float | None:
        return self.noise.get("std") if self.noise.get("type") == "gaussian" else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "tarflow_version": self.tarflow_version or __version__,
            "model": self.config.to_dict(),
            "data": self.data,
            "noise": self.noise,
            "step": self.step,
            "training": self.training,
            "ema": self.has_ema,
        }


def data_from_config(cfg: ModelConfig) -> dict[str, Any]:
    """The data shape a model of `cfg` takes, as a checkpoint's `data` entry records it."""
    return {"channels": cfg.in_channels, "image_size": cfg.img_size, "num_classes": cfg.num_classes}


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file ({e})") from None


def read_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """The tensors' names and shapes in a safetensors file, from its header (which must cover the file)
    without reading the data: what `tarflow info` checks before describing a checkpoint."""
    try:
        with safe_open(str(path), "pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file ({e})") from None
