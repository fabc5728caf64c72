"""The readable flow in tarflow_core.model agrees with the fast backends and the recorded reference outputs.

`TarFlow.reverse` (token by token through the modules, an explicit KVCache, guidance on a second pass)
is checked against `sample` with every sampler, against the published code's samples stored with each
reference fixture, and against `forward`; `TarFlow.log_prob` against the recorded log p(x).
"""

from __future__ import annotations

import pytest
import torch

from tarflow_core import flow
from tarflow_core.checkpoint import load_model
from tarflow_core.likelihood import log_prob as likelihood_log_prob
from tarflow_core.model import FlowOutput
from tarflow_core.sampling import sample
from tests.conftest import tiny_model
from tests.core.test_flow_exact import GUIDED, IDS, MODES
from tests.core.test_parallel_sampling import GUIDE_IDS, _noise
from tests.core.test_reference_fixture import SAMPLES
from tests.core.test_reference_shapes import BY_FILE, DTYPES, FILES, TOL, expected_for, model_for, unpacked, worst
from tests.core.test_reference_shapes import MODES as FIXTURE_MODES

__all__ = ["unpacked"]  # the module-scoped fixture that unpacks the reference files

AGREE = {"f32": 1e-5, "f64": 1e-12}  # readable vs fast: the same maths, different operator order
# Jacobi with tol 0 runs every segment to its exact end: the sequential result up to rounding
SAMPLERS = {
    "sequential": dict(sampler="sequential"),
    "jacobi": dict(sampler="jacobi", tol=0.0),
    "gs-jacobi": dict(sampler="gs-jacobi", segments=3, tol=0.0),
}


def _agrees_with_every_sampler(model, noise, y, options: dict, tag: str) -> torch.Tensor:
    readable = model.reverse(noise, y, **options)
    assert readable.dtype == DTYPES[tag] and torch.isfinite(readable).all()
    for name, sampler in SAMPLERS.items():
        fast = sample(model, noise, y, **sampler, **options)
        assert worst(readable, fast) < AGREE[tag], name
    return readable


# ------------------------------------------------------------------------------ reference fixtures


@pytest.mark.parametrize("tag", ["f32", "f64"])
@pytest.mark.parametrize("file,mode", FIXTURE_MODES)
def test_reverse_reproduces_the_reference_samples_and_every_sampler(unpacked, file, mode, tag):
    exp, model = expected_for(file), model_for(unpacked, file, tag)
    options = dict(BY_FILE[file]["modes"][mode])
    y = None if options.pop("no_labels", False) else exp.get("y")
    readable = _agrees_with_every_sampler(model, exp["noise"].to(DTYPES[tag]), y, options, tag)
    assert worst(readable, exp[f"{tag}/sample/{mode}"]) < TOL[tag]["sample"]


@pytest.mark.parametrize("tag", ["f32", "f64"])
@pytest.mark.parametrize("file", FILES)
def test_reverse_inverts_forward_and_log_prob_is_the_recorded_one(unpacked, file, tag):
    exp, model = expected_for(file), model_for(unpacked, file, tag)
    x, y = exp["x"].to(DTYPES[tag]), exp.get("y")
    with torch.no_grad():
        out = model(x, y)
        assert isinstance(out, FlowOutput) and torch.equal(out.z, out[0])
        back = model.reverse(out.z / model.var.sqrt(), y)
        assert worst(back, x) < AGREE[tag] * 10  # through every block and back
        lp = model.log_prob(x, y)
        assert worst(lp, exp[f"{tag}/log_prob"]) < TOL[tag]["log_prob"]
        # the formula likelihood.log_prob computed before it delegated to the model, bit for bit
        z, logdet, _ = model.forward_tokens(model.patchify(x), y if y is None else y.long())
        assert torch.equal(lp, flow.gaussian_log_prob(z, model.var) + logdet)
        assert torch.equal(lp, likelihood_log_prob(model, x, y))


# ----------------------------------------------------------------------- the shared cond_nvp model


@pytest.fixture(scope="module")
def cond_nvp(fixtures_dir):
    model = load_model(fixtures_dir / "cond_nvp.pth")
    return {"f32": model, "f64": load_model(fixtures_dir / "cond_nvp.pth").double()}


@pytest.mark.parametrize("tag", ["f32", "f64"])
@pytest.mark.parametrize("key", list(SAMPLES))
def test_reverse_on_the_cond_nvp_fixture(cond_nvp, expected, key, tag):
    model = cond_nvp[tag]
    readable = _agrees_with_every_sampler(model, expected["noise"].to(DTYPES[tag]), expected["y"], SAMPLES[key], tag)
    assert worst(readable, expected[key]) < 1e-4  # the published code's float32 samples


def test_cond_nvp_log_prob_round_trip_and_dropped_labels(cond_nvp, expected):
    model = cond_nvp["f64"]
    c = model.config
    x = expected["x"].double()
    for labels, suffix in (("y", ""), ("y_dropped", "_dropped")):
        y = expected[labels]
        # recorded z and per-dimension log-determinants: log p = log N(z; 0, 1) + T * D * logdets
        prior = torch.distributions.Normal(0.0, 1.0).log_prob(expected["z" + suffix].double()).flatten(1).sum(1)
        recorded = prior + expected["logdets" + suffix].double() * c.num_patches * c.token_dim
        with torch.no_grad():
            assert worst(model.log_prob(x, y), recorded) < 1e-3
            assert worst(model.reverse(model(x, y).z, y), x) < 1e-12


# ------------------------------------------------------------------- tiny models, every combination


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("mode", MODES, ids=IDS)
@pytest.mark.parametrize("opts", GUIDED, ids=GUIDE_IDS)
def test_reverse_equals_every_sampler_on_tiny_models(mode, opts, dtype):
    model = tiny_model(var=True, img_size=8, dtype=dtype, **mode)  # 16 tokens, learned prior variance
    noise, y = _noise(model, dtype=dtype)
    tag = "f32" if dtype == torch.float32 else "f64"
    readable = _agrees_with_every_sampler(model, noise, y, opts, tag)
    # the options reach the readable path: guidance moves the samples wherever it can act (a second pass
    # that differs from the first: labels or a temperature; on a shift b, or a log-scale a of an NVP model)
    differs = mode["num_classes"] or opts.get("attn_temp", 1.0) != 1.0
    acts = "b" in opts.get("guide_what", "ab") or mode["nvp"]
    if opts and differs and acts:
        assert worst(readable, model.reverse(noise, y)) > 1e-6
    if dtype == torch.float64:
        x = readable
        with torch.no_grad():
            assert worst(model.reverse(model(x, y).z / model.var.sqrt(), y), x) < 1e-12


@pytest.mark.parametrize("mode", MODES, ids=IDS)
def test_one_cached_token_step_equals_the_full_causal_pass(mode):
    """reverse_step on the KVCache gives, token by token, what params computes for the whole sequence."""
    model = tiny_model(img_size=8, **mode)
    noise, y = _noise(model)
    for block in model.blocks:
        xo = block.order(noise)
        a, b = block.params(xo, y)
        cond = block.conditioning(y).expand(xo.shape[0], -1, -1)
        cache = block.new_cache(xo.shape[0], xo.shape[1], xo)
        with torch.no_grad():
            for t in range(xo.shape[1] - 1):
                a_t, b_t = block.reverse_step(xo[:, t], t, cond, cache)
                assert worst(a_t, a[:, t + 1]) < 1e-12 and worst(b_t, b[:, t + 1]) < 1e-12
        with torch.no_grad():
            assert worst(block.reverse(block(noise, y).z, y), noise) < 1e-12


def test_reverse_leaves_no_state_and_checks_its_inputs():
    model = tiny_model(num_classes=3)
    noise, y = torch.randn(2, 4, 4, dtype=torch.float64), torch.tensor([0, 2])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    first = model.reverse(noise, y, guidance=1.0)
    with pytest.raises(ValueError, match="labels must be in -1..2"):
        model.reverse(noise, torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="guide_what must be one of"):
        model.reverse(noise, y, guidance=1.0, guide_what="c")
    assert torch.equal(model.reverse(noise, y, guidance=1.0), first)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(model.reverse(noise, [0, 2], guidance=1.0), first)  # labels in any integer form
