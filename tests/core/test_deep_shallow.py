"""Deep-shallow allocation (`ModelConfig.block_layers`): blocks of unequal depth are exact flows, every
sampler and backend inverts them as `TarFlow.reverse` does, and the config, the memory plan, native
checkpoints and training all count and keep each block's layers."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from tarflow_core import memory as M
from tarflow_core.checkpoint import load_checkpoint, read_info, save_checkpoint
from tarflow_core.config import ModelConfig
from tarflow_core.fast.inversion import invert_sequential
from tarflow_core.fast.runner import BlockRunner
from tarflow_core.fast.weights import can_pack
from tarflow_core.model import TarFlow, state_shapes
from tarflow_core.sampling import DEFAULT_TOL, InversionStats, sample
from tarflow_core.train import load_run_config
from tarflow_core.train.step import objective
from tests.conftest import tiny_config, tiny_model
from tests.core.graph_emulator import emulate_cuda_graphs
from tests.core.test_flow_exact import IDS, MODES
from tests.core.test_memory import saved_bytes
from tests.core.test_readable_reverse import _agrees_with_every_sampler
from tests.core.test_train import assert_resume_is_exact, assert_same_weights

DEPTHS = [(1, 1, 3), (3, 1, 1)]  # deep at the noise end (STARFlow's allocation), and at the data end
DTYPES = {"f32": torch.float32, "f64": torch.float64}
GUIDES = [{}, dict(guidance=1.5, annealed=True, attn_temp=0.8), dict(guidance=0.7, guide_what="b")]


def deep_shallow(depths=(1, 1, 3), dtype=torch.float64, **mode) -> TarFlow:
    """A tiny model (16 tokens, random weights, learned prior variance) with blocks of `depths` layers;
    its heads' weights halved, or a stack of random blocks can overflow when sampled."""
    model = tiny_model(var=True, img_size=8, num_blocks=len(depths), block_layers=depths, dtype=dtype, **mode)
    with torch.no_grad():
        for block in model.blocks:
            block.proj_out.weight.mul_(0.5)
            block.proj_out.bias.mul_(0.5)
    return model


def _data(model: TarFlow, n: int = 3, seed: int = 1):
    g, c = torch.Generator().manual_seed(seed), model.config
    x = torch.randn(n, c.in_channels, c.img_size, c.img_size, generator=g, dtype=torch.float64)
    y = torch.randint(c.num_classes, (n,), generator=g) if c.num_classes else None
    return x.to(model.var.dtype), y


def _noise(model: TarFlow, n: int = 3, seed: int = 2) -> torch.Tensor:
    c = model.config
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c.num_patches, c.token_dim, generator=g, dtype=torch.float64).to(model.var.dtype)


# ------------------------------------------------------------------------------ the architecture


@pytest.mark.parametrize("depths", DEPTHS)
def test_each_block_has_its_layers_and_the_config_counts_them(depths):
    model = deep_shallow(depths, num_classes=3)
    cfg = model.config
    assert [len(b.attn_blocks) for b in model.blocks] == [cfg.layers(i) for i in range(3)] == list(depths)
    assert cfg.num_parameters() == model.num_parameters() == sum(p.numel() for p in model.parameters())
    assert state_shapes(cfg) == {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert cfg.short_name() == "2-16-3-" + "+".join(map(str, depths))
    # FLOPs: the blocks' own projections once per block, each layer once
    per_layer = tiny_config(img_size=8, num_blocks=1, layers_per_block=2).flops_per_image()
    per_layer -= tiny_config(img_size=8, num_blocks=1, layers_per_block=1).flops_per_image()
    shallow = tiny_config(img_size=8, num_blocks=3, layers_per_block=1).flops_per_image()
    assert cfg.flops_per_image() == pytest.approx(shallow + (sum(depths) - 3) * per_layer, rel=1e-12)


def test_equal_counts_are_the_uniform_model():
    even, uniform = tiny_config(num_blocks=3, block_layers=(2, 2, 2)), tiny_config(num_blocks=3, layers_per_block=2)
    assert even.short_name() == uniform.short_name() == "2-16-3-2"
    assert (even.num_parameters(), even.flops_per_image()) == (uniform.num_parameters(), uniform.flops_per_image())
    assert state_shapes(even) == state_shapes(uniform)
    torch.manual_seed(0)
    a = TarFlow(even).state_dict()
    torch.manual_seed(0)
    assert_same_weights(a, TarFlow(uniform).state_dict())  # the same initialisation, draw for draw
    with pytest.raises(ValueError, match="block_layers must give a positive layer count for each of the 3 blocks"):
        tiny_config(num_blocks=3, block_layers=(1, 2))


# ------------------------------------------------------------------------------ exact flows


@pytest.mark.parametrize("tag", ["f32", "f64"])
@pytest.mark.parametrize("mode", MODES, ids=IDS)
@pytest.mark.parametrize("depths", DEPTHS)
def test_reverse_inverts_forward(depths, mode, tag):
    model = deep_shallow(depths, DTYPES[tag], **mode)
    x, y = _data(model)
    with torch.no_grad():
        back = model.reverse(model(x, y).z / model.var.sqrt(), y)
    assert (back - x).abs().max() < {"f32": 1e-5, "f64": 1e-12}[tag]


@pytest.mark.parametrize("mode", MODES, ids=IDS)
@pytest.mark.parametrize("depths", DEPTHS)
def test_logdet_matches_autograd_jacobian(depths, mode):
    model = deep_shallow(depths, **mode)
    x, y = _data(model, n=1)
    _, logdet = model(x, y)
    jac = torch.autograd.functional.jacobian(lambda v: model(v.view_as(x), y)[0].flatten(), x.flatten())
    sign, logabsdet = torch.linalg.slogdet(jac)
    assert sign != 0 and torch.allclose(logdet[0], logabsdet, atol=1e-9)


@pytest.mark.parametrize("mode", MODES[::3], ids=IDS[::3])
def test_checkpointing_gives_the_same_gradients(mode):
    model = deep_shallow((1, 3), **mode)
    x, y = _data(model)
    grads = {}
    for how in ("off", "blocks", "layers"):
        model.set_checkpointing(how)
        model.zero_grad(set_to_none=True)
        z, logdet = model(x, y)
        objective(z, logdet, model.config.data_dim).backward()
        grads[how] = [p.grad.clone() for p in model.parameters()]
    for how in ("blocks", "layers"):
        assert all(torch.allclose(a, b, atol=1e-12, rtol=0) for a, b in zip(grads["off"], grads[how])), how


# ------------------------------------------------------------------------------ every sampler


@pytest.mark.parametrize("tag", ["f32", "f64"])
@pytest.mark.parametrize("opts", GUIDES, ids=["plain", "guided", "guided-b"])
@pytest.mark.parametrize("depths", DEPTHS)
def test_every_sampler_equals_reverse(depths, opts, tag):
    model = deep_shallow(depths, DTYPES[tag], num_classes=3)
    noise, y = _noise(model), torch.tensor([0, 2, -1])
    readable = _agrees_with_every_sampler(model, noise, y, opts, tag)
    stats = InversionStats()
    calibrated = sample(model, noise, y, sampler="gs-jacobi", stats=stats, **opts)  # segments chosen per block
    assert len(stats.segments) == 3 and (calibrated - readable).abs().max() <= DEFAULT_TOL


@pytest.mark.parametrize("depths", DEPTHS)
def test_packed_weights_invert_every_block_as_the_plain_ones(depths):
    """The single-token step on oneDNN's packed layout (where this build has it), block by block."""
    model = deep_shallow(depths, torch.float32, num_classes=3)
    noise, y = _noise(model), torch.tensor([0, 1, 2])
    with torch.inference_mode():
        for block in model.blocks:
            out = {}
            for packed in (False, True):
                xo = block.order(noise).clone()
                runner = BlockRunner(block, 3, y, guidance=1.0, device=noise.device, dtype=noise.dtype, packed=packed)
                invert_sequential(runner, xo)
                out[packed] = xo
                assert (runner.packed is not None) == (packed and can_pack(torch.float32, "cpu"))
            assert (out[True] - out[False]).abs().max() < 1e-5


def test_the_cuda_sampling_flow_under_emulated_graphs(monkeypatch):
    """sample() as on CUDA (graphs, calibration timed through them), capture/replay emulated on the CPU."""
    from tarflow_core import sampling

    graphs = emulate_cuda_graphs(monkeypatch)
    monkeypatch.setattr(sampling, "use_graphs", lambda device, requested: requested is not False)
    monkeypatch.setattr(sampling, "graph_pool", lambda graphed: None)
    model = deep_shallow((1, 1, 3), num_classes=3)
    noise, y = _noise(model), torch.tensor([0, 1, 2])
    opts = dict(guidance=1.5, annealed=True, attn_temp=0.8)
    readable = model.reverse(noise, y, **opts)
    assert (sample(model, noise, y, **opts) - readable).abs().max() < 1e-12
    stats = InversionStats()
    out = sample(model, noise, y, sampler="gs-jacobi", check_every=4, stats=stats, **opts)
    assert (out - readable).abs().max() <= DEFAULT_TOL and len(stats.segments) == 3
    assert graphs and all(g.replays for g in graphs)


# ------------------------------------------------------------------------------ checkpoints and training


def test_a_native_checkpoint_keeps_the_layers_and_the_outputs(tmp_path):
    model = deep_shallow((3, 1, 1), torch.float32, num_classes=3)
    folder = save_checkpoint(tmp_path / "ckpt", model, step=5)
    assert json.loads((folder / "config.json").read_text())["model"]["block_layers"] == [3, 1, 1]
    loaded, info = load_checkpoint(folder)
    assert info.config == model.config and loaded.config.block_layers == (3, 1, 1)
    assert read_info(folder).config.short_name() == "2-16-3-3+1+1"
    x, y = _data(model)
    noise = _noise(model)
    with torch.no_grad():
        assert torch.equal(loaded(x, y).z, model(x, y).z) and torch.equal(loaded.log_prob(x, y), model.log_prob(x, y))
    assert torch.equal(sample(loaded, noise, y, guidance=1.0), sample(model, noise, y, guidance=1.0))


def test_a_checkpoint_written_before_block_layers_loads_as_before(tmp_path):
    model = tiny_model(dtype=torch.float32, num_blocks=2, layers_per_block=2)
    folder = save_checkpoint(tmp_path / "old", model)
    raw = json.loads((folder / "config.json").read_text())
    del raw["model"]["block_layers"]
    (folder / "config.json").write_text(json.dumps(raw))
    loaded, info = load_checkpoint(folder)
    assert info.config.block_layers is None and info.config == model.config
    assert_same_weights(loaded.state_dict(), model.state_dict())


def test_training_with_block_layers_resumes_exactly(tmp_path):
    kw = dict(max_steps=8, num_blocks=2, block_layers=(1, 2), checkpoint_every=0, sample_every=0, eval_every=0)
    _, _, rest = assert_resume_is_exact(tmp_path, 3, **kw)
    assert load_run_config(tmp_path / "b").block_layers == (1, 2) and rest.step == 8
    model, _ = load_checkpoint(rest.checkpoint)
    assert [len(b.attn_blocks) for b in model.blocks] == [1, 2]


# ------------------------------------------------------------------------------ the memory plan


@pytest.mark.parametrize("depths", [(1, 3), (3, 1)])
def test_the_activation_count_follows_each_block(depths):
    torch.manual_seed(0)
    cfg = ModelConfig(
        in_channels=3, img_size=16, patch_size=2, width=128, head_dim=64, num_blocks=2, block_layers=depths
    )
    model, B = TarFlow(cfg), 3
    x = torch.randn(B, 3, 16, 16)

    def step():
        z, logdet = model(x)
        return objective(z, logdet, cfg.data_dim)

    saved = saved_bytes(step, list(model.parameters()), False)
    planned = B * M.training_activation_bytes(cfg, 4)
    assert saved <= planned <= 1.03 * saved
    layer, extra = M.layer_activation_bytes(cfg, 4), M.block_extra_bytes(cfg, 4)
    kept = 2 * cfg.num_patches * cfg.token_dim * 4  # each block's input, float32
    assert M.training_activation_bytes(cfg, 4, "blocks") == kept + 3 * layer + extra  # the deeper block recomputed
    deepest = dataclasses.replace(cfg, block_layers=None, layers_per_block=3)
    assert M.sampling_memory(cfg, 4).activations == M.sampling_memory(deepest, 4).activations  # its cache


def test_equal_counts_plan_as_the_uniform_model():
    even = ModelConfig(img_size=16, width=128, num_blocks=4, block_layers=(2, 2, 2, 2))
    uniform = ModelConfig(img_size=16, width=128, num_blocks=4, layers_per_block=2)
    for mode in M.CHECKPOINTING:
        for precision in M.PRECISIONS:
            assert M.training_memory(even, 8, precision, mode) == M.training_memory(uniform, 8, precision, mode)
    assert M.sampling_memory(even, 8, precision="bf16") == M.sampling_memory(uniform, 8, precision="bf16")
