"""Checks at the edge of the library: what users hand to the public entry points.

Public functions (`TarFlow.forward`, `log_prob` and `reverse`, `sampling.sample` and `generate`,
the likelihood functions) call these once at their start; the algorithms behind them take the checked
values as they are. The messages name the argument and what it must be: users and tests rely on them.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .model import TarFlow

SAMPLERS = ("auto", "sequential", "jacobi", "gs-jacobi")
GUIDE_WHAT = ("a", "b", "ab")


def as_number(name: str, value) -> float:
    """An option given as a Python, numpy or one-element tensor number, as a float; TypeError naming
    the option for anything else (strings included)."""
    if isinstance(value, (str, bytes, bool)):
        raise TypeError(f"{name} must be a number (got {value!r})")
    try:
        return float(value)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"{name} must be a number (got {value!r})") from None


def is_count(value, minimum: int) -> bool:
    """Whether `value` is a whole number (not a bool) >= `minimum`."""
    return not isinstance(value, bool) and isinstance(value, numbers.Integral) and value >= minimum


def images(model: TarFlow, x) -> torch.Tensor:
    """Check model-space images `x` against the architecture: (B, C, H, W) floating point; moved
    to the model's device and dtype (as sampling does with its noise)."""
    c = model.config
    if not isinstance(x, torch.Tensor):
        raise TypeError(
            f"x must be a tensor of images (B, {c.in_channels}, {c.img_size}, {c.img_size}), got {type(x).__name__}"
        )
    if not x.dtype.is_floating_point:
        raise TypeError(
            f"x must be floating-point images in [-1, 1] scale, got {x.dtype} "
            "(8-bit images: tarflow_core.flow.uint8_to_model)"
        )
    if x.dim() != 4 or tuple(x.shape[1:]) != (c.in_channels, c.img_size, c.img_size):
        raise ValueError(f"x must have shape (B, {c.in_channels}, {c.img_size}, {c.img_size}), got {tuple(x.shape)}")
    return x.to(model.var.device, model.proj_dtype)


def uint8_images(x_uint8) -> torch.Tensor:
    """8-bit images for `bpd`: a uint8 tensor (model-space floats would be scored as pixel values)."""
    if not isinstance(x_uint8, torch.Tensor) or x_uint8.dtype != torch.uint8:
        raise TypeError(
            f"bpd scores 8-bit images: x_uint8 must be a uint8 tensor, got "
            f"{getattr(x_uint8, 'dtype', type(x_uint8).__name__)} (model-space images: use nll)"
        )
    return x_uint8


def labels(model: TarFlow, y, batch: int, *, check: bool = True) -> torch.Tensor | None:
    """Labels for a batch of `batch` images as a (batch,) int64 tensor on the model's device, or
    None (no labels, or an unconditional model, which ignores them).

    `y`: None, one int (the whole batch), or a tensor, list or array of integers, one per image;
    -1 is the dropped label (the mean class embedding). `check`: also refuse values outside
    -1..K-1 (one host read)."""
    if y is None or model.config.num_classes == 0:
        return None
    if not isinstance(y, torch.Tensor):
        try:
            y = torch.as_tensor(y)
        except (TypeError, ValueError, RuntimeError) as e:
            raise TypeError(
                f"labels y must be integers (a tensor, list, array or int), got {type(y).__name__} ({e})"
            ) from None
    if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        raise TypeError(f"labels y must be integers, got {y.dtype}")
    if y.dim() == 0:
        y = y.expand(batch)
    elif y.dim() != 1 or y.shape[0] != batch:
        raise ValueError(
            f"labels y must be one label per image, shape ({batch},), or a single int; got shape {tuple(y.shape)}"
        )
    y = y.to(model.var.device, torch.long)
    if check:
        check_labels(model, y)
    return y


def check_labels(model: TarFlow, y: torch.Tensor | None) -> None:
    """Refuse labels outside -1..K-1 (-1: no class, the mean embedding) on a conditional model
    (one host read; the training step does not call it). Unconditional models ignore labels."""
    K = model.config.num_classes
    if y is None or K == 0 or y.numel() == 0:
        return
    if y.dtype.is_floating_point or y.dtype == torch.bool:
        raise TypeError(f"labels y must be integers, got {y.dtype}")
    lo, hi = int(y.min()), int(y.max())
    if lo < -1 or hi >= K:
        raise ValueError(f"labels must be in -1..{K - 1} (-1: no class), got values from {lo} to {hi}")


def noise(model: TarFlow, noise) -> torch.Tensor:
    """Prior noise for sampling: a (N, T, D) tensor."""
    c = model.config
    if not isinstance(noise, torch.Tensor):
        raise TypeError(
            f"noise must be a tensor of shape (N, {c.num_patches}, {c.token_dim}), got {type(noise).__name__}"
        )
    if noise.dim() != 3 or tuple(noise.shape[1:]) != (c.num_patches, c.token_dim):
        raise ValueError(f"noise must have shape (N, {c.num_patches}, {c.token_dim}), got {tuple(noise.shape)}")
    return noise


def generate_request(model: TarFlow, num, batch_size, noise) -> None:
    """`generate`'s counts, and its noise when given: exactly `num` draws of (T, D)."""
    c = model.config
    if not is_count(num, 0):
        raise ValueError(f"num must be a whole number >= 0 (got {num!r})")
    if not is_count(batch_size, 1):
        raise ValueError(f"batch_size must be a whole number >= 1 (got {batch_size!r})")
    if noise is None:
        return
    if not isinstance(noise, torch.Tensor):
        raise TypeError(f"noise must be a tensor (N, {c.num_patches}, {c.token_dim}), got {type(noise).__name__}")
    if noise.dim() != 3 or tuple(noise.shape) != (num, c.num_patches, c.token_dim):
        raise ValueError(
            f"noise must have shape ({num}, {c.num_patches}, {c.token_dim}) for num={num}, got {tuple(noise.shape)}"
        )


def check_denoise_step(sigma, lr_scale) -> None:
    """`denoise`'s step: noise level sigma >= 0 and finite, step scale a number."""
    as_number("lr_scale", lr_scale)
    if not 0 <= as_number("sigma", sigma) < math.inf:
        raise ValueError(f"sigma must be >= 0 and finite (got {sigma})")


@dataclass(frozen=True)
class SamplingOptions:
    """How to invert the flow, checked once when built (see `tarflow_core.sampling.sample`).

    Guidance: `guidance` w >= 0 (0: none), applied to `guide_what` (a, b or ab), the unconditional
    pass's attention logits divided by `attn_temp`, w annealed from 0 to w over the tokens if
    `annealed`. Method: `sampler` (SAMPLERS), Jacobi `segments`, tolerance `tol` and convergence
    check interval `check_every`, `cuda_graphs` (None: the device's default)."""

    guidance: float = 0.0
    guide_what: str = "ab"
    attn_temp: float = 1.0
    annealed: bool = False
    sampler: str = "sequential"
    segments: int | list[int] | None = None
    tol: float | None = None
    check_every: int | None = None
    cuda_graphs: bool | None = None

    def __post_init__(self):
        guidance, attn_temp = as_number("guidance", self.guidance), as_number("attn_temp", self.attn_temp)
        if not 0 <= guidance < math.inf:
            raise ValueError(f"guidance must be >= 0 and finite (got {guidance})")
        if self.guide_what not in GUIDE_WHAT:
            raise ValueError(f"guide_what must be one of {', '.join(GUIDE_WHAT)} (got {self.guide_what!r})")
        if not 0 < attn_temp < math.inf:
            raise ValueError(f"attn_temp (attention temperature) must be > 0 and finite (got {attn_temp})")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)} (got {self.sampler!r})")
        if self.tol is not None and not as_number("tol", self.tol) >= 0:
            raise ValueError(f"tol must be >= 0 (got {self.tol})")
        if self.check_every is not None and not is_count(self.check_every, 1):
            raise ValueError(f"check_every must be >= 1 (got {self.check_every})")
        object.__setattr__(self, "guidance", guidance)
        object.__setattr__(self, "attn_temp", attn_temp)
        object.__setattr__(self, "tol", None if self.tol is None else float(self.tol))

    @property
    def guide(self) -> dict:
        """The guidance settings as keyword arguments (`FlowBlock.reverse`, the fast block runner)."""
        return dict(
            guidance=self.guidance, guide_what=self.guide_what, attn_temp=self.attn_temp, annealed=self.annealed
        )
