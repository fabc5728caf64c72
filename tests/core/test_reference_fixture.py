"""Agreement with the published code's outputs on the shared reference checkpoint."""

from __future__ import annotations

import pytest

from tarflow_core.checkpoint import load_model
from tarflow_core.likelihood import denoise

SAMPLES = {
    "sample_g0": dict(),
    "sample_g2_ab": dict(guidance=2.0, guide_what="ab"),
    "sample_g1_b_annealed": dict(guidance=1.0, guide_what="b", annealed=True),
    "sample_g15_temp05": dict(guidance=1.5, attn_temp=0.5),
    "sample_g15_temp05_annealed": dict(guidance=1.5, attn_temp=0.5, annealed=True),
}


@pytest.fixture(scope="module")
def model(fixtures_dir):
    return load_model(fixtures_dir / "cond_nvp.pth")


def _per_dim(model, logdet):
    c = model.config
    return logdet / (c.num_patches * c.token_dim)


@pytest.mark.parametrize("labels", ["y", "y_dropped"])
def test_forward_and_logdets(model, expected, labels):
    suffix = "" if labels == "y" else "_dropped"
    z, logdet, outputs = model.forward_tokens(model.patchify(expected["x"]), expected[labels])
    assert (z - expected["z" + suffix]).abs().max() < 1e-5
    assert (_per_dim(model, logdet) - expected["logdets" + suffix]).abs().max() < 1e-6
    if labels == "y":
        for i, out in enumerate(outputs):
            assert (out - expected[f"block_out_{i}"]).abs().max() < 1e-5
        loss = 0.5 * z.pow(2).mean() - _per_dim(model, logdet).mean()
        assert abs(loss - expected["loss"]) < 1e-5


@pytest.mark.parametrize("key", list(SAMPLES))
def test_samples(model, expected, key):
    x = model.sample(expected["noise"], expected["y"], **SAMPLES[key])
    assert (x - expected[key]).abs().max() < 1e-4


def test_denoise(model, expected):
    out = denoise(model, expected["sample_g0"], expected["y"], sigma=float(expected["denoise_sigma"]))
    assert (out - expected["denoised_g0"]).abs().max() < 1e-4
