"""Jacobi and Gauss-Seidel-Jacobi inversion agree with sequential inversion."""

from __future__ import annotations

import pytest
import torch

from tarflow_core.checkpoint import load_model
from tarflow_core.sampling import DEFAULT_TOL, InversionStats, calibrate_segments, generate, sample
from tests.conftest import tiny_model
from tests.core.test_flow_exact import GUIDED, IDS, MODES

GUIDE_IDS = ["g0", "g2ab", "g1b-annealed", "g15a-temp", "g15-temp-annealed"]


def _noise(model, n=3, seed=5, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    c = model.config
    noise = torch.randn(n, c.num_patches, c.token_dim, generator=g, dtype=dtype)
    y = torch.randint(c.num_classes, (n,), generator=g) if c.num_classes else None
    return noise, y


@pytest.mark.parametrize("mode", MODES, ids=IDS)
@pytest.mark.parametrize("opts", GUIDED, ids=GUIDE_IDS)
def test_jacobi_run_to_T_iterations_is_exactly_sequential(mode, opts):
    model = tiny_model(var=True, img_size=8, **mode)  # 16 tokens
    noise, y = _noise(model)
    stats = InversionStats()
    seq = sample(model, noise, y, sampler="sequential", **opts)
    jac = sample(model, noise, y, sampler="jacobi", tol=0.0, stats=stats, **opts)
    assert torch.allclose(jac, seq, atol=1e-12, rtol=0)
    assert stats.iterations == [15] * len(model.blocks)


@pytest.mark.parametrize("mode", MODES, ids=IDS)
@pytest.mark.parametrize("opts", GUIDED, ids=GUIDE_IDS)
@pytest.mark.parametrize(
    "sampler,segments",
    [("jacobi", None), ("gs-jacobi", 2), ("gs-jacobi", 5), ("gs-jacobi", [1, 7]), ("gs-jacobi", None), ("auto", None)],
)
def test_parallel_samplers_match_sequential_within_tolerance(mode, opts, sampler, segments):
    model = tiny_model(var=True, img_size=8, **mode)
    noise, y = _noise(model)
    seq = sample(model, noise, y, sampler="sequential", **opts)
    out = sample(model, noise, y, sampler=sampler, segments=segments, **opts)
    assert (out - seq).abs().max() <= DEFAULT_TOL


@pytest.mark.parametrize("opts", GUIDED, ids=GUIDE_IDS)
def test_reference_fixture_with_the_default_tolerance(fixtures_dir, expected, opts):
    model = load_model(fixtures_dir / "cond_nvp.pth")
    key = {0: "sample_g0"}.get(len(opts))
    seq = sample(model, expected["noise"], expected["y"], **opts)
    for sampler in ("jacobi", "gs-jacobi", "auto"):
        out = sample(model, expected["noise"], expected["y"], sampler=sampler, **opts)
        assert (out - seq).abs().max() <= DEFAULT_TOL, sampler
    if key:
        assert (seq - expected[key]).abs().max() < 1e-4


def test_diverging_jacobi_falls_back_to_sequential():
    """Large output heads make the fixed-point map expansive: never return its garbage."""
    model = tiny_model(img_size=8)
    with torch.no_grad():
        for block in model.blocks:
            block.proj_out.weight.mul_(40.0)
    noise, y = _noise(model)
    seq = sample(model, noise, y, sampler="sequential")
    stats = InversionStats()
    out = sample(model, noise, y, sampler="jacobi", stats=stats)
    finite = torch.isfinite(seq)
    assert stats.fallbacks > 0
    assert torch.equal(torch.isfinite(out), finite)
    assert torch.allclose(out[finite], seq[finite], atol=1e-6, rtol=1e-6)


def test_calibration_returns_one_valid_segment_per_block_and_generate_records_it():
    model = tiny_model(img_size=8, num_classes=3, dtype=torch.float32)
    noise, y = _noise(model, n=4, dtype=torch.float32)
    segs = calibrate_segments(model, noise, y, guidance=1.0)
    assert len(segs) == len(model.blocks) and all(1 <= s <= 15 for s in segs)
    result = generate(model, 4, generator=torch.Generator().manual_seed(0), batch_size=2, sampler="gs-jacobi")
    st = result.settings
    assert st["sampler"] == "gs-jacobi" and len(st["segments"]) == len(model.blocks)
    assert len(st["passes_per_block"]) == len(model.blocks)
    seq = generate(model, 4, generator=torch.Generator().manual_seed(0), batch_size=2, sampler="sequential")
    assert (result.images - seq.images).abs().max() <= DEFAULT_TOL
    assert seq.settings["passes_per_block"] == [15.0] * len(model.blocks)
    auto = generate(model, 4, generator=torch.Generator().manual_seed(0), batch_size=2, sampler="auto")
    assert auto.settings["segments"] == 1  # on a CPU: sequential, so the same seed gives the same images
    assert auto.settings["sampler"] == "sequential" and auto.settings["requested"] == "auto"
    assert auto.settings["tol"] is None  # no tolerance in an exact method
    assert torch.equal(auto.images, seq.images)


@pytest.mark.parametrize("sampler", ["jacobi", "gs-jacobi"])
def test_parallel_samplers_with_guidance_on_a_batch_of_one(sampler):
    """With B = 1 the conditioning's permuted layout used to reach a view() and fail."""
    model = tiny_model(img_size=8, num_classes=3, dtype=torch.float64)
    noise, y = _noise(model, n=1, dtype=torch.float64)
    seq = model.sample(noise, y, guidance=1.5, sampler="sequential")
    par = model.sample(noise, y, guidance=1.5, sampler=sampler, tol=0.0)
    assert (par - seq).abs().max() < 1e-10
    result = generate(
        model, 3, generator=torch.Generator().manual_seed(0), batch_size=2, sampler=sampler, guidance=1.0
    )  # the last batch holds one sample
    assert torch.isfinite(result.images).all()


def test_labels_out_of_range_are_refused():
    model = tiny_model(img_size=8, num_classes=3, dtype=torch.float64)
    noise, _ = _noise(model, n=2, dtype=torch.float64)
    for bad in (torch.tensor([0, 3]), torch.tensor([-2, 0])):
        with pytest.raises(ValueError, match=r"labels must be in -1..2"):
            model.sample(noise, bad)
    from tarflow_core.likelihood import nll

    with pytest.raises(ValueError, match="labels must be in"):
        c = model.config
        nll(model, torch.zeros(2, c.in_channels, c.img_size, c.img_size, dtype=torch.float64), torch.tensor([5, 0]))
