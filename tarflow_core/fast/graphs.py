"""CUDA-graph replay of the samplers' fixed-shape work.

A sampler step written on static tensors (inputs, outputs and positions all live in tensors
that persist between calls) can be recorded once as a CUDA graph and then replayed with one
launch, which removes the per-kernel launch latency that bounds token-by-token sampling on GPUs.
`Replay` wraps such a step: on CUDA its first call runs eagerly (warm-up, real work), the second
records the graph and replays it, later calls only replay. Elsewhere, or when disabled, every
call simply runs the step, so the same control flow is exercised on CPUs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


class Replay:
    def __init__(self, step: Callable[[], None], *, graphed: bool, pool=None):
        self.step = step
        self.graphed = graphed
        self.pool = pool
        self.graph = None
        self.calls = 0

    def __call__(self) -> None:
        self.calls += 1
        if not self.graphed:
            self.step()
        elif self.graph is not None:
            self.graph.replay()
        elif self.calls == 1:
            _warm_up(self.step)
        else:
            self.graph = _capture(self.step, self.pool)
            self.graph.replay()


def graph_pool(graphed: bool):
    """A memory pool shared by the graphs of one sampling run (they never run concurrently)."""
    return torch.cuda.graph_pool_handle() if graphed else None


def use_graphs(device: torch.device, requested: bool | None) -> bool:
    """Graphs are used on CUDA unless turned off; asking for them elsewhere is an error."""
    if requested is None:
        return device.type == "cuda"
    if requested and device.type != "cuda":
        raise ValueError(f"CUDA graphs need a CUDA device (sampling runs on {device})")
    return requested


def _warm_up(step: Callable[[], None]) -> None:
    """Run once on a side stream, as capture requires (lazy library initialisation happens here)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)


def _capture(step: Callable[[], None], pool) -> torch.cuda.CUDAGraph:
    """Record `step` as a CUDA graph (recording does not run it)."""
    graph = torch.cuda.CUDAGraph()
    # thread_local: CUDA work on other threads (a dashboard, NCCL's watchdog) may go on
    with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
        step()
    return graph
