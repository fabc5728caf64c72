"""TarFlow (Zhai et al. 2025): a stack of transformer autoregressive affine flows over image patches.

Block i maps data tokens x (B, T, D) to noise z in its own token order (natural or reversed):

    z_t = (x_t - b_t) * exp(-a_t),   (a_t, b_t) = f(x_<t),   z_0 = x_0,   log|det dz/dx| = -sum_t a_t

where f is a causal transformer and (a_0, b_0) = 0. The last block's z is distributed as N(0, var). Sampling
inverts block N-1..0 token by token, x_{t+1} = z_{t+1} * exp(a_{t+1}) + b_{t+1}, with a key/value cache
(`FlowBlock.reverse`); `tarflow_core.sampling` runs the same maths through faster backends (`tarflow_core.fast`).

tarflow's two additions, both absent from published checkpoints: an optional learned map f of each pixel
value before the blocks (`marginal.py`, its log-slope joins the log-det), and the dequantizer q(u | x) that
training and scoring use (`dequant.py`; sampling never does).

Numerics: layer norms and exp always run in at least float32. Parameter names match the published code's
state dicts, so reference `.pth` files load as they are (minus the redundant `attn_mask` buffers).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import flow, inputs
from .config import ModelConfig
from .dequant import VariationalDequantizer, dequantizer_shapes
from .marginal import MarginalMap


def at_least_f32(x: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 -> float32; float32 and float64 unchanged (exp and norms never run in half precision)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def layer_norm_f32(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """LayerNorm computed in (at least) float32 whatever the autocast dtype, cast back to the input's dtype."""
    # a half-precision model's norm weights are cast too (float32 and float64 ones stay as they are)
    return F.layer_norm(
        at_least_f32(x), norm.normalized_shape, at_least_f32(norm.weight), at_least_f32(norm.bias), norm.eps
    ).to(x.dtype)


def affine_forward(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Data -> noise: z = (x - b) * exp(-a); log|det| = -sum(a)."""
    return (x - b) * (-at_least_f32(a)).exp().to(a.dtype)


def affine_inverse(z: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Noise -> data: x = z * exp(a) + b."""
    return z * at_least_f32(a).exp().to(a.dtype) + b


def guide(cond: torch.Tensor, uncond: torch.Tensor, weight) -> torch.Tensor:
    """Classifier-free guidance extrapolation: c + w * (c - u)."""
    return cond + weight * (cond - uncond)


class FlowOutput(NamedTuple):
    z: torch.Tensor  # (B, T, D) noise-side tokens
    logdet: torch.Tensor  # (B,) log|det dz/dx| in nats, at least float32


class FlowTrace(NamedTuple):
    z: torch.Tensor
    logdet: torch.Tensor
    outputs: list[torch.Tensor]  # every block's output, in forward order


class KVCache:
    """Keys and values of every layer of a block: `kv[layer, 0 (keys) | 1 (values), row, position, head, dim]`.

    Preallocated and written in place (no concatenation per token), and an explicit object handed to the
    step: nothing is stored on the modules, so several sampling runs can share a model, and an exception
    leaves no state behind. Position-major per row, so writing one token is one contiguous (heads * dim)
    run per row and kind; attention reads `keys(layer, stop)`, a (row, head, position, dim) view.
    """

    def __init__(self, layers: int, rows: int, heads: int, length: int, head_dim: int, *, dtype: torch.dtype, device):
        # zeros, not garbage: graph-captured steps read masked positions, and 0 * NaN is NaN
        self.kv = torch.zeros(layers, 2, rows, length, heads, head_dim, dtype=dtype, device=device)
        self.length = length

    def write(self, layer: int, t: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store position t's keys and values, each (row, head, dim)."""
        self.kv[layer, 0, :, t] = k
        self.kv[layer, 1, :, t] = v

    def keys(self, layer: int, stop: int) -> torch.Tensor:
        """Keys of positions < stop as (row, head, position, dim)."""
        return self.kv[layer, 0, :, :stop].transpose(1, 2)

    def values(self, layer: int, stop: int) -> torch.Tensor:
        """Values of positions < stop as (row, head, position, dim)."""
        return self.kv[layer, 1, :, :stop].transpose(1, 2)


class Attention(nn.Module):
    """Multi-head causal self-attention on LN(h): softmax(q k^T / sqrt(d)) v, heads concatenated, projected."""

    def __init__(self, width: int, head_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.num_heads = width // head_dim
        self.head_dim = head_dim

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """The whole sequence h (B, T, W), token t attending to tokens <= t (fused kernel, no materialised mask)."""
        B, T, W = h.shape
        qkv = self.qkv(layer_norm_f32(self.norm, h)).view(B, T, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(o.transpose(1, 2).reshape(B, T, W))

    def step(self, h: torch.Tensor, t: int, cache: KVCache, layer: int, temp: float = 1.0) -> torch.Tensor:
        """One token h (B, W) at position t: its key and value go into `cache`, which holds those of
        positions < t, and it attends to positions <= t with logits divided by the temperature `temp`."""
        B, W = h.shape
        q, k, v = self.qkv(layer_norm_f32(self.norm, h)).view(B, 3, self.num_heads, self.head_dim).unbind(1)
        cache.write(layer, t, k, v)
        q = (q / temp).unsqueeze(2)  # (B, heads, 1, dim)
        o = F.scaled_dot_product_attention(q, cache.keys(layer, t + 1), cache.values(layer, t + 1))
        return self.proj(o.reshape(B, W))


class MLP(nn.Module):
    """W2 GELU(W1 LN(h) + b1) + b2."""

    def __init__(self, width: int, expansion: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.main = nn.Sequential(nn.Linear(width, width * expansion), nn.GELU(), nn.Linear(width * expansion, width))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.main(layer_norm_f32(self.norm, h))


class Layer(nn.Module):
    """Pre-norm transformer layer: h + Attn(LN(h)), then h + MLP(LN(h))."""

    def __init__(self, width: int, head_dim: int, expansion: int):
        super().__init__()
        self.attention = Attention(width, head_dim)
        self.mlp = MLP(width, expansion)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = h + self.attention(h)
        return h + self.mlp(h)

    def step(self, h: torch.Tensor, t: int, cache: KVCache, layer: int, temp: float = 1.0) -> torch.Tensor:
        """The same layer for the one token at position t (B, W), earlier tokens read from `cache`."""
        h = h + self.attention.step(h, t, cache, layer, temp)
        return h + self.mlp(h)


def _small_normal(t: torch.Tensor) -> torch.Tensor:
    """N(0, 0.01^2) in place (the values of randn * 1e-2); nothing on the meta device, where a first
    random draw costs seconds and a model is built only to receive loaded weights."""
    return t if t.is_meta else t.normal_(0.0, 1e-2)


class FlowBlock(nn.Module):
    """One autoregressive affine flow over the token sequence, in natural or reversed order.

    h = proj_in(x) + pos_embed + class_embed[y], the `layers` causal layers, then proj_out(h_t) -> (a, b)_{t+1}."""

    checkpoint_layers = False  # training memory: each layer's activations recomputed in backward

    def __init__(self, cfg: ModelConfig, reverse_order: bool, layers: int):
        super().__init__()
        D, W, T = cfg.token_dim, cfg.width, cfg.num_patches
        self.reverse_order = reverse_order
        self.nvp = cfg.nvp
        self.token_dim = D
        self.proj_in = nn.Linear(D, W)
        self.pos_embed = nn.Parameter(_small_normal(torch.empty(T, W)))
        self.class_embed = nn.Parameter(_small_normal(torch.empty(cfg.num_classes, 1, W))) if cfg.num_classes else None
        self.attn_blocks = nn.ModuleList(Layer(W, cfg.head_dim, cfg.expansion) for _ in range(layers))
        self.proj_out = nn.Linear(W, 2 * D if cfg.nvp else D)
        nn.init.zeros_(self.proj_out.weight)

    def order(self, tokens: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """Natural order -> this block's order (its own inverse)."""
        return tokens.flip(dim) if self.reverse_order else tokens

    def class_vector(self, y: torch.Tensor | None) -> torch.Tensor | None:
        """(B, 1, W) class embedding; label -1 or no label gives the mean embedding."""
        if self.class_embed is None:
            return None
        mean = self.class_embed.mean(dim=0)
        if y is None:
            return mean.unsqueeze(0)
        y = y.long()  # uint8 labels would index as a boolean mask, int16 ones not at all
        emb = self.class_embed[y.clamp(min=0)]
        return torch.where((y < 0).view(-1, 1, 1), mean.unsqueeze(0), emb)

    def conditioning(self, y: torch.Tensor | None) -> torch.Tensor:
        """pos_embed (in this block's order) plus the class vector: (1 or B, T, W)."""
        c = self.order(self.pos_embed, dim=0).unsqueeze(0)
        cls = self.class_vector(y)
        return c if cls is None else c + cls

    def split(self, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Head output -> (log-scale a, shift b); VP blocks (nvp False) have a = 0."""
        if self.nvp:
            a, b = out.chunk(2, dim=-1)
            return a, b
        return torch.zeros_like(out), out

    def params(self, x_ordered: torch.Tensor, y: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(a, b) for every token of a sequence already in this block's order; token t sees tokens < t."""
        h = self.proj_in(x_ordered) + self.conditioning(y)
        recompute = self.checkpoint_layers and torch.is_grad_enabled()
        for layer in self.attn_blocks:
            h = checkpoint(layer, h, use_reentrant=False) if recompute else layer(h)
        # the last token's head output would be shifted out of the sequence: project tokens 0..T-2 only,
        # then shift right by one token (token 0 gets zeros: its transform is the identity)
        return self.split(F.pad(self.proj_out(h[:, :-1]), (0, 0, 1, 0)))

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> FlowOutput:
        """Data -> noise for natural-order tokens (B, T, D): z = (x - b) exp(-a), log|det| = -sum(a) per sample."""
        xo = self.order(x)
        a, b = self.params(xo, y)
        z = affine_forward(xo, a, b)
        return FlowOutput(self.order(z), -at_least_f32(a).sum(dim=(1, 2)))

    def reverse_step(
        self, x_t: torch.Tensor, t: int, cond: torch.Tensor, cache: KVCache, attn_temp: float = 1.0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(a, b) of position t+1, each (B, D), from token t (B, D) of this block's order, the tokens
        before it read from `cache`; `cond` (B, T, W) as `conditioning`."""
        h = self.proj_in(x_t) + cond[:, t]
        for i, layer in enumerate(self.attn_blocks):
            h = layer.step(h, t, cache, i, attn_temp)
        return self.split(self.proj_out(h))

    def reverse(
        self,
        z: torch.Tensor,
        y: torch.Tensor | None = None,
        *,
        guidance: float = 0.0,
        guide_what: str = "ab",
        attn_temp: float = 1.0,
        annealed: bool = False,
    ) -> torch.Tensor:
        """Noise -> data for natural-order tokens (B, T, D), one token at a time in this block's order:
        x_0 = z_0, x_{t+1} = z_{t+1} * exp(a_{t+1}) + b_{t+1} with (a, b)_{t+1} = f(x_0..x_t).

        Classifier-free guidance (w = `guidance` > 0): a second, unconditional pass (mean class
        embedding, attention logits divided by `attn_temp`) gives (a_u, b_u), and those of a, b named
        in `guide_what` become c + w (c - u); `annealed`: w (t + 1) / (T - 1) at step t."""
        x = self.order(z).clone()
        B, T, _ = x.shape
        guided = guidance > 0
        cond, cache = self.conditioning(y).expand(B, -1, -1), self.new_cache(B, T, x)
        if guided:  # the unconditional pass: no label (the mean class embedding), a cache of its own
            uncond, uncond_cache = self.conditioning(None).expand(B, -1, -1), self.new_cache(B, T, x)
        for t in range(T - 1):
            a, b = self.reverse_step(x[:, t], t, cond, cache)
            if guided:
                a_u, b_u = self.reverse_step(x[:, t], t, uncond, uncond_cache, attn_temp)
                w = guidance * (t + 1) / (T - 1) if annealed else guidance
                a = guide(a, a_u, w) if "a" in guide_what else a
                b = guide(b, b_u, w) if "b" in guide_what else b
            x[:, t + 1] = affine_inverse(x[:, t + 1], a, b)
        return self.order(x)

    def new_cache(self, rows: int, length: int, like: torch.Tensor) -> KVCache:
        """An empty key/value cache for `rows` sequences of `length` tokens, in `like`'s dtype and device."""
        first = self.attn_blocks[0].attention
        heads, dim = first.num_heads, first.head_dim
        return KVCache(len(self.attn_blocks), rows, heads, length, dim, dtype=like.dtype, device=like.device)


class TarFlow(nn.Module):
    """Transformer autoregressive flow: blocks 0..N-1 map data tokens to prior noise N(0, var)."""

    var: torch.Tensor
    checkpointing = "off"  # activation checkpointing: "off", "blocks" or "layers" (`set_checkpointing`)

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        # block i has cfg.layers(i) layers: the same in every block, or deep-shallow (most of them in the
        # last block, the one nearest the noise, which models the prior's dependencies; STARFlow)
        self.blocks = nn.ModuleList(
            FlowBlock(cfg, reverse_order=bool(i % 2), layers=cfg.layers(i)) for i in range(cfg.num_blocks)
        )
        self.register_buffer("var", torch.ones(cfg.num_patches, cfg.token_dim))
        # f, a learned monotone map of each pixel value before the blocks (the identity when absent)
        self.marginal = MarginalMap(cfg.in_channels, cfg.marginal_bins) if cfg.marginal_bins else None
        # q(u | x) of variational dequantization: trained and scored with the flow, unused by sampling
        self.dequantizer = None
        if cfg.dequant == "variational":
            self.dequantizer = VariationalDequantizer(cfg.in_channels, cfg.dequant_width, cfg.dequant_layers)

    def set_checkpointing(self, mode: str) -> None:
        """Keep only each block's (or layer's) input for backward and recompute the rest there: less
        memory for the same gradients. Applies while gradients are recorded."""
        self.checkpointing = mode
        for block in self.blocks:
            block.checkpoint_layers = mode == "layers"

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        return flow.patchify(x, self.config.patch_size)

    def unpatchify(self, tokens: torch.Tensor) -> torch.Tensor:
        c = self.config
        return flow.unpatchify(tokens, c.in_channels, c.img_size, c.patch_size)

    def to_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Images -> the blocks' input tokens: patchify(f(x)), and log|det df/dx| (None without f)."""
        if self.marginal is None:
            return self.patchify(x), None
        x, logdet = self.marginal(x)
        return self.patchify(x), logdet

    def to_images(self, tokens: torch.Tensor) -> torch.Tensor:
        """The blocks' output tokens -> images: f^-1(unpatchify(tokens)), the inverse of `to_tokens`."""
        x = self.unpatchify(tokens)
        return x if self.marginal is None else self.marginal.inverse(x)

    @property
    def proj_dtype(self) -> torch.dtype:
        """The dtype of the weights (inputs are cast to it; autocast still decides the products')."""
        return self.blocks[0].proj_in.weight.dtype if len(self.blocks) else self.var.dtype

    def forward_tokens(self, tokens: torch.Tensor, y: torch.Tensor | None = None) -> FlowTrace:
        """Tokens -> (z, total logdet (B,), output of each block); inputs as checked by `forward`."""
        logdet = at_least_f32(tokens.new_zeros(tokens.shape[0]))
        outputs = []
        recompute = self.checkpointing == "blocks" and torch.is_grad_enabled()
        for block in self.blocks:
            tokens, ld = checkpoint(block, tokens, y, use_reentrant=False) if recompute else block(tokens, y)
            logdet = logdet + ld
            outputs.append(tokens)
        return FlowTrace(tokens, logdet, outputs)

    def forward(self, x, y=None) -> FlowOutput:
        """Images (B, C, H, W) in [-1, 1] scale -> (z (B, T, D), log|det dz/dx| (B,) in nats).

        `y`: labels as in `inputs.labels` (a tensor, list, array or one int for the whole batch);
        their range is checked in eval mode only (a host read the training step does without)."""
        x = inputs.images(self, x)
        y = inputs.labels(self, y, x.shape[0], check=not self.training)
        tokens, map_logdet = self.to_tokens(x)
        z, logdet, _ = self.forward_tokens(tokens, y)
        return FlowOutput(z, logdet if map_logdet is None else logdet + map_logdet)

    def log_prob(self, x, y=None) -> torch.Tensor:
        """log p(x) = log N(z; 0, var) + log|det dz/dx| in nats per sample (labels range-checked in every mode)."""
        x = inputs.images(self, x)
        tokens, map_logdet = self.to_tokens(x)
        z, logdet, _ = self.forward_tokens(tokens, inputs.labels(self, y, x.shape[0]))
        logdet = logdet if map_logdet is None else logdet + map_logdet
        return flow.gaussian_log_prob(at_least_f32(z), self.var) + logdet

    @torch.no_grad()
    def reverse(
        self, noise, y=None, *, guidance: float = 0.0, guide_what: str = "ab", attn_temp: float = 1.0, annealed=False
    ) -> torch.Tensor:
        """Prior noise (B, T, D) ~ N(0, 1) -> images (B, C, H, W): z = sqrt(var) * noise, then blocks
        N-1..0 reversed (`FlowBlock.reverse`). The plain-PyTorch statement of what `sample` computes."""
        options = inputs.SamplingOptions(
            guidance=guidance, guide_what=guide_what, attn_temp=attn_temp, annealed=annealed
        )
        noise = inputs.noise(self, noise)
        y = inputs.labels(self, y, noise.shape[0])
        x = noise.to(self.var.device, self.var.dtype) * self.var.sqrt()
        for block in reversed(self.blocks):
            x = block.reverse(x, y, **options.guide)
        return self.to_images(x)

    def sample(self, noise: torch.Tensor, y=None, **options) -> torch.Tensor:
        """Prior noise (B, T, D) -> images (B, C, H, W) by the fast backends (`tarflow_core.sampling.sample`)."""
        from .sampling import sample

        return sample(self, noise, y, **options)

    @torch.no_grad()
    def update_prior(
        self,
        z: torch.Tensor,
        rate: float = 0.1,
        *,
        reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
        gate: torch.Tensor | None = None,
    ) -> None:
        """VP models: move `var` towards the batch's mean z^2 per token and dimension (the reference's EMA).

        `reduce` (e.g. an all-reduce mean over ranks) is applied to the batch mean first; `gate`
        (0-dim bool tensor) leaves `var` unchanged where false, without a host sync."""
        ms = z.detach().to(self.var.dtype).pow(2).mean(dim=0)
        if reduce is not None:
            ms = reduce(ms)
        if gate is None:
            self.var.lerp_(ms, rate)
        else:
            self.var.copy_(torch.where(gate, self.var.lerp(ms, rate), self.var))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def build_model(cfg: ModelConfig) -> TarFlow:
    return TarFlow(cfg)


def state_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The shape of every entry of `TarFlow(cfg).state_dict()`, without building the model (reading
    a checkpoint's description stays instant, and the meta device's first use costs seconds)."""
    T, D, W, E, K = cfg.num_patches, cfg.token_dim, cfg.width, cfg.expansion * cfg.width, cfg.num_classes
    out = 2 * D if cfg.nvp else D
    layer = {
        "attention.norm.weight": (W,),
        "attention.norm.bias": (W,),
        "attention.qkv.weight": (3 * W, W),
        "attention.qkv.bias": (3 * W,),
        "attention.proj.weight": (W, W),
        "attention.proj.bias": (W,),
        "mlp.norm.weight": (W,),
        "mlp.norm.bias": (W,),
        "mlp.main.0.weight": (E, W),
        "mlp.main.0.bias": (E,),
        "mlp.main.2.weight": (W, E),
        "mlp.main.2.bias": (W,),
    }
    shapes: dict[str, tuple[int, ...]] = {}
    for i in range(cfg.num_blocks):
        b = f"blocks.{i}."
        shapes.update({b + "proj_in.weight": (W, D), b + "proj_in.bias": (W,), b + "pos_embed": (T, W)})
        if K:
            shapes[b + "class_embed"] = (K, 1, W)
        for j in range(cfg.layers(i)):
            shapes.update({f"{b}attn_blocks.{j}.{name}": shape for name, shape in layer.items()})
        shapes.update({b + "proj_out.weight": (out, W), b + "proj_out.bias": (out,)})
    shapes["var"] = (T, D)
    if cfg.marginal_bins:
        shapes["marginal.theta"] = (cfg.in_channels, cfg.marginal_bins)
    if cfg.dequant == "variational":
        shapes.update(dequantizer_shapes(cfg.in_channels, cfg.dequant_width, cfg.dequant_layers))
    return shapes
