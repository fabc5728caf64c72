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

import torch

from .block_runner import BlockRunner


@dataclass
class InversionStats:
    """What the parallel samplers did, per block (in inversion order)."""

    iterations: list[int] = field(default_factory=list)  # forward passes used per block
    segments: list[int] = field(default_factory=list)  # segment length used per block
    fallbacks: int = 0  # segments redone sequentially after diverging

    def to_dict(self) -> dict:
        return {"iterations": self.iterations, "segments": self.segments, "fallbacks": self.fallbacks}


def invert_sequential(runner: BlockRunner, xo: torch.Tensor, start: int = 0, stop: int | None = None) -> None:
    """Solve positions start+1..stop-1 in place, one token per step (cache must hold positions < start)."""
    stop = xo.shape[1] if stop is None else stop
    for t in range(start, stop - 1):
        a, b = runner.step(xo[:, t], t)
        nxt = xo[:, t + 1]
        if a is not None:
            nxt.mul_(a.exp())
        nxt.add_(b)


def invert_segments(runner: BlockRunner, xo: torch.Tensor, segment: int, *, tol: float,
                    check_every: int = 1, stats: InversionStats | None = None,
                    max_passes: int | None = None) -> int | None:
    """Gauss-Seidel-Jacobi in place: segments of `segment` unknown tokens in order, Jacobi inside.

    `xo` holds z (this block's order) on entry and x on exit. Returns the forward passes used,
    or None when `max_passes` was exceeded (then `xo` is left unfinished).
    """
    T = xo.shape[1]
    z = xo.clone()
    passes = 0
    p0 = 1  # position 0 is the identity
    while p0 < T:
        if max_passes is not None and passes > max_passes:
            return None
        p1 = min(T, p0 + segment)
        used, ok = _jacobi_segment(runner, xo, z, p0, p1, tol=tol, check_every=check_every, refresh=p1 < T)
        passes += used
        if not ok:
            xo[:, p0:p1] = z[:, p0:p1]
            invert_sequential(runner, xo, p0 - 1, p1)
            passes += p1 - p0
            if stats is not None:
                stats.fallbacks += 1
        p0 = p1
    return passes


def _jacobi_segment(runner: BlockRunner, xo: torch.Tensor, z: torch.Tensor, p0: int, p1: int, *,
                    tol: float, check_every: int, refresh: bool) -> tuple[int, bool]:
    """Iterate unknowns p0..p1-1 from inputs p0-1..p1-2; exact after p1-p0 passes."""
    length = p1 - p0
    first_delta = None
    for it in range(1, length + 1):
        a, b = runner.params(xo[:, p0 - 1:p1 - 1], p0 - 1)
        zs = z[:, p0:p1]
        new = (zs if a is None else zs * a.exp()) + b
        if it == length:  # exact: every token of the segment has seen an exact prefix
            xo[:, p0:p1] = new
            return it, bool(torch.isfinite(new).all())
        if it % check_every == 0 or it == 1:
            delta = (new - xo[:, p0:p1]).abs().amax()
            delta = float(delta)  # the only host sync, every `check_every` passes
            if delta != delta or delta == float("inf"):
                return it, False
            if first_delta is None:
                first_delta = delta
            elif delta > 1e3 * max(first_delta, tol):
                return it, False  # growing: not contracting, redo sequentially
            xo[:, p0:p1] = new
            if delta <= tol:
                if not refresh:
                    return it, True
                # later segments read this one's keys/values: recompute them from the final x
                runner.params(xo[:, p0 - 1:p1 - 1], p0 - 1)
                return it + 1, True
        else:
            xo[:, p0:p1] = new
    return length, True
