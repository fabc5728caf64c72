"""Pure math of the flow: patch tokens, affine coupling, densities, bits per dimension."""

from __future__ import annotations

import math

import torch

LOG_2PI = math.log(2 * math.pi)
LN_128 = math.log(128.0)


def at_least_f32(x: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 -> float32; float32 and float64 unchanged (exp and norms never run in half precision)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def as_number(name: str, value) -> float:
    """An option given as a Python, numpy or one-element tensor number, as a float; TypeError naming
    the option for anything else (strings included)."""
    if isinstance(value, (str, bytes, bool)):
        raise TypeError(f"{name} must be a number (got {value!r})")
    try:
        return float(value)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"{name} must be a number (got {value!r})") from None


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


def prepend_zero_token(out: torch.Tensor) -> torch.Tensor:
    """(B, T-1, K) head outputs of tokens 0..T-2 -> (B, T, K) shifted right by one token: token t
    gets what tokens < t produced, token 0 gets zeros (its transform is the identity)."""
    return torch.nn.functional.pad(out, (0, 0, 1, 0))


def affine_forward(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Data -> noise: z = (x - b) * exp(-a); log|det| = -sum(a)."""
    return (x - b) * (-at_least_f32(a)).exp().to(a.dtype)


def affine_inverse(z: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Noise -> data: x = z * exp(a) + b."""
    return z * at_least_f32(a).exp().to(a.dtype) + b


def guide(cond: torch.Tensor, uncond: torch.Tensor, weight: float) -> torch.Tensor:
    """Classifier-free guidance extrapolation: c + w * (c - u)."""
    return cond + weight * (cond - uncond)


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
