"""CUDA-graph semantics on a CPU, for testing the code that CUDA graphs replay.

A real capture records the kernels a step launches without running them; a replay runs the
recorded kernels on the same memory, and no Python runs. `EmulatedGraph` does the same with
ATen operators: recording runs the step under a dispatch mode that logs every operator call
(refusing host synchronisation, which capture forbids) and then undoes every write it made;
a replay re-runs the logged operators, feeding each one the replayed results of earlier ones.
A step that bakes a Python-side value into the graph, or that needs a host sync, therefore
fails here as it would on a GPU.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

SYNCS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default}


class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = []
        self.undo = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in SYNCS:
            raise AssertionError(f"host synchronisation inside a captured step ({func})")
        for arg, value in zip(
            func._schema.arguments, list(args) + [kwargs.get(a.name) for a in func._schema.arguments[len(args) :]]
        ):
            if arg.alias_info is not None and arg.alias_info.is_write and isinstance(value, torch.Tensor):
                self.undo.append((value, value.clone()))
        out = func(*args, **kwargs)
        self.calls.append((func, args, kwargs, out))
        return out


class EmulatedGraph:
    def __init__(self, step):
        recorder = _Recorder()
        with recorder:
            step()
        for tensor, before in reversed(recorder.undo):  # capture does not run the step
            tensor.copy_(before)
        self.calls = recorder.calls
        self.replays = 0

    def replay(self) -> None:
        replayed: dict[int, torch.Tensor] = {}

        def current(value):
            return replayed.get(id(value), value) if isinstance(value, torch.Tensor) else value

        for func, args, kwargs, out in self.calls:
            new = func(*tree_map(current, args), **tree_map(current, kwargs))
            for old, fresh in zip(tree_flatten(out)[0], tree_flatten(new)[0]):
                if isinstance(old, torch.Tensor):
                    replayed[id(old)] = fresh
        self.replays += 1


def emulate_cuda_graphs(monkeypatch) -> list[EmulatedGraph]:
    """Make tarflow_core.cuda_graphs capture EmulatedGraphs (warm-up runs the step in place)."""
    from tarflow_core.fast import graphs as cuda_graphs

    graphs: list[EmulatedGraph] = []

    def capture(step, pool):
        graphs.append(EmulatedGraph(step))
        return graphs[-1]

    monkeypatch.setattr(cuda_graphs, "_capture", capture)
    monkeypatch.setattr(cuda_graphs, "_warm_up", lambda step: step())
    return graphs
