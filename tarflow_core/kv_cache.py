"""Preallocated key/value storage for inverting one flow block.

The cache is an explicit object handed to the step function: nothing is stored on the modules,
so several sampling runs can share a model, and an exception leaves no state behind. Positions
are written in place (no concatenation per token).
"""

from __future__ import annotations

import torch


class KVCache:
    """Keys and values of every layer of a block: `kv[layer, 0 (keys) | 1 (values), row, position, head, dim]`.

    Position-major per row, so writing one token is one contiguous (heads * dim) run per row and
    kind; attention reads `keys(layer, stop)`, a (row, head, position, dim) view.
    """

    def __init__(
        self,
        layers: int,
        rows: int,
        heads: int,
        length: int,
        head_dim: int,
        *,
        dtype: torch.dtype,
        device: torch.device | str,
    ):
        # zeros, not garbage: graph-captured steps read masked positions, and 0 * NaN is NaN
        self.kv = torch.zeros(layers, 2, rows, length, heads, head_dim, dtype=dtype, device=device)
        self.length = length

    def keys(self, layer: int, stop: int) -> torch.Tensor:
        """Keys of positions < stop as (row, head, position, dim)."""
        return self.kv[layer, 0, :, :stop].transpose(1, 2)

    def values(self, layer: int, stop: int) -> torch.Tensor:
        """Values of positions < stop as (row, head, position, dim)."""
        return self.kv[layer, 1, :, :stop].transpose(1, 2)
