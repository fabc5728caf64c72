"""Activation checkpointing (--checkpointing blocks|layers): the same gradients as without it (float64,
bf16 autocast, torch.compile), less memory saved for backward, and nothing changed when off."""

from __future__ import annotations

import pytest
import torch

from tarflow_core.config import ModelConfig
from tarflow_core.model import TarFlow
from tarflow_core.train.step import objective

CFG = ModelConfig(in_channels=1, img_size=8, patch_size=2, width=32, head_dim=16, num_blocks=3, layers_per_block=2,
                  num_classes=10)  # fmt: skip


def _grads(mode: str, dtype=torch.float64, *, bf16: bool = False, compile_backend: str | None = None, cfg=CFG):
    """(gradients, bytes saved for backward) of one loss on a fixed batch, checkpointing `mode`."""
    torch.manual_seed(0)
    model = TarFlow(cfg).to(dtype)
    with torch.no_grad():
        for p in model.parameters():  # off the zero-initialised output heads: every path carries gradient
            p.add_(0.02 * torch.randn_like(p))
    model.set_checkpointing(mode)
    x = 0.5 * torch.randn(6, 1, 8, 8, dtype=dtype, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2, -1, 4, 5]) if cfg.num_classes else None
    forward = torch.compile(model, backend=compile_backend) if compile_backend else model
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            z, logdet = forward(x, y)
        loss = objective(z, logdet, cfg.data_dim)
    loss.backward()
    return [p.grad for p in model.parameters()], sum(saved)


def _worst(a, b) -> float:
    return max((u - v).abs().max().item() for u, v in zip(a, b))


@pytest.mark.parametrize("mode", ["blocks", "layers"])
def test_checkpointing_gives_the_same_gradients_with_less_saved(mode):
    off, saved_off = _grads("off")
    on, saved_on = _grads(mode)
    assert _worst(off, on) <= 1e-12
    assert saved_on < saved_off / 2, (saved_on, saved_off)


@pytest.mark.parametrize("mode", ["blocks", "layers"])
def test_checkpointing_under_bf16_autocast(mode):
    off, _ = _grads("off", torch.float32, bf16=True)
    on, _ = _grads(mode, torch.float32, bf16=True)
    assert _worst(off, on) <= 1e-6  # the recomputed forward runs under the same autocast


def test_checkpointing_with_torch_compile():
    small = ModelConfig(
        in_channels=1, img_size=8, patch_size=2, width=16, head_dim=16, num_blocks=2, layers_per_block=1
    )
    off, _ = _grads("off", torch.float32, cfg=small)
    for mode in ("blocks", "layers"):  # the graph dynamo and AOT autograd trace (no C++ build in a test)
        on, _ = _grads(mode, torch.float32, compile_backend="aot_eager", cfg=small)
        assert _worst(off, on) <= 1e-6, mode


def test_checkpointing_is_off_by_default_and_idle_without_gradients():
    model = TarFlow(CFG)
    assert model.checkpointing == "off" and not any(b.checkpoint_layers for b in model.blocks)
    model.set_checkpointing("layers")
    assert all(b.checkpoint_layers for b in model.blocks)
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():  # evaluation and sampling: nothing to recompute, the plain forward
        z, logdet = model(x, 3)
    model.set_checkpointing("off")
    with torch.no_grad():
        z0, logdet0 = model(x, 3)
    assert torch.equal(z, z0) and torch.equal(logdet, logdet0)
