"""A flow block run as plain tensor functions over a window of tokens, with a key/value cache.

The maths of `FlowBlock.reverse_step` (one token) and `FlowBlock.params` (a window), laid out for
sampling's few-row products: 2-D activations, `addmm` against prepared (in, out) weights, in-place
residuals. Both inversion methods use it: the sequential sampler feeds one token at a time, the
Jacobi samplers feed whole segments. With guidance the conditional and the unconditional pass (mean
class embedding, attention logits divided by `attn_temp`) run as one batch of 2B rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..model import FlowBlock, KVCache, at_least_f32, guide
from .weights import PackedLayer, block_weights, can_pack, packed_linear, packed_linear_add, prefers_packed


def compute_dtype(device: torch.device, default: torch.dtype) -> torch.dtype:
    """The dtype of the transformer's products: autocast's when it is on, else `default`."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return default


class BlockRunner:
    """One block's inverse machinery for a batch: weights, conditioning, guidance and the cache.

    `packed`: run the single-token step's products on oneDNN's packed weights (True), on the
    plain ones (False), or as `prefers_packed` decides for the block and row count (None; CPU
    float32 only, see `weights`). The packed weights are prepared when the step first
    needs them, so a runner that only runs Jacobi passes (`params`) never packs.
    """

    def __init__(
        self,
        block: FlowBlock,
        batch: int,
        y: torch.Tensor | None,
        *,
        guidance: float = 0.0,
        guide_what: str = "ab",
        attn_temp: float = 1.0,
        annealed: bool = False,
        device: torch.device,
        dtype: torch.dtype,
        packed: bool | None = None,
    ):
        B = batch
        self.block = block
        self.guided = guidance > 0
        cond = block.conditioning(y).expand(B, -1, -1)
        if self.guided:  # rows 0..B-1 conditional, rows B..2B-1 unconditional
            cond = torch.stack([cond, block.conditioning(None).expand(B, -1, -1)])
        else:
            cond = cond.unsqueeze(0)
        self.half = dtype in (torch.float16, torch.bfloat16)
        cond = cond.detach().to(dtype if self.half else cond.dtype)
        self.cond_at = cond.permute(2, 0, 1, 3).contiguous()  # (T, passes, B, W): one position at a time
        self.passes = cond.shape[0]
        self.rows = self.passes * B
        T, W = cond.shape[2], cond.shape[3]
        self.length, self.width = T, W
        first = block.attn_blocks[0].attention
        self.heads, self.head_dim = first.num_heads, first.head_dim
        self.q_scale = None
        if self.guided and attn_temp != 1.0:
            scale = torch.tensor([1.0, 1.0 / attn_temp], device=device, dtype=dtype).repeat_interleave(B)
            self.q_scale = scale.view(self.rows, 1, 1, 1)
        self.cache = KVCache(
            len(block.attn_blocks), self.rows, self.heads, T, self.head_dim, dtype=dtype, device=device
        )
        self.dtype, self.device, self._use_packed, self._packed = dtype, device, packed, _NOT_YET
        weights = block_weights(block, dtype, device)
        self.layers = weights.layers
        self.w_in, self.b_in, self.w_out, self.b_out = weights.w_in, weights.b_in, weights.w_out, weights.b_out
        self.token_dim = block.token_dim
        # the single-token step's intermediate products, reused for every token
        self._qkv = torch.empty(self.rows, 3 * W, dtype=self.w_in.dtype, device=device)
        hidden = block.attn_blocks[0].mlp.main[0].out_features
        self._hidden = torch.empty(self.rows, hidden, dtype=self.w_in.dtype, device=device)
        self._positions = torch.arange(T, device=device)
        self.guidance, self.annealed = guidance, annealed
        self.use_a, self.use_b = "a" in guide_what, "b" in guide_what
        # guiding every output is linear in the head's input: guide h, then one head product for B
        # rows (not in half precision, where the outputs are guided after rounding to float32)
        self.guide_hidden = self.guided and not self.half and self.use_b and (self.use_a or not block.nvp)

    @property
    def packed(self) -> list[PackedLayer] | None:
        """Every layer's step products in oneDNN's layout, or None for the plain products."""
        if self._packed is _NOT_YET:
            use = prefers_packed(self.block, self.rows) if self._use_packed is None else self._use_packed
            use = use and can_pack(self.dtype, self.device)
            self._packed = (
                block_weights(self.block, self.dtype, self.device, packed_rows=self.rows).packed if use else None
            )
        return self._packed

    def step(
        self, x: torch.Tensor, t: int | torch.Tensor, span: int | None = None
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """One token: input at position t (B, D) -> guided (a, b) for position t + 1, each (B, D).

        The sequential sampler's inner loop, so it is written for few rows: 2-D activations,
        in-place residual products and activation, one copy into the cache per layer.

        `t` is a Python int, or a one-element device tensor for CUDA-graph capture: then every
        shape is fixed, attention reads the first `span` cached positions and masks those after t.
        """
        rows, W, H, d = self.rows, self.width, self.heads, self.head_dim
        static = isinstance(t, torch.Tensor)
        x = x.to(self.w_in.dtype) if self.half else x
        cond = self.cond_at.index_select(0, t)[0] if static else self.cond_at[t]
        h = (torch.addmm(self.b_in, x, self.w_in) + cond).view(rows, W)
        stop = span if static else t + 1
        mask = (self._positions[:span] <= t).view(1, 1, 1, span) if static else None
        cache, packs = self.cache, self.packed
        for li, w in enumerate(self.layers):
            packed = packs[li] if packs is not None else None
            if packed is None:
                qkv = torch.addmm(w.qkv_b, self._norm(h, w.norm1_w, w.norm1_b, w.norm1_eps), w.qkv_w, out=self._qkv)
            else:
                qkv = packed_linear(self._norm(h, w.norm1_w, w.norm1_b, w.norm1_eps), packed.qkv, w.qkv_b)
            new_kv = qkv[:, W:].view(rows, 2, H, d).transpose(0, 1)
            if static:
                cache.kv[li].index_copy_(2, t, new_kv.unsqueeze(2))
            else:
                cache.kv[li, :, :, t].copy_(new_kv)
            q = qkv[:, :W].view(rows, H, 1, d)
            if self.q_scale is not None:
                q = q * self.q_scale
            o = F.scaled_dot_product_attention(q, cache.keys(li, stop), cache.values(li, stop), attn_mask=mask)
            if packed is None:
                h.addmm_(o.view(rows, W), w.proj_w).add_(w.proj_b)
                normed = self._norm(h, w.norm2_w, w.norm2_b, w.norm2_eps)
                f = _gelu_(torch.addmm(w.fc1_b, normed, w.fc1_w, out=self._hidden))
                h.addmm_(f, w.fc2_w).add_(w.fc2_b)
            else:
                h = packed_linear_add(o.view(rows, W), packed.proj, w.proj_b, h)
                f = packed_linear(self._norm(h, w.norm2_w, w.norm2_b, w.norm2_eps), packed.fc1, w.fc1_b, gelu=True)
                h = packed_linear_add(f, packed.fc2, w.fc2_b, h)
        return self._head(h, t)

    def _head(self, h: torch.Tensor, t: int | torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(rows, W) final hidden state of one position -> guided (a, b), each (B, D)."""
        B = self.rows // self.passes
        if self.guide_hidden:
            cond, uncond = h.view(2, B, self.width)
            h = guide(cond, uncond, self._weights(t, 1, h))
            return self._split(torch.addmm(self.b_out, h, self.w_out))
        return self._guide(torch.addmm(self.b_out, h, self.w_out).view(self.passes, B, -1), t, 1)

    def _norm(self, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
        """Layer norm, computed in float32 for half-precision activations."""
        if self.half:
            return F.layer_norm(h.float(), (self.width,), weight, bias, eps).to(h.dtype)
        return F.layer_norm(h, (self.width,), weight, bias, eps)

    def params(self, x: torch.Tensor, start: int) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Inputs at positions start..start+L-1 (B, L, D) -> guided (a, b) for positions start+1..start+L.

        Writes the window's keys/values into the cache; attends to cached positions < start and
        causally within the window. `a` is None for shift-only (VP) blocks.

        Activations are kept as 2-D (rows * L, W) matrices and every projection is one `addmm`
        against a (in, out) weight, the fastest layout for the few-row products of sampling.
        """
        B, L, D = x.shape
        rows, W, H, d = self.rows, self.width, self.heads, self.head_dim
        stop = start + L
        x = x.to(self.w_in.dtype) if self.half else x
        cond = self.cond_at[start:stop].permute(1, 2, 0, 3)  # (passes, B, L, W)
        h = torch.addmm(self.b_in, x.reshape(B * L, D), self.w_in).view(1, B, L, W) + cond
        h = h.reshape(rows * L, W)  # the sum takes cond's permuted layout when B is 1
        mask = None
        if L > 1:
            mask = torch.ones(L, stop, dtype=torch.bool, device=x.device).tril(diagonal=start)
        cache = self.cache
        for li, w in enumerate(self.layers):
            qkv = torch.addmm(w.qkv_b, self._norm(h, w.norm1_w, w.norm1_b, w.norm1_eps), w.qkv_w).view(rows, L, 3, H, d)
            cache.kv[li, :, :, start:stop].copy_(qkv[:, :, 1:].permute(2, 0, 1, 3, 4))
            q = qkv[:, :, 0].transpose(1, 2)
            if self.q_scale is not None:
                q = q * self.q_scale
            o = F.scaled_dot_product_attention(q, cache.keys(li, stop), cache.values(li, stop), attn_mask=mask)
            h = h + torch.addmm(w.proj_b, o.transpose(1, 2).reshape(rows * L, W), w.proj_w)
            normed = self._norm(h, w.norm2_w, w.norm2_b, w.norm2_eps)
            h = h + torch.addmm(w.fc2_b, F.gelu(torch.addmm(w.fc1_b, normed, w.fc1_w)), w.fc2_w)
        return self._guide(torch.addmm(self.b_out, h, self.w_out).view(self.passes, B, L, -1), start, L)

    def _guide(self, out: torch.Tensor, start: int, L: int) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(passes, B, ..., 2D or D) head outputs -> (a, b) with guidance applied, at least float32."""
        a, b = self._split(out)
        if not self.guided:
            return (None if a is None else a[0]), b[0]
        w = self._weights(start, L, out)
        if a is not None:
            a = guide(a[0], a[1], w) if self.use_a else a[0]
        b = guide(b[0], b[1], w) if self.use_b else b[0]
        return a, b

    def _split(self, out: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Head outputs (..., 2D or D) -> (a, b), at least float32; `a` is None for shift-only blocks."""
        out = at_least_f32(out)
        D = self.token_dim
        return (out[..., :D], out[..., D:]) if self.block.nvp else (None, out)

    def _weights(self, start: int | torch.Tensor, L: int, like: torch.Tensor):
        """Guidance weight for output positions start+1..start+L (annealed: w * p / (T - 1));
        `start` may be a one-element tensor when L is 1."""
        if not self.annealed:
            return self.guidance
        if isinstance(start, torch.Tensor):
            return (start + 1).to(like.dtype) / (self.length - 1) * self.guidance
        if L == 1:
            return (start + 1) / (self.length - 1) * self.guidance
        p = torch.arange(start + 1, start + L + 1, device=like.device, dtype=like.dtype)
        return (p / (self.length - 1) * self.guidance).view(1, L, 1)


_NOT_YET = object()  # the packed weights before the first single-token step


def _gelu_(x: torch.Tensor) -> torch.Tensor:
    """Exact (erf) GELU in place."""
    return torch._C._nn.gelu_(x)
