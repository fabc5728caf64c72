"""Inverting one flow block: token by token, or by Jacobi fixed-point iteration over segments.

Block inverse: x[t] = z[t] * exp(a_t(x[<t])) + b_t(x[<t]), a triangular system. Sequential
inversion solves it one token at a time. Jacobi iteration updates a whole segment at once from
the previous guess; after k iterations the first k tokens of the segment are exact, so a segment
of L tokens is exact after L iterations and usually converges long before. Gauss-Seidel-Jacobi
runs segments in order, Jacobi inside each. A segment whose iterates blow up (non-finite or
growing) is redone sequentially, so a wrong image is never returned silently.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from ..model import FlowBlock, affine_inverse
from .graphs import Replay
from .runner import BlockRunner, compute_dtype

DEFAULT_TOL = 1e-4  # Jacobi convergence: largest change between passes, float32 arithmetic
DEFAULT_TOL_HALF = 1e-2  # the same in bfloat16/float16, whose rounding keeps iterates moving ~1e-2


def default_tol(dtype: torch.dtype) -> float:
    """The Jacobi samplers' default tolerance for this arithmetic (DEFAULT_TOL or DEFAULT_TOL_HALF)."""
    return DEFAULT_TOL_HALF if dtype in (torch.float16, torch.bfloat16) else DEFAULT_TOL


@dataclass
class InversionStats:
    """What sampling did: per block (in inversion order) and the settings it resolved."""

    iterations: list[int] = field(default_factory=list)  # forward passes used per block
    segments: list[int] = field(default_factory=list)  # segment length used per block
    fallbacks: int = 0  # segments redone sequentially after diverging
    tol: float | None = None  # Jacobi tolerance used (the default depends on the arithmetic)
    check_every: int | None = None  # Jacobi passes between convergence checks
    cuda_graphs: bool | None = None  # fixed-shape steps replayed as CUDA graphs


class InversionSettings(NamedTuple):
    """How `invert_block` computes, the same for every block of a sampling run."""

    tol: float = DEFAULT_TOL  # Jacobi tolerance
    check_every: int = 1  # Jacobi passes between convergence checks (host syncs)
    graphed: bool = False  # fixed-shape steps replayed as CUDA graphs
    dtype: torch.dtype | None = None  # the transformer's products (None: autocast's when it is on, else x's)

    @property
    def jacobi(self) -> dict:
        """The settings `invert_segments` takes, as keyword arguments."""
        return dict(tol=self.tol, check_every=self.check_every, graphed=self.graphed)


def invert_block(
    block: FlowBlock,
    x: torch.Tensor,
    y: torch.Tensor | None,
    *,
    segment: int = 1,
    settings: InversionSettings = InversionSettings(),
    stats: InversionStats | None = None,
    pool=None,
    **guide,
) -> torch.Tensor:
    """Invert one block for natural-order tokens x (B, T, D): sequentially when `segment` is 1,
    else by Jacobi iteration over segments of that many tokens. Graphed steps share the memory
    `pool`. `guide`: as `FlowBlock.reverse`."""
    dtype = settings.dtype or compute_dtype(x.device, x.dtype)
    runner = BlockRunner(block, x.shape[0], y, device=x.device, dtype=dtype, **guide)
    xo = block.order(x).clone()
    if segment <= 1:
        if settings.graphed:
            invert_sequential_static(runner, xo, graphed=True, pool=pool)
        else:
            invert_sequential(runner, xo)
        passes = x.shape[1] - 1
    else:
        passes = invert_segments(runner, xo, segment, stats=stats, pool=pool, **settings.jacobi)
    if stats is not None:
        stats.iterations.append(passes)
        stats.segments.append(segment)
    return block.order(xo)


def invert_sequential(runner: BlockRunner, xo: torch.Tensor, start: int = 0, stop: int | None = None) -> None:
    """Solve positions start+1..stop-1 in place, one token per step (cache must hold positions < start)."""
    stop = xo.shape[1] if stop is None else stop
    for t in range(start, stop - 1):
        a, b = runner.step(xo[:, t], t)
        xo[:, t + 1] = inverse_update(xo[:, t + 1], a, b)


def inverse_update(z: torch.Tensor, a: torch.Tensor | None, b: torch.Tensor) -> torch.Tensor:
    """x = z * exp(a) + b, or z + b for shift-only (VP) blocks."""
    return z + b if a is None else affine_inverse(z, a, b)


SPAN_BUCKETS = 8  # fixed attention spans per sequence in the graph-replayed sequential step


def bucket_span(t: int, length: int, buckets: int = SPAN_BUCKETS) -> int:
    """The fixed attention span the graph-replayed step uses for position t (the end of t's bucket)."""
    size = -(-length // buckets)
    return min(length, (t // size + 1) * size)


def invert_sequential_static(
    runner: BlockRunner, xo: torch.Tensor, *, graphed: bool, buckets: int = SPAN_BUCKETS, pool=None
) -> None:
    """Solve positions 1..T-1 in place like `invert_sequential`, with every shape fixed per bucket.

    The position lives in a device tensor and attention reads a fixed span of the cache (the
    end of the current bucket of T / `buckets` positions, later positions masked), so each
    bucket's step can be replayed as one CUDA graph (`graphed`); the masked padding adds about
    1 / buckets to the keys/values read.
    """
    T = xo.shape[1]
    pos = torch.zeros(1, dtype=torch.long, device=xo.device)
    step, span = None, None
    for t in range(T - 1):
        if bucket_span(t, T, buckets) != span:
            span = bucket_span(t, T, buckets)
            step = Replay(lambda span=span: _advance(runner, xo, pos, span), graphed=graphed, pool=pool)
        step()


def _advance(runner: BlockRunner, xo: torch.Tensor, pos: torch.Tensor, span: int) -> None:
    """One sequential update at the position held in `pos`, which then moves on by one."""
    a, b = runner.step(xo.index_select(1, pos)[:, 0], pos, span)
    following = pos + 1
    new = inverse_update(xo.index_select(1, following)[:, 0], a, b)
    xo.index_copy_(1, following, new.unsqueeze(1).to(xo.dtype))
    pos.add_(1)


def invert_segments(
    runner: BlockRunner,
    xo: torch.Tensor,
    segment: int,
    *,
    tol: float,
    check_every: int = 1,
    stats: InversionStats | None = None,
    max_passes: int | None = None,
    graphed: bool = False,
    pool=None,
) -> int | None:
    """Gauss-Seidel-Jacobi in place: segments of `segment` unknown tokens in order, Jacobi inside.

    `xo` holds z (this block's order) on entry and x on exit. Returns the forward passes used,
    or None when `max_passes` was exceeded (then `xo` is left unfinished). With `graphed`, each
    segment's pass is replayed as a CUDA graph and the host reads the change only every
    `check_every` passes.
    """
    T = xo.shape[1]
    z = xo.clone()
    delta = torch.zeros((), dtype=torch.float32, device=xo.device)
    passes = 0
    p0 = 1  # position 0 is the identity
    while p0 < T:
        if max_passes is not None and passes > max_passes:
            return None
        p1 = min(T, p0 + segment)
        one_pass = Replay(lambda p0=p0, p1=p1: _jacobi_pass(runner, xo, z, p0, p1, delta), graphed=graphed, pool=pool)
        outcome = _jacobi_segment(runner, xo, one_pass, delta, p0, p1, tol=tol, check_every=check_every, refresh=p1 < T)
        passes += outcome.passes
        if not outcome.converged:
            xo[:, p0:p1] = z[:, p0:p1]
            invert_sequential(runner, xo, p0 - 1, p1)
            passes += p1 - p0
            if stats is not None:
                stats.fallbacks += 1
        p0 = p1
    return passes


def _jacobi_pass(runner: BlockRunner, xo: torch.Tensor, z: torch.Tensor, p0: int, p1: int, delta: torch.Tensor) -> None:
    """One Jacobi update of unknowns p0..p1-1 from inputs p0-1..p1-2, in place; the largest change
    goes to `delta` (non-finite when the update is)."""
    a, b = runner.params(xo[:, p0 - 1 : p1 - 1], p0 - 1)
    new = inverse_update(z[:, p0:p1], a, b)
    current = xo[:, p0:p1]
    delta.copy_((new - current).abs().amax())
    current.copy_(new)


class SegmentOutcome(NamedTuple):
    passes: int  # forward passes used on the segment
    converged: bool  # finite and contracting; False: the segment is to be redone sequentially


def _jacobi_segment(
    runner: BlockRunner,
    xo: torch.Tensor,
    one_pass: Replay,
    delta: torch.Tensor,
    p0: int,
    p1: int,
    *,
    tol: float,
    check_every: int,
    refresh: bool,
) -> SegmentOutcome:
    """Iterate unknowns p0..p1-1; exact after p1-p0 passes."""
    length = p1 - p0
    first_delta = None
    for it in range(1, length + 1):
        one_pass()
        if it < length and it % check_every and it != 1:
            continue
        change = float(delta)  # the only host sync, every `check_every` passes
        if change != change or change == float("inf"):
            return SegmentOutcome(it, False)
        if it == length:  # exact: every token of the segment has seen an exact prefix
            return SegmentOutcome(it, True)
        if first_delta is None:
            first_delta = change
        elif change > 1e3 * max(first_delta, tol):
            return SegmentOutcome(it, False)  # growing: not contracting, redo sequentially
        if change <= tol:
            if not refresh:
                return SegmentOutcome(it, True)
            # later segments read this one's keys/values: recompute them from the final x
            runner.params(xo[:, p0 - 1 : p1 - 1], p0 - 1)
            return SegmentOutcome(it + 1, True)
    return SegmentOutcome(length, True)
