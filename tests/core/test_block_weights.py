"""Sampling weights: oneDNN's packed layout gives the plain products' images, preparation is
cached only while the parameters are unchanged, and the layout is chosen by measurement."""

from __future__ import annotations

import copy

import pytest
import torch

from tarflow_core.fast import weights as bw
from tarflow_core.fast.inversion import invert_sequential, invert_sequential_static
from tarflow_core.fast.runner import BlockRunner
from tarflow_core.model import TarFlow
from tarflow_core.sampling import sample
from tests.conftest import tiny_config, tiny_model
from tests.core.test_flow_exact import GUIDED, IDS, MODES
from tests.core.test_parallel_sampling import GUIDE_IDS, _noise

onednn = pytest.mark.skipif(not bw.can_pack(torch.float32, "cpu"), reason="this PyTorch build has no oneDNN")


def _invert(block, noise, y, packed, static=False, **opts):
    runner = BlockRunner(block, noise.shape[0], y, device=noise.device, dtype=noise.dtype, packed=packed, **opts)
    xo = block.order(noise).clone()
    with torch.inference_mode():
        if static:
            invert_sequential_static(runner, xo, graphed=False)
        else:
            invert_sequential(runner, xo)
    return runner, xo


@onednn
@pytest.mark.parametrize("mode", MODES, ids=IDS)
@pytest.mark.parametrize("opts", GUIDED, ids=GUIDE_IDS)
def test_packed_products_give_the_plain_products_result(mode, opts):
    model = tiny_model(dtype=torch.float32, var=True, img_size=8, **mode)
    noise, y = _noise(model, dtype=torch.float32)
    for block in model.blocks:
        runner, packed = _invert(block, noise, y, True, **opts)
        assert runner.packed is not None
        runner, plain = _invert(block, noise, y, False, **opts)
        assert runner.packed is None
        assert (packed - plain).abs().max() <= 1e-5
        assert not torch.equal(plain, block.order(noise))


@onednn
def test_fixed_shape_step_with_packed_products():
    model = tiny_model(dtype=torch.float32, var=True, img_size=8, num_classes=3)
    noise, y = _noise(model, dtype=torch.float32)
    block = model.blocks[0]
    _, plain = _invert(block, noise, y, False, guidance=2.0)
    _, fixed = _invert(block, noise, y, True, static=True, guidance=2.0)
    assert (fixed - plain).abs().max() <= 1e-5


def test_float64_and_half_precision_are_never_packed():
    model = tiny_model(img_size=8)
    block = model.blocks[0]
    assert bw.block_weights(block, torch.float64, "cpu", packed_rows=3).packed is None
    assert bw.block_weights(block, torch.bfloat16, "cpu", packed_rows=3).packed is None
    noise, y = _noise(model)
    assert BlockRunner(block, 3, y, device=noise.device, dtype=noise.dtype, packed=True).packed is None


def test_prepared_weights_are_reused_until_a_parameter_changes():
    model = tiny_model(dtype=torch.float32, img_size=8)
    block = model.blocks[0]
    first = bw.block_weights(block, torch.float32, "cpu")
    assert bw.block_weights(block, torch.float32, "cpu") is first
    with torch.no_grad():
        block.attn_blocks[0].mlp.main[0].weight.add_(0.01)  # an in-place update, as optimizers do
    second = bw.block_weights(block, torch.float32, "cpu")
    assert second is not first
    assert torch.equal(second.layers[0][8], block.attn_blocks[0].mlp.main[0].weight.detach().t())
    if bw.can_pack(torch.float32, "cpu"):
        packed = bw.block_weights(block, torch.float32, "cpu", packed_rows=3)
        assert packed.layers is second.layers  # the plain weights are shared, not prepared twice
        assert bw.block_weights(block, torch.float32, "cpu", packed_rows=3).packed is packed.packed


@pytest.mark.parametrize("change", ["optimizer", "load_state_dict", "new_parameter"])
def test_sampling_after_the_weights_change_uses_the_new_weights(change):
    model = tiny_model(dtype=torch.float32, img_size=8, num_classes=3)
    noise, y = _noise(model, dtype=torch.float32)
    before = sample(model, noise, y, guidance=1.0)
    other = tiny_model(seed=3, dtype=torch.float32, img_size=8, num_classes=3)
    if change == "optimizer":
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        model.train()
        loss = sum((p * p).sum() for p in model.parameters())
        loss.backward()
        optimizer.step()
        model.eval()
        other = copy.deepcopy(model)
    elif change == "load_state_dict":
        model.load_state_dict(other.state_dict())
    else:
        linear = model.blocks[-1].attn_blocks[0].attention.qkv
        linear.weight = torch.nn.Parameter(other.blocks[-1].attn_blocks[0].attention.qkv.weight.detach().clone())
        other = copy.deepcopy(model)
    after = sample(model, noise, y, guidance=1.0)
    fresh = sample(other, noise, y, guidance=1.0)  # a model never sampled before: nothing cached
    assert not torch.allclose(after, before)
    assert torch.equal(after, fresh)


def test_the_layout_follows_the_width_and_row_count():
    """Fixed rule (no run-time timing, so every run gives the same images): packed from width ~190
    and two rows up."""
    narrow = tiny_model(dtype=torch.float32, img_size=8)  # width 16
    torch.manual_seed(0)
    wide = TarFlow(tiny_config(img_size=8, width=256, head_dim=64, num_blocks=1)).eval()  # default init
    with torch.no_grad():
        wide.blocks[0].proj_out.weight.normal_(0.0, 0.02)  # not the identity
    assert not bw.prefers_packed(narrow.blocks[0], 32)
    assert bw.prefers_packed(wide.blocks[0], 2) and bw.prefers_packed(wide.blocks[0], 128)
    assert not bw.prefers_packed(wide.blocks[0], 1)
    noise, _ = _noise(wide, n=2, dtype=torch.float32)
    with torch.inference_mode():
        first = sample(wide, noise)
        again = sample(copy.deepcopy(wide), noise)  # nothing cached for the copy
    assert torch.isfinite(first).all()
    assert torch.equal(first, again)
    runner = BlockRunner(wide.blocks[0], 2, None, device=noise.device, dtype=noise.dtype)
    assert (runner.packed is not None) == bw.can_pack(torch.float32, "cpu")
    assert BlockRunner(narrow.blocks[0], 2, None, device=noise.device, dtype=noise.dtype).packed is None


def test_without_onednn_the_plain_products_are_used(monkeypatch):
    monkeypatch.setattr(bw, "can_pack", lambda dtype, device: False)
    model = tiny_model(dtype=torch.float32, img_size=8)
    assert bw.block_weights(model.blocks[0], torch.float32, "cpu", packed_rows=3).packed is None
    noise, y = _noise(model, dtype=torch.float32)
    assert BlockRunner(model.blocks[0], 3, y, device=noise.device, dtype=noise.dtype, packed=True).packed is None


def test_a_build_that_cannot_pack_falls_back_to_the_plain_products(monkeypatch):
    if not bw.can_pack(torch.float32, "cpu"):
        pytest.skip("this PyTorch build has no oneDNN")

    def refuse(weight, rows):
        raise RuntimeError("not supported on this backend")

    monkeypatch.setattr(torch.ops.mkldnn, "_reorder_linear_weight", refuse)
    model = tiny_model(dtype=torch.float32, img_size=8)
    noise, y = _noise(model, dtype=torch.float32)
    runner = BlockRunner(model.blocks[0], 3, y, device=noise.device, dtype=noise.dtype, packed=True)
    assert runner.packed is None


def test_oneDNN_switched_off_by_the_user_is_respected(monkeypatch):
    model = tiny_model(dtype=torch.float32, img_size=8)
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)
    assert not bw.can_pack(torch.float32, "cpu")
    assert bw.block_weights(model.blocks[0], torch.float32, "cpu", packed_rows=3).packed is None
