"""A flow block's weights laid out for sampling's few-row matrix products, prepared once per model state.

Sampling multiplies a handful of rows (the batch, twice with guidance) by every weight matrix of
a block once per token, so the layout of the weights decides its speed on CPUs:

* `addmm` (MKL) against (in, out) contiguous copies: 10-40 % faster than against the transposed
  view at 16-32 rows when the weights stay in cache;
* oneDNN's packed layout through `torch.ops.mkldnn._linear_pointwise`: about 45 us more per call,
  but its kernels stream weights that do not fit in cache far better (the 256-wide benchmark
  model's block is 6.3 MB of weights, and its keys/values push the step past an 8 MB L3).

Which one wins depends on the model's size and on the machine, so it is measured, once per
process for each (layer shapes, rows, threads): the block's per-token products are run in
order both ways and the packed layout is used only when it is clearly faster.

Prepared weights are cached per block and reused while its parameters are the same tensors at
the same version (an optimizer step or `load_state_dict` bumps it), so a CLI run drawing many
batches prepares them once. Only CPU preparations are cached; on GPUs the weights are views.
"""

from __future__ import annotations

import time
import weakref
from dataclasses import dataclass

import torch

from .model import FlowBlock

PACKED_MIN_GAIN = 0.95  # packed products must take at most this fraction of addmm's time
_CACHE_PER_BLOCK = 4  # (rows, dtype) preparations kept per block


@dataclass
class BlockWeights:
    """One block's sampling weights.

    `layers[i]` = (norm1 weight, bias, qkv (in, out), bias, proj (in, out), bias, norm2 weight,
    bias, fc1 (in, out), bias, fc2 (in, out), bias, norm1 eps, norm2 eps); `packed[i]` = the
    layer's (qkv, proj, fc1, fc2) in oneDNN's layout for `rows` rows, or `packed` is None.
    """

    layers: list[tuple]
    w_in: torch.Tensor
    b_in: torch.Tensor
    w_out: torch.Tensor
    b_out: torch.Tensor
    packed: list[tuple] | None


def block_weights(block: FlowBlock, rows: int, dtype: torch.dtype, device: torch.device | str,
                  packed: bool | None = None) -> BlockWeights:
    """The block's weights for `rows`-row products in `dtype` (cached on CPUs).

    `packed`: use oneDNN's packed layout for the per-token products (True / False), or decide by
    measurement (None; only float32 on CPUs can be packed)."""
    device = torch.device(device)
    if device.type != "cpu":
        return _prepare(block, rows, dtype, packed=False)
    key = (rows, dtype, packed)
    entries = _CACHE.setdefault(block, {})
    state = _state(block)
    hit = entries.get(key)
    if hit is not None and _same_state(hit[0], state):
        return hit[1]
    weights = _prepare(block, rows, dtype, packed=packed)
    entries.pop(key, None)
    entries[key] = (state, weights)
    while len(entries) > _CACHE_PER_BLOCK:
        entries.pop(next(iter(entries)))
    return weights


_CACHE: "weakref.WeakKeyDictionary[FlowBlock, dict]" = weakref.WeakKeyDictionary()


def _state(block: FlowBlock) -> list[tuple]:
    return [(weakref.ref(p), p._version) for p in block.parameters()]


def _same_state(old: list[tuple], new: list[tuple]) -> bool:
    return len(old) == len(new) and all(ref() is nref() and v == nv for (ref, v), (nref, nv) in zip(old, new))


def _prepare(block: FlowBlock, rows: int, dtype: torch.dtype, *, packed: bool | None) -> BlockWeights:
    cast = dtype if dtype in (torch.float16, torch.bfloat16) else None
    layers = [_layer_weights(layer, cast) for layer in block.attn_blocks]
    w_in, b_in = _in_out(block.proj_in, cast)
    w_out, b_out = _in_out(block.proj_out, cast)
    packs = None
    if packed is not False and dtype == torch.float32 and w_in.device.type == "cpu" and packing_available():
        packs = [_packed_layer(layer, rows) for layer in block.attn_blocks]
        if packed is None and not _packed_is_faster(layers, packs, rows):
            packs = None
    return BlockWeights(layers, w_in, b_in, w_out, b_out, packs)


def packing_available() -> bool:
    """Whether this PyTorch build has oneDNN's packed linear kernels."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """x @ W.T + bias with W in oneDNN's packed layout."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def packed_linear_add(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """other + x @ W.T + bias with W in oneDNN's packed layout (the residual add fused)."""
    return torch.ops.mkldnn._linear_pointwise.binary(x, other, packed, bias, "add")


def _packed_layer(layer, rows: int) -> tuple:
    att, mlp = layer.attention, layer.mlp
    return tuple(torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), rows)
                 for linear in (att.qkv, att.proj, mlp.main[0], mlp.main[2]))


_PACKED_FASTER: dict[tuple, bool] = {}


def _packed_is_faster(layers: list[tuple], packs: list[tuple], rows: int) -> bool:
    """Time the block's per-token products (every layer's qkv, proj, fc1, fc2 in order, so the
    weights stream through the caches as in sampling) both ways; once per shapes, rows, threads."""
    shapes = tuple(tuple(w.shape for w in (layer[2], layer[4], layer[8], layer[10])) for layer in layers)
    key = (shapes, rows, torch.get_num_threads())
    if key not in _PACKED_FASTER:
        inputs = {n: torch.randn(rows, n) for layer_shapes in shapes for n, _ in layer_shapes}

        def plain():
            for layer in layers:
                for w, b in ((layer[2], layer[3]), (layer[4], layer[5]), (layer[8], layer[9]), (layer[10], layer[11])):
                    torch.addmm(b, inputs[w.shape[0]], w)

        def oneDNN():
            for layer, pack in zip(layers, packs):
                for w, b, p in zip((layer[2], layer[4], layer[8], layer[10]), (layer[3], layer[5], layer[9], layer[11]),
                                   pack):
                    packed_linear(inputs[w.shape[0]], p, b)

        plain_s, packed_s = _interleaved_medians(plain, oneDNN)
        _PACKED_FASTER[key] = packed_s < PACKED_MIN_GAIN * plain_s
    return _PACKED_FASTER[key]


def _interleaved_medians(*fns, rounds: int = 7) -> list[float]:
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    for _ in range(rounds):
        for fn, seen in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            seen.append(time.perf_counter() - t0)
    return [sorted(seen)[len(seen) // 2] for seen in times]


def _layer_weights(layer, dtype: torch.dtype | None) -> tuple:
    att, mlp = layer.attention, layer.mlp
    return (att.norm.weight.detach(), att.norm.bias.detach(), *_in_out(att.qkv, dtype), *_in_out(att.proj, dtype),
            mlp.norm.weight.detach(), mlp.norm.bias.detach(), *_in_out(mlp.main[0], dtype),
            *_in_out(mlp.main[2], dtype), att.norm.eps, mlp.norm.eps)


def _in_out(linear: torch.nn.Linear, dtype: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor]:
    """A Linear's weight as an (in, out) matrix for `addmm`, and its bias, in the compute dtype.

    On CPUs the matrix is a contiguous copy: MKL's products with 16-32 rows run 10-40 % faster
    against it than against the transposed view (benchmarks/RESULTS.md). GPUs read the view.
    """
    weight, bias = linear.weight.detach(), linear.bias.detach()
    if dtype is not None:
        weight, bias = weight.to(dtype), bias.to(dtype)
    return (weight.t() if weight.is_cuda else weight.t().contiguous()), bias
