"""A flow block run as plain tensor functions over a window of tokens, with a key/value cache.

Both inversion methods use it: the sequential sampler feeds one token at a time, the Jacobi
samplers feed whole segments. With guidance the conditional and the unconditional pass (mean
class embedding, attention logits divided by `attn_temp`) run as one batch of 2B rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .flow import at_least_f32
from .kv_cache import KVCache
from .model import FlowBlock


class BlockRunner:
    def __init__(self, block: FlowBlock, batch: int, y: torch.Tensor | None, *, guidance: float = 0.0,
                 guide_what: str = "ab", attn_temp: float = 1.0, annealed: bool = False,
                 device: torch.device, dtype: torch.dtype):
        B = batch
        self.block = block
        self.batch = B
        self.guided = guidance > 0
        cond = block.conditioning(y).expand(B, -1, -1)
        if self.guided:  # rows 0..B-1 conditional, rows B..2B-1 unconditional
            cond = torch.stack([cond, block.conditioning(None).expand(B, -1, -1)])
        else:
            cond = cond.unsqueeze(0)
        self.cond = cond.to(dtype if dtype in (torch.float16, torch.bfloat16) else cond.dtype).contiguous()
        self.passes = self.cond.shape[0]
        self.rows = self.passes * B
        T, W = self.cond.shape[2], self.cond.shape[3]
        self.length, self.width = T, W
        first = block.attn_blocks[0].attention
        self.heads, self.head_dim = first.num_heads, first.head_dim
        self.q_scale = None
        if self.guided and attn_temp != 1.0:
            scale = torch.tensor([1.0, 1.0 / attn_temp], device=device).repeat_interleave(B)
            self.q_scale = scale.view(self.rows, 1, 1, 1)
        self.cache = KVCache(len(block.attn_blocks), self.rows, self.heads, T, self.head_dim, dtype=dtype, device=device)
        self.layers = [_layer_weights(layer) for layer in block.attn_blocks]
        self.w_in, self.b_in = block.proj_in.weight, block.proj_in.bias
        self.w_out, self.b_out = block.proj_out.weight, block.proj_out.bias
        self.token_dim = block.token_dim
        self.guidance, self.annealed = guidance, annealed
        self.use_a, self.use_b = "a" in guide_what, "b" in guide_what

    def params(self, x: torch.Tensor, start: int) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Inputs at positions start..start+L-1 (B, L, D) -> guided (a, b) for positions start+1..start+L.

        Writes the window's keys/values into the cache; attends to cached positions < start and
        causally within the window. `a` is None for shift-only (VP) blocks.
        """
        B, L, _ = x.shape
        rows, W, H, d = self.rows, self.width, self.heads, self.head_dim
        stop = start + L
        h = (F.linear(x, self.w_in, self.b_in) + self.cond[:, :, start:stop]).view(rows, L, W)
        mask = None
        if L > 1:
            mask = torch.ones(L, stop, dtype=torch.bool, device=x.device).tril(diagonal=start)
        kv = self.cache.kv
        for li, (n1, n1b, wqkv, bqkv, wp, bp, n2, n2b, w1, b1, w2, b2, eps1, eps2) in enumerate(self.layers):
            n = F.layer_norm(at_least_f32(h), (W,), n1, n1b, eps1).to(h.dtype)
            qkv = F.linear(n, wqkv, bqkv).view(rows, L, 3, H, d)
            kv[li, :, :, :, start:stop].copy_(qkv[:, :, 1:].permute(2, 0, 3, 1, 4))
            q = qkv[:, :, 0].transpose(1, 2)
            if self.q_scale is not None:
                q = q * self.q_scale
            o = F.scaled_dot_product_attention(q, kv[li, 0, :, :, :stop], kv[li, 1, :, :, :stop], attn_mask=mask)
            h = h + F.linear(o.transpose(1, 2).reshape(rows, L, W), wp, bp)
            n = F.layer_norm(at_least_f32(h), (W,), n2, n2b, eps2).to(h.dtype)
            h = h + F.linear(F.gelu(F.linear(n, w1, b1)), w2, b2)
        out = at_least_f32(F.linear(h, self.w_out, self.b_out))
        D = self.token_dim
        a, b = (out[..., :D], out[..., D:]) if self.block.nvp else (None, out)
        if not self.guided:
            return a, b
        w = self._weights(start, L, out)
        if a is not None:
            a = a[:B] + w * (a[:B] - a[B:]) if self.use_a else a[:B]
        b = b[:B] + w * (b[:B] - b[B:]) if self.use_b else b[:B]
        return a, b

    def _weights(self, start: int, L: int, like: torch.Tensor):
        """Guidance weight for output positions start+1..start+L (annealed: w * p / (T - 1))."""
        if not self.annealed:
            return self.guidance
        if L == 1:
            return (start + 1) / (self.length - 1) * self.guidance
        p = torch.arange(start + 1, start + L + 1, device=like.device, dtype=like.dtype)
        return (p / (self.length - 1) * self.guidance).view(1, L, 1)


def _layer_weights(layer) -> tuple:
    att, mlp = layer.attention, layer.mlp
    return (att.norm.weight, att.norm.bias, att.qkv.weight, att.qkv.bias, att.proj.weight, att.proj.bias,
            mlp.norm.weight, mlp.norm.bias, mlp.main[0].weight, mlp.main[0].bias,
            mlp.main[2].weight, mlp.main[2].bias, att.norm.eps, mlp.norm.eps)
