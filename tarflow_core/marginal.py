"""A learned monotone map of each pixel value, applied before the transformer blocks (`--marginal-bins`).

Pixel values of real images are far from Gaussian: digits take 17 grey levels and half their pixels
are 0, clothes have a spike at the black background. The autoregressive blocks are affine in each
value, so they bend such a marginal only slowly. This map is the cheapest flow that can: per channel,
a continuous piecewise-linear increasing function of [-1, 1] onto itself with `bins` equal-width
pieces, whose slopes are learned,

    f(x) = -1 + sum_{j < k} h_j + (x - x_k) * s_k    for x in bin k = [x_k, x_k + 2 / N),
    h = 2 * softmax(theta),  s_k = h_k / (2 / N) = N * softmax(theta)_k,

so log|f'(x)| = log s_k. theta = 0 is the identity, which is how it starts. Outside [-1, 1] (Gaussian
noise augmentation reaches there) f is the identity shifted to stay continuous. With 256 bins the
pieces are the 8-bit pixel bins, so a uniformly dequantized value stays uniform inside its bin.
"""

from __future__ import annotations

import torch
from torch import nn


class MarginalMap(nn.Module):
    """f per channel, with its log-derivative (forward) and its exact inverse."""

    def __init__(self, channels: int, bins: int):
        super().__init__()
        self.bins = bins
        self.theta = nn.Parameter(torch.zeros(channels, bins))

    def _knots(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Per channel: the slopes s (C, N) and the output value at each bin's left edge (C, N)."""
        p = torch.softmax(self.theta.to(dtype), dim=-1)
        heights = 2 * p
        left = -1 + torch.cumsum(heights, dim=-1) - heights
        return self.bins * p, left

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C, H, W) -> (f(x), log|det df/dx| per image)."""
        slopes, left = self._knots(x.dtype)
        C, N = slopes.shape
        inside = (x >= -1) & (x < 1)
        # a non-finite value keeps any valid bin index and passes through unchanged (the step is skipped)
        k = ((x.nan_to_num(0.0).clamp(-1, 1) + 1) * (N / 2)).floor().clamp(0, N - 1).long()
        channel = torch.arange(C, device=x.device).view(1, C, 1, 1)
        s, y0 = slopes[channel, k], left[channel, k]  # each value's bin of its own channel
        x0 = k.to(x.dtype) * (2 / N) - 1
        y = torch.where(inside, y0 + (x - x0) * s, x)  # f(-1) = -1 and f(1) = 1: identity outside
        log_slope = torch.where(inside, torch.log(s), torch.zeros_like(s))
        return y, log_slope.flatten(1).sum(-1)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        """f^-1, exactly: find each value's bin among the output edges, undo its line."""
        slopes, left = self._knots(y.dtype)
        C, N = slopes.shape
        inside = (y >= -1) & (y < 1)
        flat_y = y.transpose(0, 1).reshape(C, -1).contiguous()
        k = (torch.searchsorted(left.contiguous(), flat_y, right=True) - 1).clamp(0, N - 1)
        s = slopes.gather(1, k)
        y0 = left.gather(1, k)
        x = (k.to(y.dtype) * (2 / N) - 1) + (flat_y - y0) / s
        x = x.reshape(C, y.shape[0], *y.shape[2:]).transpose(0, 1)
        return torch.where(inside, x, y)
