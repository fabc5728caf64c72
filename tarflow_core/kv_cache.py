"""Preallocated key/value storage for token-by-token inversion of one flow block.

The cache is an explicit object handed to the step function: nothing is stored on the modules,
so several sampling runs can share a model, and an exception leaves no state behind.
"""

from __future__ import annotations

import torch


class KVCache:
    """Keys and values of every layer of a block: `kv[layer, 0|1, batch, head, position, dim]`."""

    def __init__(self, layers: int, batch: int, heads: int, length: int, head_dim: int, *,
                 dtype: torch.dtype, device: torch.device | str):
        self.kv = torch.empty(layers, 2, batch, heads, length, head_dim, dtype=dtype, device=device)
        self.length = length

    def write(self, layer: int, pos: int, kv: torch.Tensor) -> None:
        """Store position `pos` of one layer; `kv` is (batch, 2, heads, dim) (keys then values)."""
        self.kv[layer, :, :, :, pos].copy_(kv.transpose(0, 1))

    def keys(self, layer: int, upto: int) -> torch.Tensor:
        """Keys of positions 0..upto-1: (batch, heads, upto, dim) — a view, no copy."""
        return self.kv[layer, 0, :, :, :upto]

    def values(self, layer: int, upto: int) -> torch.Tensor:
        return self.kv[layer, 1, :, :, :upto]
