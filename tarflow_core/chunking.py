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
a `max_batch` that fits then fixes the split.

The bytes per row are the memory plan's (memory.py), as it counts them on CUDA.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from . import memory
from .config import ModelConfig

GiB = memory.GiB
# Kept free on CUDA beside the estimates: library workspaces (cuBLAS, cuDNN) created on first use
# and the caching allocator's rounding (the plan's estimates add fragmentation on top of themselves)
CUDA_MARGIN = 1 * GiB


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
        size = min(size, max(1, memory.chunk_size(budget, max(1, per_row_bytes))))
    return size


def spans(n: int, size: int) -> Iterator[tuple[int, int]]:
    """(start, stop) of consecutive chunks of at most `size` covering 0..n."""
    for start in range(0, n, size):
        yield start, min(n, start + size)


def _per_row(plan: Callable[[int], memory.InferencePlan]) -> int:
    """What one more row adds to an inference plan's peak on CUDA (the weights and the runtime are
    resident before a pass is sized, so only this counts against the free memory)."""
    return plan(2).peak - plan(1).peak


def _precision(element: int) -> tuple[str, float]:
    """The memory plan's precision for values of `element` bytes, and the factor for wider ones."""
    return ("bf16", 1.0) if element <= 2 else ("fp32", element / 4)


def scoring_bytes_per_row(cfg: ModelConfig, element: int = 4) -> int:
    """A no-grad forward per image (`memory.scoring_memory`), values of `element` bytes."""
    precision, wider = _precision(element)
    return int(wider * _per_row(lambda n: memory.scoring_memory(cfg, n, precision=precision)))


def denoising_bytes_per_row(cfg: ModelConfig, element: int = 4) -> int:
    """One autograd pass of log p(x) w.r.t. x per image (`memory.denoising_memory`): a whole forward
    kept for backward."""
    precision, wider = _precision(element)
    return int(wider * _per_row(lambda n: memory.denoising_memory(cfg, n, precision=precision)))


def fid_bytes_per_row(size: int = 299) -> int:
    """The FID network per image (`memory.fid_memory`, at 299x299; its maps scale with the area)."""
    return int(_per_row(lambda n: memory.fid_memory(n)) * (size / 299) ** 2)


format_bytes = memory.format_size
