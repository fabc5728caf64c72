"""Noise -> data: token-by-token inversion with a key/value cache, guidance, and NaN redraws."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from .kv_cache import KVCache
from .likelihood import denoise
from .flow import at_least_f32
from .model import FlowBlock, TarFlow

SAMPLERS = ("sequential",)
GUIDE_WHAT = ("a", "b", "ab")


class SamplingError(RuntimeError):
    """Sampling could not produce finite images."""


def check_options(guidance: float, guide_what: str, attn_temp: float, sampler: str) -> None:
    if guidance < 0:
        raise ValueError(f"guidance must be >= 0 (got {guidance})")
    if guide_what not in GUIDE_WHAT:
        raise ValueError(f"guide_what must be one of {', '.join(GUIDE_WHAT)} (got {guide_what!r})")
    if not attn_temp > 0:
        raise ValueError(f"attention temperature must be > 0 (got {attn_temp})")
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)} (got {sampler!r})")


def _compute_dtype(device: torch.device, default: torch.dtype) -> torch.dtype:
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return default


def sample(
    model: TarFlow,
    noise: torch.Tensor,
    y: torch.Tensor | None = None,
    *,
    guidance: float = 0.0,
    guide_what: str = "ab",
    attn_temp: float = 1.0,
    annealed: bool = False,
    sampler: str = "sequential",
) -> torch.Tensor:
    """Invert the flow: prior noise (B, T, D) ~ N(0, 1) -> images (B, C, H, W) in [-1, 1] scale.

    The noise is scaled by the prior's standard deviation (sqrt(var)) first, then blocks
    N-1..0 are inverted token by token. With guidance w > 0 the conditional and unconditional
    passes run as one batch of 2B.
    """
    check_options(guidance, guide_what, attn_temp, sampler)
    cfg = model.config
    if noise.dim() != 3 or tuple(noise.shape[1:]) != (cfg.num_patches, cfg.token_dim):
        raise ValueError(f"noise must have shape (N, {cfg.num_patches}, {cfg.token_dim}), got {tuple(noise.shape)}")
    with torch.inference_mode():
        x = noise.to(model.var.device, model.var.dtype) * model.var.sqrt()
        for block in reversed(model.blocks):
            x = invert_block(block, x, y, guidance=guidance, guide_what=guide_what,
                             attn_temp=attn_temp, annealed=annealed)
        return model.unpatchify(x)


def invert_block(
    block: FlowBlock,
    x: torch.Tensor,
    y: torch.Tensor | None,
    *,
    guidance: float = 0.0,
    guide_what: str = "ab",
    attn_temp: float = 1.0,
    annealed: bool = False,
) -> torch.Tensor:
    """Invert one block for natural-order tokens x (B, T, D); token t+1 from tokens 0..t."""
    B, T, D = x.shape
    guided = guidance > 0
    xo = block.order(x).clone()
    cond = block.conditioning(y).expand(B, -1, -1)
    if guided:  # conditional rows 0..B-1, unconditional (mean class, attn_temp) rows B..2B-1
        cond = torch.stack([cond, block.conditioning(None).expand(B, -1, -1)])
    else:
        cond = cond.unsqueeze(0)
    cond = cond.contiguous()  # (passes, B, T, W)
    passes = cond.shape[0]
    rows = passes * B
    first = block.attn_blocks[0].attention
    heads, head_dim, width = first.num_heads, first.head_dim, cond.shape[-1]
    q_scale = None
    if guided and attn_temp != 1.0:
        q_scale = torch.tensor([1.0, 1.0 / attn_temp], device=x.device).repeat_interleave(B).view(rows, 1, 1, 1)
    dtype = _compute_dtype(x.device, x.dtype)
    cache = KVCache(len(block.attn_blocks), rows, heads, T, head_dim, dtype=dtype, device=x.device)
    layers = [_layer_weights(layer) for layer in block.attn_blocks]
    w_in, b_in = block.proj_in.weight, block.proj_in.bias
    w_out, b_out = block.proj_out.weight, block.proj_out.bias
    use_a = "a" in guide_what
    use_b = "b" in guide_what

    for t in range(T - 1):
        h = (F.linear(xo[:, t], w_in, b_in) + cond[:, :, t]).view(rows, width)
        for li, (n1, n1b, wqkv, bqkv, wp, bp, n2, n2b, w1, b1, w2, b2, eps1, eps2) in enumerate(layers):
            n = F.layer_norm(at_least_f32(h), (width,), n1, n1b, eps1).to(h.dtype)
            qkv = F.linear(n, wqkv, bqkv).view(rows, 3, heads, head_dim)
            cache.write(li, t, qkv[:, 1:])
            q = qkv[:, 0].unsqueeze(2)
            if q_scale is not None:
                q = q * q_scale
            o = F.scaled_dot_product_attention(q, cache.keys(li, t + 1), cache.values(li, t + 1))
            h = h + F.linear(o.view(rows, width), wp, bp)
            n = F.layer_norm(at_least_f32(h), (width,), n2, n2b, eps2).to(h.dtype)
            h = h + F.linear(F.gelu(F.linear(n, w1, b1)), w2, b2)
        out = at_least_f32(F.linear(h, w_out, b_out))
        if block.nvp:
            a, b = out[:, :D], out[:, D:]
        else:
            a, b = None, out
        if guided:
            w = guidance * (t + 1) / (T - 1) if annealed else guidance
            if a is not None and use_a:
                a = a[:B] + w * (a[:B] - a[B:])
            elif a is not None:
                a = a[:B]
            b = b[:B] + w * (b[:B] - b[B:]) if use_b else b[:B]
        nxt = xo[:, t + 1]
        xo[:, t + 1] = (nxt if a is None else nxt * a.exp()) + b
    return block.order(xo)


def _layer_weights(layer) -> tuple:
    att, mlp = layer.attention, layer.mlp
    return (att.norm.weight, att.norm.bias, att.qkv.weight, att.qkv.bias, att.proj.weight, att.proj.bias,
            mlp.norm.weight, mlp.norm.bias, mlp.main[0].weight, mlp.main[0].bias,
            mlp.main[2].weight, mlp.main[2].bias, att.norm.eps, mlp.norm.eps)


@dataclass
class SampleResult:
    images: torch.Tensor  # (N, C, H, W) model space, float32, on CPU
    labels: torch.Tensor | None  # (N,) int64 or None
    redrawn: int = 0  # samples that came out non-finite and were drawn again
    settings: dict = field(default_factory=dict)


def draw_noise(model: TarFlow, num: int, generator: torch.Generator) -> torch.Tensor:
    cfg = model.config
    return torch.randn(num, cfg.num_patches, cfg.token_dim, generator=generator)


def generate(
    model: TarFlow,
    num: int,
    *,
    generator: torch.Generator,
    batch_size: int = 64,
    labels: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    denoise_sigma: float | None = None,
    denoise_lr_scale: float = 1.0,
    max_redraws: int = 10,
    on_batch: Callable[[int, int], None] | None = None,
    **options,
) -> SampleResult:
    """Draw `num` images in batches: noise (given or from `generator`), labels (given, or uniform
    random classes for conditional models), sample, optional denoising step, and redraw of any
    sample that came out non-finite (with fresh noise; counted in `redrawn`)."""
    cfg = model.config
    device = model.var.device
    if noise is None:
        noise = draw_noise(model, num, generator)
    if labels is None and cfg.conditional:
        labels = torch.randint(cfg.num_classes, (num,), generator=generator)
    out = torch.empty(num, cfg.in_channels, cfg.img_size, cfg.img_size)
    redrawn = 0
    for start in range(0, num, batch_size):
        stop = min(num, start + batch_size)
        z = noise[start:stop].clone()
        yb = labels[start:stop].to(device) if labels is not None else None
        todo = torch.arange(stop - start)
        for attempt in range(max_redraws + 1):
            sub_y = yb[todo.to(device)] if yb is not None else None
            x = sample(model, z[todo].to(device), sub_y, **options)
            if denoise_sigma:
                x = denoise(model, x, sub_y, sigma=denoise_sigma, lr_scale=denoise_lr_scale)
            x = x.float().cpu()
            out[start + todo] = x
            bad = ~torch.isfinite(x.flatten(1)).all(dim=1)
            if not bad.any():
                break
            if attempt == max_redraws:
                raise SamplingError(f"{int(bad.sum())} samples were still non-finite after {max_redraws} redraws")
            todo = todo[bad]
            redrawn += len(todo)
            z[todo] = draw_noise(model, len(todo), generator)
        if on_batch is not None:
            on_batch(stop, num)
    return SampleResult(out, labels, redrawn)
