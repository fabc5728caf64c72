"""Inference in chunks: how many rows (images, or image x class pairs) one pass may hold.

Denoising keeps a whole forward for backward, scoring and the FID network one layer's tensors at a
time; at paper scale a default batch of them needs far more than one GPU holds. Every inference path
therefore asks `rows_per_pass` how many rows one pass takes: at most the batch it was given, at most
`max_batch` (`--max-batch`), and on CUDA at most what the free memory holds at the path's estimated
bytes per row. The rows of these passes are independent of each other (per-sequence attention,
per-token norms, eval-mode batch norms), so a chunked result equals the unchunked one up to the
rounding of a different batch size.

Off CUDA nothing is measured (the CPU's memory is shared with everything else, and its batches are
the user's): without `max_batch` a pass holds the whole batch, as it always did.

A whole batch that fits runs as one pass whatever the free memory, so the sizes, and the rounding, are
the same run to run on a GPU of one's own; on a GPU that other processes share, a batch that does not
fit may be split differently from one run to the next (the same numbers up to rounding), and
`max_batch` then fixes the split.

The per-row estimates below are local stand-ins for the memory plan's (memory.py) until it lands.
"""

from __future__ import annotations

from typing import Iterator

import torch

from .config import ModelConfig

MiB, GiB = 2**20, 2**30
# Kept free on CUDA beside the estimates: library workspaces (cuBLAS, cuDNN) created on first use
# and the caching allocator's rounding; the estimates also allow FRAGMENTATION on top of themselves.
CUDA_MARGIN = 1 * GiB
FRAGMENTATION = 0.10
FID_FEATURE_MAPS = 12 * MiB  # live feature maps of one 299x299 image in the FID network (float32)


def inference_budget(device: torch.device | str) -> int | None:
    """Bytes an inference pass may still allocate on `device`: on CUDA the free memory plus what the
    caching allocator holds unused, less CUDA_MARGIN; None elsewhere (no limit is measured)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return max(0, free + cached - CUDA_MARGIN)


def rows_per_pass(
    rows: int,
    *,
    per_row_bytes: int,
    max_batch: int | None = None,
    device: torch.device | str = "cpu",
    budget: int | None = None,
) -> int:
    """The rows one pass holds: all `rows`, at most `max_batch`, and at most what `budget` bytes
    (default: `inference_budget(device)`) hold at `per_row_bytes` each; at least 1."""
    if max_batch is not None and (isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1):
        raise ValueError(f"max_batch must be a whole number >= 1 (got {max_batch!r})")
    size = max(1, int(rows))
    if max_batch is not None:
        size = min(size, max_batch)
    if budget is None:
        budget = inference_budget(device)
    if budget is not None:
        # one row at least: an estimate above the budget may be pessimistic, and a real shortage
        # then shows as the device's own out-of-memory error
        size = min(size, max(1, int(budget // max(1, per_row_bytes))))
    return size


def spans(n: int, size: int) -> Iterator[tuple[int, int]]:
    """(start, stop) of consecutive chunks of at most `size` covering 0..n."""
    for start in range(0, n, size):
        yield start, min(n, start + size)


def _with_fragmentation(nbytes: float) -> int:
    return int(nbytes * (1 + FRAGMENTATION))


def scoring_bytes_per_row(cfg: ModelConfig, element: int = 4) -> int:
    """A no-grad forward, at its largest inside a layer's MLP: the layer's input and middle residual,
    the norm's output, the fc1 and GELU outputs (earlier layers' tensors are freed), per image."""
    W, E = cfg.width, cfg.expansion * cfg.width
    return _with_fragmentation(cfg.num_patches * (2 * element * W + 4 * W + 2 * element * E + 16 * cfg.token_dim))


def denoising_bytes_per_row(cfg: ModelConfig, element: int = 4) -> int:
    """One autograd pass of log p(x) w.r.t. x: every layer's saved tensors over the whole forward,
    one layer's backward temporaries, the input and its gradient, per image."""
    T, W, E, D = cfg.num_patches, cfg.width, cfg.expansion * cfg.width, cfg.token_dim
    layer = T * (2 * element * W + 16 + element * (6 * W + 2 * E) + 4 * cfg.num_heads)
    block = T * (element * W + 16 * D)
    backward = T * (2 * element * E + 8 * W)
    saved = cfg.num_blocks * (cfg.layers_per_block * layer + block)
    return _with_fragmentation(saved + backward + 3 * 4 * cfg.data_dim)


def fid_bytes_per_row(size: int = 299) -> int:
    """The FID network's live feature maps and its resized, normalised input, per image (float32)."""
    return _with_fragmentation(FID_FEATURE_MAPS * (size / 299) ** 2 + 2 * 3 * size * size * 4)


def format_bytes(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if abs(n) >= GiB else f"{n / MiB:.1f} MiB"
