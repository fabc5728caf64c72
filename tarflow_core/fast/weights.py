"""A flow block's weights laid out for sampling's few-row matrix products, prepared once per model state.

Sampling multiplies a handful of rows (the batch, twice with guidance) by every weight matrix of
a block once per token, so the layout of the weights decides its speed on CPUs:

* `addmm` (MKL) against (in, out) contiguous copies: 10-40 % faster than against the transposed
  view at 16-32 rows when the weights stay in cache;
* oneDNN's packed layout through `torch.ops.mkldnn._linear_pointwise`: about 45 us more per call,
  but its kernels stream weights that do not fit in cache far better (the 256-wide benchmark
  model's block is 6.3 MB of weights, and its keys/values push the step past an 8 MB L3).

Which one wins depends on the width and the row count (`prefers_packed`). The rule is fixed,
not timed at run time, so that the same seed gives the same images in every run: the two
layouts round differently (images differ by ~1e-5, enough to move some 8-bit pixels).

Prepared weights are cached per block and reused while its parameters are the same tensors at
the same version and storage (optimizer steps, EMA updates and `load_state_dict` bump the
version; `vector_to_parameters` and `p.data = t` change the storage; in-place writes through
`p.data` are the one change not seen), so a CLI run drawing many batches prepares them once. Only CPU preparations are
cached (on GPUs the weights are views, or casts, cheap there), and not for parameters created
under `torch.inference_mode`, which have no version counter.
"""

from __future__ import annotations

import dataclasses
import platform
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch

from ..model import FlowBlock, at_least_f32

_ENTRIES_PER_BLOCK = 6  # cached preparations per block (dtypes, packed row counts)


class LayerWeights(NamedTuple):
    """One transformer layer's weights for sampling: matrices as (in, out) for `addmm`, in the compute
    dtype; norm weights at least float32 (norms run in float32 for half-precision activations)."""

    norm1_w: torch.Tensor
    norm1_b: torch.Tensor
    qkv_w: torch.Tensor
    qkv_b: torch.Tensor
    proj_w: torch.Tensor
    proj_b: torch.Tensor
    norm2_w: torch.Tensor
    norm2_b: torch.Tensor
    fc1_w: torch.Tensor
    fc1_b: torch.Tensor
    fc2_w: torch.Tensor
    fc2_b: torch.Tensor
    norm1_eps: float
    norm2_eps: float


class PackedLayer(NamedTuple):
    """A layer's four per-token product weights in oneDNN's packed layout."""

    qkv: torch.Tensor
    proj: torch.Tensor
    fc1: torch.Tensor
    fc2: torch.Tensor


@dataclass
class BlockWeights:
    """One block's sampling weights: every layer's, proj_in and proj_out as (in, out) matrices and
    biases, and `packed`, every layer's products in oneDNN's layout (or None)."""

    layers: list[LayerWeights]
    w_in: torch.Tensor
    b_in: torch.Tensor
    w_out: torch.Tensor
    b_out: torch.Tensor
    packed: list[PackedLayer] | None = None


class _ParamState(NamedTuple):
    """What identifies a parameter's current values without reading them."""

    ref: weakref.ref
    version: int
    data_ptr: int
    dtype: torch.dtype
    shape: torch.Size

    def same(self, other: _ParamState) -> bool:
        return self.ref() is other.ref() and self[1:] == other[1:]


class _Entry(NamedTuple):
    state: list[_ParamState]  # of the block's parameters when `value` was prepared
    value: object


def block_weights(
    block: FlowBlock, dtype: torch.dtype, device: torch.device | str, packed_rows: int | None = None
) -> BlockWeights:
    """The block's weights for products in `dtype`, with the per-token products also in oneDNN's
    layout (packed for `packed_rows` rows) when `packed_rows` is given and they can be packed."""
    if torch.device(device).type != "cpu":
        return _prepare(block, dtype)
    plain = _cached(block, dtype, lambda: _prepare(block, dtype))
    if packed_rows is None or not can_pack(dtype, device) or block.proj_in.weight.dtype != dtype:
        return plain
    packs = _cached(block, ("packed", packed_rows), lambda: _packed_layers(block, packed_rows))
    return plain if packs is None else dataclasses.replace(plain, packed=packs)


# Measured on the 2-core AMD EPYC (Zen 1, AVX2, 8 MB L3), packed / plain seconds of the
# single-token step at the middle position, medians of 7 alternating runs:
#   width 128 (4 layers):  16-128 rows 1.05-1.18
#   width 192:             4-128 rows 0.92-0.97;  1 row 1.57
#   width 256 (1-2 layers): 4-8 rows 0.70-0.82, 16-32 rows 0.87-0.91, 128 rows 0.94-0.97;  1 row 1.33-1.36
#   width 384-768:         4-32 rows 0.50-0.80, 128 rows 0.85-0.90;  1 row 0.94-1.18
PACKED_MIN_MATRIX = 100_000  # mean in * out of a layer's four products (width >= ~190)
PACKED_MIN_ROWS = 2  # a single row is a matrix-vector product, MKL's is faster


def prefers_packed(block: FlowBlock, rows: int) -> bool:
    """Whether the single-token step of `block` at `rows` rows should use oneDNN's packed layout."""
    linears = _step_linears(block.attn_blocks[0])
    mean_matrix = sum(lin.in_features * lin.out_features for lin in linears) / len(linears)
    return rows >= PACKED_MIN_ROWS and mean_matrix >= PACKED_MIN_MATRIX


def can_pack(dtype: torch.dtype, device: torch.device | str) -> bool:
    """Whether products in `dtype` on `device` can use oneDNN's packed layout here: float32 on an
    x86-64 CPU (where it was measured), with oneDNN built in and not switched off by the user."""
    return (
        dtype == torch.float32
        and torch.device(device).type == "cpu"
        and _X86_64
        and torch.backends.mkldnn.is_available()
        and torch.backends.mkldnn.enabled
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


_X86_64 = platform.machine().lower() in ("x86_64", "amd64")


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor, gelu: bool = False) -> torch.Tensor:
    """x @ W.T + bias with W in oneDNN's packed layout; `gelu`: followed by the exact (erf) GELU,
    fused into the product (the same oneDNN GELU that `F.gelu` runs on float32 CPU tensors)."""
    if gelu:
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "gelu", [], "none")
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def packed_linear_add(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """other + x @ W.T + bias with W in oneDNN's packed layout (the residual add fused)."""
    return torch.ops.mkldnn._linear_pointwise.binary(x, other, packed, bias, "add")


_CACHE: weakref.WeakKeyDictionary[FlowBlock, dict] = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()  # training previews sample from a thread of their own


def _cached(block: FlowBlock, key, make: Callable):
    params = list(block.parameters())
    if any(p.is_inference() for p in params):  # made under inference_mode: no version counter to watch
        return make()
    # the storage address too: `vector_to_parameters` and `p.data = ...` swap a parameter's
    # tensor without bumping its version
    state = [_ParamState(weakref.ref(p), p._version, p.data_ptr(), p.dtype, p.shape) for p in params]
    with _LOCK:
        entries = _CACHE.setdefault(block, {})
        hit = entries.pop(key, None)
        if hit is None or not _same_state(hit.state, state):
            hit = _Entry(state, make())
        entries[key] = hit  # most recently used last
        while len(entries) > _ENTRIES_PER_BLOCK:
            entries.pop(next(iter(entries)))
        return hit.value


def _same_state(old: list[_ParamState], new: list[_ParamState]) -> bool:
    return len(old) == len(new) and all(o.same(n) for o, n in zip(old, new))


def _prepare(block: FlowBlock, dtype: torch.dtype) -> BlockWeights:
    cast = dtype if dtype in (torch.float16, torch.bfloat16) else None
    layers = [_layer_weights(layer, cast) for layer in block.attn_blocks]
    return BlockWeights(layers, *_in_out(block.proj_in, cast), *_in_out(block.proj_out, cast))


def _packed_layers(block: FlowBlock, rows: int) -> list[PackedLayer] | None:
    """Every layer's (qkv, proj, fc1, fc2) weights in oneDNN's layout, or None where this build
    cannot pack them (the plain products are used then)."""
    try:
        return [
            PackedLayer(
                *(
                    torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), rows)
                    for linear in _step_linears(layer)
                )
            )
            for layer in block.attn_blocks
        ]
    except (RuntimeError, NotImplementedError):
        return None


def _step_linears(layer) -> tuple[torch.nn.Linear, ...]:
    """A layer's four per-token products, in order: qkv, proj, fc1, fc2."""
    return layer.attention.qkv, layer.attention.proj, layer.mlp.main[0], layer.mlp.main[2]


def _layer_weights(layer, dtype: torch.dtype | None) -> LayerWeights:
    att, mlp = layer.attention, layer.mlp
    (qkv_w, qkv_b), (proj_w, proj_b) = _in_out(att.qkv, dtype), _in_out(att.proj, dtype)
    (fc1_w, fc1_b), (fc2_w, fc2_b) = _in_out(mlp.main[0], dtype), _in_out(mlp.main[2], dtype)
    # norms run in float32 for half-precision activations: a half-precision model's norm weights too
    return LayerWeights(
        norm1_w=at_least_f32(att.norm.weight.detach()),
        norm1_b=at_least_f32(att.norm.bias.detach()),
        qkv_w=qkv_w,
        qkv_b=qkv_b,
        proj_w=proj_w,
        proj_b=proj_b,
        norm2_w=at_least_f32(mlp.norm.weight.detach()),
        norm2_b=at_least_f32(mlp.norm.bias.detach()),
        fc1_w=fc1_w,
        fc1_b=fc1_b,
        fc2_w=fc2_w,
        fc2_b=fc2_b,
        norm1_eps=att.norm.eps,
        norm2_eps=mlp.norm.eps,
    )


def _in_out(linear: torch.nn.Linear, dtype: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor]:
    """A Linear's weight as an (in, out) matrix for `addmm`, and its bias, in the compute dtype.

    On CPUs the matrix is a contiguous copy: MKL's products with 16-32 rows run 10-40 % faster
    against it than against the transposed view (benchmarks/RESULTS.md). GPUs read the view.
    """
    weight, bias = linear.weight.detach(), linear.bias.detach()
    if dtype is not None:
        weight, bias = weight.to(dtype), bias.to(dtype)
    return (weight.t() if weight.is_cuda else weight.t().contiguous()), bias
