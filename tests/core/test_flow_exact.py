"""float64 exactness on tiny models: invertibility, log-determinants, causality, cached sampling."""

from __future__ import annotations

import pytest
import torch

from tarflow_core import flow
from tarflow_core.fast.inversion import invert_block
from tarflow_core.likelihood import log_prob
from tarflow_core.sampling import sample
from tests.conftest import tiny_model

MODES = [
    dict(nvp=True, num_classes=0),
    dict(nvp=False, num_classes=0),
    dict(nvp=True, num_classes=3),
    dict(nvp=False, num_classes=3),
]
IDS = ["nvp-uncond", "vp-uncond", "nvp-cond", "vp-cond"]


def _inputs(model, n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    c = model.config
    x = torch.randn(n, c.in_channels, c.img_size, c.img_size, generator=g, dtype=torch.float64)
    y = torch.randint(c.num_classes, (n,), generator=g) if c.num_classes else None
    return x, y


def test_patchify_is_unfold_and_inverts():
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    tokens = flow.patchify(x, 2)
    assert torch.equal(tokens, torch.nn.functional.unfold(x, 2, stride=2).transpose(1, 2))
    assert torch.equal(flow.unpatchify(tokens, 3, 8, 2), x)


@pytest.mark.parametrize("mode", MODES, ids=IDS)
def test_sampling_inverts_forward(mode):
    model = tiny_model(var=True, **mode)
    x, y = _inputs(model)
    z, _ = model(x, y)
    x_back = sample(model, z / model.var.sqrt(), y)
    assert torch.allclose(x_back, x, atol=1e-10, rtol=0)


@pytest.mark.parametrize("mode", MODES, ids=IDS)
def test_logdet_matches_autograd_jacobian(mode):
    model = tiny_model(**mode)
    x, y = _inputs(model, n=1)
    _, logdet = model(x, y)
    jac = torch.autograd.functional.jacobian(lambda v: model(v.view_as(x), y)[0].flatten(), x.flatten())
    sign, logabsdet = torch.linalg.slogdet(jac)
    assert sign != 0
    assert torch.allclose(logdet[0], logabsdet, atol=1e-9)
    if not mode["nvp"]:
        assert abs(float(logabsdet)) < 1e-9  # shift-only flows preserve volume


@pytest.mark.parametrize("mode", MODES, ids=IDS)
def test_log_prob_is_prior_plus_logdet_with_learned_variance(mode):
    model = tiny_model(var=True, **mode)
    x, y = _inputs(model)
    z, logdet = model(x, y)
    prior = torch.distributions.Normal(0.0, model.var.sqrt()).log_prob(z).flatten(1).sum(1)
    assert torch.allclose(log_prob(model, x, y), prior + logdet, atol=1e-10)


@pytest.mark.parametrize("mode", MODES, ids=IDS)
def test_block_is_causal_in_its_own_order(mode):
    model = tiny_model(**mode)
    x, y = _inputs(model)
    tokens = model.patchify(x)
    T = tokens.shape[1]
    for block in model.blocks:
        base = block.order(block(tokens, y)[0])
        for j in range(T):
            changed = block.order(tokens).clone()
            changed[:, j] += 1.7
            out = block.order(block(block.order(changed), y)[0])
            assert torch.equal(out[:, :j], base[:, :j]), f"token {j} changed an earlier output"
            assert not torch.equal(out[:, j], base[:, j])


def _invert_by_recomputing(block, x, y, guidance=0.0, guide_what="ab", attn_temp=1.0, annealed=False):
    """Uncached inversion: rerun the whole block on the prefix for every token."""
    from torch.nn import functional as F

    xo = block.order(x).clone()
    T = xo.shape[1]
    for t in range(T - 1):
        a, b = block.params(xo, y)
        if guidance > 0:
            scale = 1.0 / attn_temp
            orig = F.scaled_dot_product_attention
            F.scaled_dot_product_attention = lambda q, k, v, **kw: orig(q * scale, k, v, **kw)
            try:
                au, bu = block.params(xo, None)
            finally:
                F.scaled_dot_product_attention = orig
            w = guidance * (t + 1) / (T - 1) if annealed else guidance
            if "a" in guide_what:
                a = a + w * (a - au)
            if "b" in guide_what:
                b = b + w * (b - bu)
        xo[:, t + 1] = xo[:, t + 1] * a[:, t + 1].exp() + b[:, t + 1]
    return block.order(xo)


GUIDED = [
    dict(),
    dict(guidance=2.0, guide_what="ab"),
    dict(guidance=1.0, guide_what="b", annealed=True),
    dict(guidance=1.5, guide_what="a", attn_temp=0.5),
    dict(guidance=1.5, attn_temp=0.5, annealed=True),
]


@pytest.mark.parametrize("mode", MODES, ids=IDS)
@pytest.mark.parametrize("opts", GUIDED, ids=["g0", "g2ab", "g1b-annealed", "g15a-temp", "g15-temp-annealed"])
def test_cached_sampling_equals_recomputing_the_prefix(mode, opts):
    model = tiny_model(**mode)
    x, y = _inputs(model)
    tokens = model.patchify(x)
    for block in model.blocks:
        cached = invert_block(block, tokens, y, **opts)
        recomputed = _invert_by_recomputing(block, tokens, y, **opts)
        assert torch.allclose(cached, recomputed, atol=1e-10, rtol=0)


def test_dropped_labels_use_the_mean_class_embedding():
    model = tiny_model(num_classes=3)
    x, _ = _inputs(model)
    y = torch.tensor([-1, 2, -1])
    z_mixed, ld_mixed = model(x, y)
    z_none, ld_none = model(x, None)
    z_two, _ = model(x, torch.tensor([2, 2, 2]))
    assert torch.equal(z_mixed[0], z_none[0]) and torch.equal(z_mixed[2], z_none[2])
    assert torch.equal(z_mixed[1], z_two[1])


def test_sampling_leaves_no_state_and_is_reentrant():
    model = tiny_model(num_classes=3)
    noise = torch.randn(2, 4, 4, dtype=torch.float64)
    y = torch.tensor([0, 1])
    first = sample(model, noise, y, guidance=1.0)
    with pytest.raises(ValueError):
        sample(model, noise[:, :3], y)  # a failed call must not poison the next one
    assert torch.equal(sample(model, noise, y, guidance=1.0), first)
    assert torch.equal(noise, noise.clone())  # the caller's noise is never modified in place


def test_bpd_and_redraws_follow_the_model_dtype(monkeypatch):
    """A float64 model: bpd's dequantized inputs and the redrawn noise take its dtype."""
    import tarflow_core.sampling as sampling
    from tarflow_core.likelihood import bpd

    model = tiny_model(dtype=torch.float64)
    c = model.config
    x = torch.randint(0, 256, (2, c.in_channels, c.img_size, c.img_size), dtype=torch.uint8)
    assert torch.isfinite(bpd(model, x)).all()
    original, calls = sampling.sample, {"n": 0}

    def flaky(m, noise, y=None, **kw):  # the first draw of sample 0 comes out non-finite
        out = original(m, noise, y, **kw).clone()
        calls["n"] += 1
        if calls["n"] == 1:
            out[0] = float("nan")
        return out

    monkeypatch.setattr(sampling, "sample", flaky)
    result = sampling.generate(
        model,
        2,
        generator=torch.Generator().manual_seed(0),
        noise=torch.randn(2, c.num_patches, c.token_dim, dtype=torch.float64),
    )
    assert result.redrawn == 1 and torch.isfinite(result.images).all()


def test_sampling_sees_weights_swapped_without_a_version_bump():
    """The prepared-weights cache must not serve the old weights after `vector_to_parameters` or
    `p.data = t` (neither bumps the parameters' version counters)."""
    source, target = tiny_model(seed=1, num_classes=3), tiny_model(seed=2, num_classes=3)
    noise, y = torch.randn(2, 4, 4, dtype=torch.float64), torch.tensor([0, 2])
    want = sample(source, noise, y, guidance=1.0)
    sample(target, noise, y, guidance=1.0)  # prepares and caches target's own weights
    torch.nn.utils.vector_to_parameters(torch.nn.utils.parameters_to_vector(source.parameters()), target.parameters())
    assert torch.equal(sample(target, noise, y, guidance=1.0), want)
    other = tiny_model(seed=3, num_classes=3)
    sample(other, noise, y, guidance=1.0)
    for p, q in zip(other.parameters(), source.parameters()):
        p.data = q.detach().clone()
    assert torch.equal(sample(other, noise, y, guidance=1.0), want)


@pytest.mark.parametrize("mode", MODES, ids=IDS)
def test_nll_and_denoise_by_hand(mode):
    """nll = -(log N(z; 0, var) + logdet) / D, and denoise = x + lr_scale * sigma^2 * grad log p(x),
    both from the forward pass by hand; denoising leaves no gradients on the parameters."""
    from tarflow_core.likelihood import denoise, nll

    model = tiny_model(var=True, **mode)
    x, y = _inputs(model)

    def log_p(v):
        z, logdet = model(v, y)
        return torch.distributions.Normal(0.0, model.var.sqrt()).log_prob(z).flatten(1).sum(1) + logdet

    assert torch.allclose(nll(model, x, y), -log_p(x) / x[0].numel(), atol=1e-12, rtol=0)
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(log_p(xg).sum(), xg)
    out = denoise(model, x, y, sigma=0.3, lr_scale=0.5)
    assert torch.allclose(out, x + 0.5 * 0.3**2 * grad, atol=1e-12, rtol=0)
    assert not out.requires_grad and all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize(
    "shape",
    [dict(img_size=2), dict(num_blocks=1), dict(img_size=2, num_blocks=1)],
    ids=["one-token", "one-block", "one-token-one-block"],
)
@pytest.mark.parametrize("sampler", ["sequential", "jacobi", "gs-jacobi", "auto"])
def test_every_sampler_inverts_degenerate_shapes(shape, sampler):
    model = tiny_model(var=True, num_classes=3, **shape)
    x, y = _inputs(model)
    z, _ = model(x, y)
    extra = dict(segments=2) if sampler == "gs-jacobi" else {}
    for opts in (dict(), dict(guidance=1.5, annealed=True, attn_temp=0.7)):
        back = model.sample(z / model.var.sqrt(), y, sampler=sampler, **extra, **opts)
        if not opts:
            assert torch.allclose(back, x, atol=1e-12, rtol=0)
        assert torch.allclose(back, model.sample(z / model.var.sqrt(), y, **opts), atol=1e-12, rtol=0)


def test_sampling_in_train_mode_with_grad_enabled_changes_nothing():
    model = tiny_model(num_classes=3)
    noise, y = torch.randn(2, 4, 4, dtype=torch.float64), torch.tensor([1, -1])
    want = model.sample(noise, y, guidance=1.0)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    with torch.enable_grad():
        got = model.sample(noise, y, guidance=1.0, sampler="jacobi", tol=0.0)
    assert torch.allclose(got, want, atol=1e-12, rtol=0) and not got.requires_grad
    assert model.training and flags == [p.requires_grad for p in model.parameters()]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
