"""Variational dequantization (Flow++, Ho et al. 2019): a learned noise distribution q(u | x).

A flow models densities, the data are 8-bit integers x. Uniform dequantization scores x + u with
u ~ U[0, 1)^D, and E_u[-log p(x + u)] bounds -log P(x) from above; the gap is how far p is from
uniform inside each pixel's bin. Variational dequantization draws u from q(u | x) instead and
bounds

    -log P(x) <= E_{u ~ q}[ -log p(x + u) + log q(u | x) ]            (Jensen)

which is tighter when q follows p inside the bins. q is trained jointly with the flow on this bound.

q here is a small conditional flow on the pixel grid: a logistic base draw eps, affine couplings
on alternating checkerboard halves whose scale and shift come from a convolutional net that sees
x and the other half, and a final sigmoid into (0, 1). The logistic through a sigmoid is exactly
uniform, and the couplings start as the identity (zero-initialised output convolutions), so an
untrained q *is* uniform dequantization: the bound starts where the published recipe is.

Conventions: x is uint8 (B, C, H, W); u is in (0, 1) per sub-pixel; log q is in nats per image.
`dequantize` turns (x, uniform draws) into the flow's [-1, 1] input and log q for either kind.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from . import flow

# the coupling log-scales are soft-clamped to (-LOG_SCALE_BOUND, LOG_SCALE_BOUND) for stable training
LOG_SCALE_BOUND = 3.0
# uniform draws are kept this far from 0 and 1 so their logit is finite
EDGE = 1e-6


class Dequantized(NamedTuple):
    """The flow's input in [-1, 1] scale and log q(u | x) in nats per image (0 for uniform)."""

    x: torch.Tensor
    log_q: torch.Tensor


class DequantSample(NamedTuple):
    """u ~ q(u | x) in (0, 1) per sub-pixel, and log q(u | x) in nats per image."""

    u: torch.Tensor
    log_q: torch.Tensor


def checkerboard(height: int, width: int, parity: int, like: torch.Tensor) -> torch.Tensor:
    """(1, 1, H, W) mask of 1s on the squares with (row + column) % 2 == parity."""
    rows = torch.arange(height, device=like.device).view(-1, 1)
    cols = torch.arange(width, device=like.device).view(1, -1)
    return ((rows + cols) % 2 == parity).to(like.dtype).view(1, 1, height, width)


def logistic_log_density(v: torch.Tensor) -> torch.Tensor:
    """log of the standard logistic density, elementwise: log sigmoid(v) + log sigmoid(-v)."""
    return F.logsigmoid(v) + F.logsigmoid(-v)


class Coupling(nn.Module):
    """Affine coupling on a checkerboard half: the squares of `parity` stay, the others are scaled and
    shifted by a conv net that sees the kept squares and the context features of x."""

    def __init__(self, channels: int, width: int, parity: int):
        super().__init__()
        self.parity = parity
        self.net = nn.Sequential(
            nn.Conv2d(channels + width, width, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(width, 2 * channels, 3, padding=1),
        )
        nn.init.zeros_(self.net[-1].weight)  # identity at init: q starts uniform
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, v: torch.Tensor, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """v -> (v', log|det dv'/dv| per image)."""
        keep = checkerboard(v.shape[-2], v.shape[-1], self.parity, v)
        shift, raw = self.net(torch.cat([v * keep, context], dim=1)).chunk(2, dim=1)
        log_scale = LOG_SCALE_BOUND * torch.tanh(raw / LOG_SCALE_BOUND) * (1 - keep)
        v = v * torch.exp(log_scale) + shift * (1 - keep)
        return v, log_scale.flatten(1).sum(-1)


class VariationalDequantizer(nn.Module):
    """q(u | x): logistic base noise, `layers` conditional checkerboard couplings, sigmoid."""

    def __init__(self, channels: int, width: int, layers: int):
        super().__init__()
        self.context = nn.Sequential(  # features of the integer image that every coupling sees
            nn.Conv2d(channels, width, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.GELU(),
        )
        self.couplings = nn.ModuleList(Coupling(channels, width, parity=i % 2) for i in range(layers))

    def forward(self, x_uint8: torch.Tensor, uniform: torch.Tensor) -> DequantSample:
        """Draw u ~ q(u | x) from `uniform` (U[0, 1) draws of x's shape, the reparameterised noise)."""
        context = self.context(flow.uint8_to_model(x_uint8).to(uniform.dtype))
        p = uniform.clamp(EDGE, 1 - EDGE)
        v = torch.log(p) - torch.log1p(-p)  # standard logistic
        log_q = logistic_log_density(v).flatten(1).sum(-1)
        for coupling in self.couplings:
            v, logdet = coupling(v, context)
            log_q = log_q - logdet
        # u = sigmoid(v): log|du/dv| is the logistic log-density at v
        log_q = log_q - logistic_log_density(v).flatten(1).sum(-1)
        # where sigmoid rounds to 0 or 1 (|v| past ~17 in float32), u is kept inside the open interval: the
        # bin is [x, x + 1), and a u of exactly 1 would score the next pixel value's edge
        tiny, eps = torch.finfo(v.dtype).tiny, torch.finfo(v.dtype).eps
        return DequantSample(torch.sigmoid(v).clamp(tiny, 1 - eps / 2), log_q)


def dequantize(dequantizer: VariationalDequantizer | None, x_uint8: torch.Tensor, uniform: torch.Tensor) -> Dequantized:
    """8-bit images and U[0, 1) draws -> the flow's input ((x + u) / 256 in [-1, 1] scale) and log q(u | x).
    Without a dequantizer u is the uniform draw itself and log q is 0."""
    if dequantizer is None:
        u, log_q = uniform, uniform.new_zeros(uniform.shape[0])
    else:
        u, log_q = dequantizer(x_uint8, uniform)
    return Dequantized((x_uint8.to(u.dtype) + u) / 256 * 2 - 1, log_q)


def dequantize_unautocast(
    dequantizer: VariationalDequantizer, x_uint8: torch.Tensor, uniform: torch.Tensor
) -> Dequantized:
    """`dequantize` by q in the precision of its weights (float32 in training), outside any autocast:
    log q sums D log-densities and log-scales, which bf16 would round by several nats per image."""
    dtype = next(dequantizer.parameters()).dtype
    with torch.autocast(uniform.device.type, enabled=False):
        return dequantize(dequantizer, x_uint8, uniform.to(dtype))


class DequantizingFlow(nn.Module):
    """The training forward of a variationally dequantized model, as one module: (8-bit images, their
    U[0, 1) draws, labels) -> (z, logdet, log q(u | x)). DDP wraps this, so q's parameters are used in
    the forward it watches and their gradients are all-reduced with the flow's."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model  # a TarFlow with a dequantizer

    def forward(
        self, x_uint8: torch.Tensor, uniform: torch.Tensor, y: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x, log_q = dequantize_unautocast(self.model.dequantizer, x_uint8, uniform)
        z, logdet = self.model(x, y)
        return z, logdet, log_q


def dequantizer_shapes(
    channels: int, width: int, layers: int, prefix: str = "dequantizer."
) -> dict[str, tuple[int, ...]]:
    """The shape of every entry of `VariationalDequantizer(channels, width, layers).state_dict()`,
    under `prefix` (its name in TarFlow), without building it."""
    C, W = channels, width
    shapes = {
        f"{prefix}context.0.weight": (W, C, 3, 3),
        f"{prefix}context.0.bias": (W,),
        f"{prefix}context.2.weight": (W, W, 3, 3),
        f"{prefix}context.2.bias": (W,),
    }
    for i in range(layers):
        net = f"{prefix}couplings.{i}.net."
        shapes.update({net + "0.weight": (W, C + W, 3, 3), net + "0.bias": (W,)})
        shapes.update({net + "2.weight": (2 * C, W, 3, 3), net + "2.bias": (2 * C,)})
    return shapes
