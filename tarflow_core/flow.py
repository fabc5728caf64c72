"""Data-side math of the flow: patch tokens, the Gaussian prior's density, bits per dimension, 8-bit images.

The flow itself (affine coupling, the transformer, its inverse) is in `tarflow_core.model`.
"""

from __future__ import annotations

import math

import torch

LOG_2PI = math.log(2 * math.pi)
LN_128 = math.log(128.0)


def patchify(x: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, T, C*p*p): raster-order patches, each flattened channel-major."""
    B, C, H, W = x.shape
    p = patch_size
    t = x.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5)
    return t.reshape(B, (H // p) * (W // p), C * p * p)


def unpatchify(tokens: torch.Tensor, channels: int, img_size: int, patch_size: int) -> torch.Tensor:
    """Exact inverse of `patchify`."""
    B = tokens.shape[0]
    p, n = patch_size, img_size // patch_size
    x = tokens.reshape(B, n, n, channels, p, p).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(B, channels, img_size, img_size)


def gaussian_log_prob(z: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """Per-sample log N(z; 0, var) summed over tokens and dims. z (B, T, D), var (T, D)."""
    var = var.to(z.dtype)
    lp = -0.5 * (z * z / var + torch.log(var) + LOG_2PI)
    return lp.flatten(1).sum(-1)


def nats_to_bpd(nll_per_dim: torch.Tensor) -> torch.Tensor:
    """Bits per 8-bit sub-pixel from nats/dim in [-1, 1] space (pixel bins are 1/128 wide)."""
    return (nll_per_dim + LN_128) / math.log(2.0)


def dequantize_uniform(x_uint8: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """8-bit integers -> [-1, 1] scale with uniform noise inside each bin: ((x + u) / 256) * 2 - 1."""
    x = x_uint8.to(torch.float32)
    u = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return (x + u) / 256 * 2 - 1


def uint8_to_model(x_uint8: torch.Tensor) -> torch.Tensor:
    """8-bit integers -> [-1, 1] scale without noise, exactly as the reference's ToTensor + Normalize(0.5, 0.5)."""
    return (x_uint8.to(torch.float32) / 255 - 0.5) / 0.5
