"""The TarFlow network: causal transformer flow blocks over image patches.

Parameter names match the published TarFlow code's state dicts, so reference `.pth` files load
as they are (minus the redundant `attn_mask` buffers).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import flow
from .config import ModelConfig
from .flow import at_least_f32


def layer_norm_f32(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """LayerNorm computed in (at least) float32 whatever the autocast dtype, cast back to the input's dtype."""
    # a half-precision model's norm weights are cast too (float32 and float64 ones stay as they are)
    return F.layer_norm(
        at_least_f32(x), norm.normalized_shape, at_least_f32(norm.weight), at_least_f32(norm.bias), norm.eps
    ).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, width: int, head_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.num_heads = width // head_dim
        self.head_dim = head_dim

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Causal self-attention over the whole sequence (fused kernel, no materialised mask)."""
        B, T, W = h.shape
        qkv = self.qkv(layer_norm_f32(self.norm, h)).view(B, T, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(o.transpose(1, 2).reshape(B, T, W))


class MLP(nn.Module):
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


def _small_normal(t: torch.Tensor) -> torch.Tensor:
    """N(0, 0.01^2) in place (the values of randn * 1e-2); nothing on the meta device, where a first
    random draw costs seconds and a model is built only to receive loaded weights."""
    return t if t.is_meta else t.normal_(0.0, 1e-2)


class FlowBlock(nn.Module):
    """One autoregressive affine flow over the token sequence, in natural or reversed order."""

    def __init__(self, cfg: ModelConfig, reverse_order: bool):
        super().__init__()
        D, W, T = cfg.token_dim, cfg.width, cfg.num_patches
        self.reverse_order = reverse_order
        self.nvp = cfg.nvp
        self.token_dim = D
        self.proj_in = nn.Linear(D, W)
        self.pos_embed = nn.Parameter(_small_normal(torch.empty(T, W)))
        self.class_embed = nn.Parameter(_small_normal(torch.empty(cfg.num_classes, 1, W))) if cfg.num_classes else None
        self.attn_blocks = nn.ModuleList(Layer(W, cfg.head_dim, cfg.expansion) for _ in range(cfg.layers_per_block))
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
        """Head output -> (log-scale a, shift b); VP blocks have a = 0."""
        if self.nvp:
            a, b = out.chunk(2, dim=-1)
            return a, b
        return torch.zeros_like(out), out

    def params(self, x_ordered: torch.Tensor, y: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(a, b) for every token of a sequence already in this block's order; token t sees tokens < t."""
        h = self.proj_in(x_ordered) + self.conditioning(y)
        for layer in self.attn_blocks:
            h = layer(h)
        # the last token's head output would be shifted out of the sequence: project tokens 0..T-2 only
        return self.split(flow.prepend_zero_token(self.proj_out(h[:, :-1])))

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Data -> noise for natural-order tokens (B, T, D): returns (z, total log|det|) per sample."""
        xo = self.order(x)
        a, b = self.params(xo, y)
        z = flow.affine_forward(xo, a, b)
        return self.order(z), -at_least_f32(a).sum(dim=(1, 2))


class TarFlow(nn.Module):
    """Transformer autoregressive flow: blocks 0..N-1 map data tokens to prior noise N(0, var)."""

    var: torch.Tensor

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.blocks = nn.ModuleList(FlowBlock(cfg, reverse_order=bool(i % 2)) for i in range(cfg.num_blocks))
        self.register_buffer("var", torch.ones(cfg.num_patches, cfg.token_dim))

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        return flow.patchify(x, self.config.patch_size)

    def unpatchify(self, tokens: torch.Tensor) -> torch.Tensor:
        c = self.config
        return flow.unpatchify(tokens, c.in_channels, c.img_size, c.patch_size)

    def forward_tokens(
        self, tokens: torch.Tensor, y: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """Tokens -> (z, total logdet (B,), output of each block)."""
        logdet = at_least_f32(tokens.new_zeros(tokens.shape[0]))
        outputs = []
        for block in self.blocks:
            tokens, ld = block(tokens, y)
            logdet = logdet + ld
            outputs.append(tokens)
        return tokens, logdet, outputs

    def forward(self, x: torch.Tensor, y=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (B, C, H, W) in [-1, 1] scale -> (z (B, T, D), log|det dz/dx| (B,) in nats).

        `y`: labels as in `labels` (a tensor, list, array or one int for the whole batch); their
        range is checked in eval mode only (a host read the training step does without)."""
        x = self.images(x)
        y = self.labels(y, x.shape[0], check=not self.training)
        z, logdet, _ = self.forward_tokens(self.patchify(x), y)
        return z, logdet

    def images(self, x) -> torch.Tensor:
        """Check model-space images `x` against the architecture: (B, C, H, W) floating point; moved
        to the model's device and dtype (as sampling does with its noise)."""
        c = self.config
        if not isinstance(x, torch.Tensor):
            raise TypeError(
                f"x must be a tensor of images (B, {c.in_channels}, {c.img_size}, {c.img_size}), got {type(x).__name__}"
            )
        if not x.dtype.is_floating_point:
            raise TypeError(
                f"x must be floating-point images in [-1, 1] scale, got {x.dtype} "
                "(8-bit images: tarflow_core.flow.uint8_to_model)"
            )
        if x.dim() != 4 or tuple(x.shape[1:]) != (c.in_channels, c.img_size, c.img_size):
            raise ValueError(
                f"x must have shape (B, {c.in_channels}, {c.img_size}, {c.img_size}), got {tuple(x.shape)}"
            )
        return x.to(self.var.device, self.proj_dtype)

    @property
    def proj_dtype(self) -> torch.dtype:
        """The dtype of the weights (inputs are cast to it; autocast still decides the products')."""
        return self.blocks[0].proj_in.weight.dtype if len(self.blocks) else self.var.dtype

    def sample(self, noise: torch.Tensor, y=None, **options) -> torch.Tensor:
        """Prior noise (B, T, D) -> images (B, C, H, W); options as `tarflow_core.sampling.sample`."""
        from .sampling import sample

        return sample(self, noise, y, **options)

    def labels(self, y, batch: int, *, check: bool = True) -> torch.Tensor | None:
        """Labels for a batch of `batch` images as a (batch,) int64 tensor on the model's device, or
        None (no labels, or an unconditional model, which ignores them).

        `y`: None, one int (the whole batch), or a tensor, list or array of integers, one per image;
        -1 is the dropped label (the mean class embedding). `check`: also refuse values outside
        -1..K-1 (one host read)."""
        if y is None or self.config.num_classes == 0:
            return None
        if not isinstance(y, torch.Tensor):
            try:
                y = torch.as_tensor(y)
            except (TypeError, ValueError, RuntimeError) as e:
                raise TypeError(
                    f"labels y must be integers (a tensor, list, array or int), got {type(y).__name__} ({e})"
                ) from None
        if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
            raise TypeError(f"labels y must be integers, got {y.dtype}")
        if y.dim() == 0:
            y = y.expand(batch)
        elif y.dim() != 1 or y.shape[0] != batch:
            raise ValueError(
                f"labels y must be one label per image, shape ({batch},), or a single int; got shape {tuple(y.shape)}"
            )
        y = y.to(self.var.device, torch.long)
        if check:
            self.check_labels(y)
        return y

    def check_labels(self, y: torch.Tensor | None) -> None:
        """Refuse labels outside -1..K-1 (-1: no class, the mean embedding) on a conditional model
        (one host read; the training step does not call it). Unconditional models ignore labels."""
        K = self.config.num_classes
        if y is None or K == 0 or y.numel() == 0:
            return
        if y.dtype.is_floating_point or y.dtype == torch.bool:
            raise TypeError(f"labels y must be integers, got {y.dtype}")
        lo, hi = int(y.min()), int(y.max())
        if lo < -1 or hi >= K:
            raise ValueError(f"labels must be in -1..{K - 1} (-1: no class), got values from {lo} to {hi}")

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
    shapes: dict[str, tuple[int, ...]] = {}
    for i in range(cfg.num_blocks):
        b = f"blocks.{i}."
        shapes.update({b + "proj_in.weight": (W, D), b + "proj_in.bias": (W,), b + "pos_embed": (T, W)})
        if K:
            shapes[b + "class_embed"] = (K, 1, W)
        for j in range(cfg.layers_per_block):
            a, m = f"{b}attn_blocks.{j}.attention.", f"{b}attn_blocks.{j}.mlp."
            shapes.update(
                {
                    a + "norm.weight": (W,),
                    a + "norm.bias": (W,),
                    a + "qkv.weight": (3 * W, W),
                    a + "qkv.bias": (3 * W,),
                    a + "proj.weight": (W, W),
                    a + "proj.bias": (W,),
                    m + "norm.weight": (W,),
                    m + "norm.bias": (W,),
                    m + "main.0.weight": (E, W),
                    m + "main.0.bias": (E,),
                    m + "main.2.weight": (W, E),
                    m + "main.2.bias": (W,),
                }
            )
        shapes.update({b + "proj_out.weight": (out, W), b + "proj_out.bias": (out,)})
    shapes["var"] = (T, D)
    return shapes
