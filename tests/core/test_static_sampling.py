"""The fixed-shape sampling path that CUDA graphs replay, and the graphs themselves on CUDA."""

from __future__ import annotations

import pytest
import torch

from tarflow_core.fast.inversion import InversionStats, invert_segments, invert_sequential, invert_sequential_static
from tarflow_core.fast.runner import BlockRunner
from tarflow_core.sampling import DEFAULT_TOL, DEFAULT_TOL_HALF, generate, sample
from tests.conftest import tiny_model
from tests.core.graph_emulator import emulate_cuda_graphs
from tests.core.test_flow_exact import GUIDED, IDS, MODES
from tests.core.test_parallel_sampling import GUIDE_IDS, _noise

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("mode", MODES, ids=IDS)
@pytest.mark.parametrize("opts", GUIDED, ids=GUIDE_IDS)
@pytest.mark.parametrize("buckets", [1, 3, 16])
def test_fixed_shape_inversion_equals_the_sequential_one(mode, opts, buckets):
    """Position in a tensor, attention over a masked fixed span: same numbers as the plain loop."""
    model = tiny_model(var=True, img_size=8, **mode)  # 16 tokens
    noise, y = _noise(model)
    for block in model.blocks:
        with torch.inference_mode():
            plain = block.order(noise).clone()
            invert_sequential(BlockRunner(block, 3, y, device=noise.device, dtype=noise.dtype, **opts), plain)
            fixed = block.order(noise).clone()
            runner = BlockRunner(block, 3, y, device=noise.device, dtype=noise.dtype, **opts)
            invert_sequential_static(runner, fixed, graphed=False, buckets=buckets)
        assert torch.allclose(fixed, plain, atol=1e-12, rtol=0)
        assert not torch.equal(plain, block.order(noise))  # the block did something


@pytest.mark.parametrize("check_every", [2, 5])
def test_checking_convergence_every_k_passes_keeps_the_result(check_every):
    model = tiny_model(var=True, img_size=8, num_classes=3)
    noise, y = _noise(model)
    seq = sample(model, noise, y, guidance=1.5)
    stats = InversionStats()
    out = sample(model, noise, y, guidance=1.5, sampler="gs-jacobi", segments=7, check_every=check_every, stats=stats)
    assert (out - seq).abs().max() <= DEFAULT_TOL
    exact = sample(model, noise, y, guidance=1.5, sampler="jacobi", tol=0.0, check_every=check_every)
    assert torch.allclose(exact, seq, atol=1e-12, rtol=0)


def test_check_every_must_be_positive():
    model = tiny_model(img_size=8)
    with pytest.raises(ValueError, match="check_every"):
        sample(model, _noise(model)[0], sampler="jacobi", check_every=0)


def test_cuda_graphs_need_a_cuda_device():
    model = tiny_model(img_size=8)
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        sample(model, _noise(model)[0], cuda_graphs=True)


@cuda
@pytest.mark.parametrize("sampler,segments", [("sequential", None), ("gs-jacobi", 5), ("jacobi", None)])
def test_cuda_graph_replay_matches_eager_sampling(sampler, segments):
    model = tiny_model(var=True, img_size=8, num_classes=3, dtype=torch.float32).cuda()
    noise, y = _noise(model, n=4, dtype=torch.float32)
    noise, y = noise.cuda(), y.cuda()
    opts = dict(guidance=1.5, annealed=True, attn_temp=0.8, sampler=sampler, segments=segments)
    eager = sample(model, noise, y, cuda_graphs=False, check_every=1, **opts)
    stats = InversionStats()
    graphed = sample(model, noise, y, stats=stats, **opts)  # graphs and check_every 4 by default on CUDA
    again = sample(model, noise, y, **opts)
    assert torch.isfinite(graphed).all()
    assert (graphed - eager).abs().max() <= (1e-5 if sampler == "sequential" else 2 * DEFAULT_TOL)
    assert torch.equal(graphed, again)  # replays are deterministic
    ref = sample(model.cpu(), noise.cpu(), y.cpu(), guidance=1.5, annealed=True, attn_temp=0.8)
    assert (graphed.cpu() - ref).abs().max() <= 1e-3


@cuda
def test_bf16_sampling_on_cuda_stays_close_to_float32():
    model = tiny_model(img_size=8, num_classes=3, dtype=torch.float32).cuda()
    noise, y = _noise(model, n=4, dtype=torch.float32)
    noise, y = noise.cuda(), y.cuda()
    full = sample(model, noise, y, guidance=2.0)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        half = sample(model, noise, y, guidance=2.0)
    assert half.dtype == torch.float32 and torch.isfinite(half).all()
    assert (half - full).abs().max() < 0.1


def test_bf16_jacobi_uses_a_tolerance_bf16_can_reach():
    """bfloat16 rounding keeps Jacobi iterates moving by ~1e-2: the default tolerance follows the
    arithmetic, so the iteration stops early instead of always running to the exact T passes."""
    model = tiny_model(var=True, img_size=8, num_classes=3, dtype=torch.float32)
    gen = lambda **kw: generate(
        model,
        8,
        generator=torch.Generator().manual_seed(0),
        sampler="jacobi",  # noqa: E731
        guidance=1.0,
        **kw,
    )
    full, half = gen(), gen(precision="bf16")
    assert full.settings["tol"] == DEFAULT_TOL and half.settings["tol"] == DEFAULT_TOL_HALF
    assert half.settings["precision"] == "bf16"
    assert min(half.settings["passes_per_block"]) < 15  # stopped before the exact 15 passes
    seq_half = generate(model, 8, generator=torch.Generator().manual_seed(0), guidance=1.0, precision="bf16")
    # both bf16 results sit within bf16's own error of the float32 images
    assert (seq_half.images - full.images).abs().max() < 0.1
    assert (half.images - full.images).abs().max() < 0.1


@pytest.mark.parametrize("mode", MODES[::3], ids=IDS[::3])
@pytest.mark.parametrize("opts", GUIDED[1:3] + GUIDED[4:], ids=GUIDE_IDS[1:3] + GUIDE_IDS[4:])
def test_graph_replay_semantics_on_a_cpu(monkeypatch, mode, opts):
    """The steps CUDA graphs replay, run under emulated capture/replay: no host sync inside,
    nothing Python-side baked in (replays re-run the recorded operators only), same images."""
    graphs = emulate_cuda_graphs(monkeypatch)
    model = tiny_model(var=True, img_size=8, **mode)
    noise, y = _noise(model)
    seq = sample(model, noise, y, **opts)
    with torch.inference_mode():
        for segment in (1, 4):
            x = noise * model.var.sqrt()
            for block in reversed(model.blocks):
                runner = BlockRunner(block, 3, y, device=noise.device, dtype=noise.dtype, **opts)
                xo = block.order(x).clone()
                if segment == 1:
                    invert_sequential_static(runner, xo, graphed=True, buckets=2)
                else:
                    invert_segments(runner, xo, segment, tol=1e-9, graphed=True)
                x = block.order(xo)
            assert torch.allclose(model.unpatchify(x), seq, atol=1e-9, rtol=0), segment
    assert graphs and all(g.replays >= 1 for g in graphs)
    assert sum(g.replays for g in graphs) > len(graphs)  # most steps ran as replays


def _graphed_block_error(monkeypatch) -> float:
    """Max |difference| between the plain sequential inverse of one block and the emulated-graph one."""
    emulate_cuda_graphs(monkeypatch)
    model = tiny_model(var=True, img_size=8, num_classes=3)
    noise, y = _noise(model)
    block = model.blocks[0]
    with torch.inference_mode():
        plain, graphed = block.order(noise).clone(), block.order(noise).clone()
        invert_sequential(BlockRunner(block, 3, y, device=noise.device, dtype=noise.dtype), plain)
        runner = BlockRunner(block, 3, y, device=noise.device, dtype=noise.dtype)
        invert_sequential_static(runner, graphed, graphed=True, buckets=2)
    return (plain - graphed).abs().max().item()


def test_the_emulator_catches_a_position_baked_in_at_capture(monkeypatch):
    from tarflow_core.fast import inversion

    advance, counter = inversion._advance, [0]

    def python_position(runner, xo, pos, span):  # the position from a Python counter: fixed at capture
        counter[0] += 1
        advance(runner, xo, torch.full((1,), counter[0] - 1), span)
        pos.add_(1)

    monkeypatch.setattr(inversion, "_advance", python_position)
    assert _graphed_block_error(monkeypatch) > 1e-3


def test_the_emulator_catches_a_host_sync_inside_a_step(monkeypatch):
    step = BlockRunner.step

    def syncing(self, x, t, span=None):
        if isinstance(t, torch.Tensor):
            int(t)
        return step(self, x, t, span)

    monkeypatch.setattr(BlockRunner, "step", syncing)
    with pytest.raises(AssertionError, match="host synchronisation"):
        _graphed_block_error(monkeypatch)


def test_the_cuda_sampling_flow_under_emulated_graphs(monkeypatch):
    """sample() as it runs on CUDA (graphs on, convergence read every 4 passes, calibration timed
    through graphs), with capture/replay emulated on the CPU: same images as plain sampling."""
    from tarflow_core import sampling

    graphs = emulate_cuda_graphs(monkeypatch)
    monkeypatch.setattr(sampling, "use_graphs", lambda device, requested: requested is not False)
    monkeypatch.setattr(sampling, "graph_pool", lambda graphed: None)
    model = tiny_model(var=True, img_size=8, num_classes=3)
    noise, y = _noise(model)
    opts = dict(guidance=1.5, annealed=True, attn_temp=0.8)
    seq = sample(model, noise, y, cuda_graphs=False, **opts)
    assert torch.allclose(sample(model, noise, y, **opts), seq, atol=1e-12, rtol=0)
    stats = InversionStats()
    out = sample(model, noise, y, sampler="gs-jacobi", check_every=4, stats=stats, **opts)  # calibrated
    assert (out - seq).abs().max() <= DEFAULT_TOL
    assert len(stats.segments) == len(model.blocks)
    assert len(graphs) > 2 * len(model.blocks) and all(g.replays for g in graphs)
