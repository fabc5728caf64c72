"""Choosing each block's Jacobi segment length by measurement (1 = sequential).

The cost of one pass over a window of S tokens is timed at the real batch size, once for each block
depth (blocks of a deep-shallow model differ); the number of passes each segment length needs is counted
on a few samples. The cheapest choice wins per block.
"""

from __future__ import annotations

import time

import torch

from ..model import FlowBlock, TarFlow
from .graphs import Replay, use_graphs
from .inversion import InversionSettings, bucket_span, default_tol, invert_block, invert_segments
from .runner import BlockRunner, compute_dtype


def calibrate_segments(
    model: TarFlow,
    x: torch.Tensor,
    y: torch.Tensor | None,
    *,
    tol: float | None = None,
    probe: int = 4,
    dtype: torch.dtype | None = None,
    graphed: bool | None = None,
    **guide,
) -> list[int]:
    """Choose each block's segment length (1 = sequential) from measurement, for prior-scaled
    tokens x (B, T, D); returns one per block, in inversion order. `graphed`: time the work
    replayed as CUDA graphs (default: as sampling does by default on x's device)."""
    dtype = dtype or compute_dtype(x.device, x.dtype)
    tol = default_tol(dtype) if tol is None else tol
    graphed = use_graphs(x.device, None) if graphed is None else graphed
    with torch.inference_mode(), torch.autocast(x.device.type, enabled=False):
        return _calibrate(model, x, y, tol=tol, probe=probe, dtype=dtype, graphed=graphed, guide=guide)


def _calibrate(
    model: TarFlow, x: torch.Tensor, y: torch.Tensor | None, *, tol: float, probe: int, dtype, graphed, guide
) -> list[int]:
    B, T, D = x.shape
    blocks = list(reversed(model.blocks))
    lengths = sorted({s for s in (T - 1, (T - 1 + 1) // 2, (T - 1 + 3) // 4, (T - 1 + 7) // 8) if s >= 2}, reverse=True)
    # a pass costs in proportion to the block's layers: timed once per depth (deep-shallow models have several)
    by_depth: dict[int, dict[int, float]] = {}
    for block in blocks:
        if len(block.attn_blocks) not in by_depth:
            times = {s: _time_pass(block, x, y, s, dtype, guide, graphed) for s in [1, *lengths]}
            by_depth[len(block.attn_blocks)] = times
    # a segment needs at least two passes to see convergence: drop lengths that cannot beat sequential
    worth = {
        depth: [s for s in lengths if 2 * -(-(T - 1) // s) * cost[s] < (T - 1) * cost[1]]
        for depth, cost in by_depth.items()
    }
    if not any(worth.values()):
        return [1] * len(blocks)
    xp = x[:probe].clone()
    yp = y[:probe] if y is not None else None
    chosen = []
    for block in blocks:
        cost, candidates = by_depth[len(block.attn_blocks)], worth[len(block.attn_blocks)]
        best_s, best_cost, best_out = 1, (T - 1) * cost[1], None
        for s in candidates:
            runner = BlockRunner(block, len(xp), yp, device=x.device, dtype=dtype, **guide)
            xo = block.order(xp).clone()
            passes = invert_segments(runner, xo, s, tol=tol, max_passes=int(best_cost / cost[s]))
            if passes is not None and passes * cost[s] < best_cost:
                best_s, best_cost, best_out = s, passes * cost[s], block.order(xo)
        if best_out is None:
            best_out = invert_block(block, xp, yp, segment=1, settings=InversionSettings(dtype=dtype), **guide)
        chosen.append(best_s)
        xp = best_out
    return chosen


def _time_pass(
    block: FlowBlock, x: torch.Tensor, y, length: int, dtype, guide, graphed: bool, repeats: int = 3
) -> float:
    """Seconds for one pass over a window of `length` tokens at the real batch size (best of a few),
    run the way sampling runs it: a single token through the fixed-shape step and windows through
    the block forward, each replayed as a CUDA graph when `graphed`."""
    runner = BlockRunner(block, x.shape[0], y, device=x.device, dtype=dtype, **guide)
    xo = block.order(x)
    T = xo.shape[1]
    if length == 1:
        pos = torch.full((1,), T // 2, dtype=torch.long, device=x.device)
        work = Replay(lambda: runner.step(xo[:, T // 2], pos, bucket_span(T // 2, T)), graphed=graphed)
    else:
        work = Replay(lambda: runner.params(xo[:, :length], 0), graphed=graphed)
    work(), work()  # warm-up and, on CUDA, capture
    best = float("inf")
    for _ in range(repeats):
        _sync(x.device)
        t0 = time.perf_counter()
        work()
        _sync(x.device)
        best = min(best, time.perf_counter() - t0)
    return best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
