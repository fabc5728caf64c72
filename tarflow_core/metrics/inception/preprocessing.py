"""The FID Inception's input: 0..255 images to (B, 3, 299, 299) in [-1, 1].

The standard (``resize="tf"``): TensorFlow 1.x ``ResizeBilinear`` (``align_corners=False``, no
half-pixel centres) to 299x299, then (x - 128) / 128 -- what the 2015 graph was fed, and so what
published FID statistics assume. ``resize="pytorch"`` instead reproduces pytorch-fid's
preprocessing (x / 255, PyTorch bilinear with half-pixel centres, then 2x - 1); the two agree
exactly at 299x299 input up to the 127.5 vs 128 offset.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

INPUT_SIZE = 299
RESIZE_MODES = ("tf", "pytorch")


def preprocess(
    images: torch.Tensor,
    *,
    resize: str = "tf",
    size: int = INPUT_SIZE,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """0..255 images (B, 1|3, H, W) -> Inception input (B, 3, size, size) in [-1, 1]: grayscale
    repeated to RGB; ``tf``: TF 1.x bilinear resize then (x - 128) / 128; ``pytorch``: x / 255,
    PyTorch bilinear (half-pixel centres), then 2x - 1."""
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images shaped (B, 1 or 3, H, W), got {tuple(images.shape)}")
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {', '.join(RESIZE_MODES)} (got {resize!r})")
    x = images.to(device=device if device is not None else images.device, dtype=dtype)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if resize == "tf":
        return (resize_bilinear_tf1(x, size) - 128) / 128
    x = x / 255
    if tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return 2 * x - 1


def resize_bilinear_tf1(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize as TensorFlow 1.x ``ResizeBilinear(align_corners=False)`` computes it.

    Output pixel i samples the input at i * (in / out) (no half-pixel offset): the lower
    neighbour floor of that, the upper one clamped to the last row/column, and the two
    interpolated as top + (bottom - top) * frac, rows after columns. Same size: unchanged.
    """
    H, W = x.shape[-2:]
    if (H, W) == (size, size):
        return x

    def axis(n_in: int):
        src = torch.arange(size, dtype=torch.float32) * torch.tensor(n_in / size, dtype=torch.float32)
        lo = src.floor().long().clamp(max=n_in - 1)
        hi = (lo + 1).clamp(max=n_in - 1)
        return lo.to(x.device), hi.to(x.device), (src - lo.float()).to(x.device, x.dtype)

    ylo, yhi, dy = axis(H)
    xlo, xhi, dx = axis(W)
    left, right = x.index_select(-1, xlo), x.index_select(-1, xhi)
    rows = left + (right - left) * dx
    top, bottom = rows.index_select(-2, ylo), rows.index_select(-2, yhi)
    return top + (bottom - top) * dy[:, None]
