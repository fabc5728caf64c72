"""Preallocated key/value storage for inverting one flow block.

The cache is an explicit object handed to the step function: nothing is stored on the modules,
so several sampling runs can share a model, and an exception leaves no state behind. Positions
are written in place (no concatenation per token).
"""

from __future__ import annotations

import torch


class KVCache:
    """Keys and values of every layer of a block: `kv[layer, 0 (keys) | 1 (values), row, head, position, dim]`."""

    def __init__(self, layers: int, rows: int, heads: int, length: int, head_dim: int, *,
                 dtype: torch.dtype, device: torch.device | str):
        self.kv = torch.empty(layers, 2, rows, heads, length, head_dim, dtype=dtype, device=device)
        self.length = length
