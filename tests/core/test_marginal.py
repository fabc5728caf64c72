"""The learned marginal map (`--marginal-bins`): an exact, increasing, piecewise-linear flow of each pixel
value that starts as the identity; a TarFlow with it is still an exact flow that every sampler inverts,
and checkpoints, parameter counts and training resume keep it."""

from __future__ import annotations

import json

import pytest
import torch

from tarflow_core.checkpoint import load_checkpoint, save_checkpoint
from tarflow_core.marginal import MarginalMap
from tarflow_core.model import TarFlow, state_shapes
from tests.conftest import tiny_model
from tests.core.test_readable_reverse import _agrees_with_every_sampler
from tests.core.test_train import assert_resume_is_exact


def _random_map(channels=2, bins=16, seed=0) -> MarginalMap:
    torch.manual_seed(seed)
    m = MarginalMap(channels, bins).double()
    with torch.no_grad():
        m.theta.normal_(0, 1.5)
    return m


def _values(channels=2, seed=1) -> torch.Tensor:
    """Values inside [-1, 1) (the dequantized pixels), outside it (Gaussian noise reaches there) and on
    the bins' edges."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(3, channels, 4, 4, generator=g, dtype=torch.float64) * 2.6 - 1.3
    x[0, :, 0, :] = torch.tensor([-1.0, -0.875, 0.0, 0.999])
    return x


def test_it_starts_as_the_identity():
    m = MarginalMap(3, 256)
    x = torch.rand(2, 3, 4, 4) * 2 - 1
    y, logdet = m(x)
    assert torch.equal(y, x) or (y - x).abs().max() < 1e-6
    assert logdet.abs().max() < 1e-4


def test_inverse_is_exact_and_increasing():
    m, x = _random_map(), _values()
    y, _ = m(x)
    assert (m.inverse(y) - x).abs().max() < 1e-12
    line = torch.linspace(-1.5, 1.5, 2001, dtype=torch.float64).view(1, 1, 1, -1).expand(1, 2, 1, -1)
    assert (m(line)[0].diff(dim=-1) > 0).all()  # strictly increasing, continuous at the edges
    ends = torch.tensor([-1.0, 1.0], dtype=torch.float64).view(1, 1, 1, 2).expand(1, 2, 1, 2)
    assert torch.allclose(m(ends)[0], ends)  # f(-1) = -1 and f(1) = 1


def test_non_finite_values_pass_through():
    m = _random_map()
    x = _values()
    x[1, 0, 1, 1], x[1, 1, 2, 2], x[2, 0, 0, 0] = float("nan"), float("inf"), -float("inf")
    y, logdet = m(x)
    assert y[1, 0, 1, 1].isnan() and y[1, 1, 2, 2] == float("inf") and y[2, 0, 0, 0] == -float("inf")
    assert torch.isfinite(logdet).all() and torch.isfinite(y[0]).all()
    assert m.inverse(y)[1, 0, 1, 1].isnan()


def test_log_det_is_the_autograd_jacobian():
    m = _random_map()
    x = _values()[:1]
    jac = torch.autograd.functional.jacobian(lambda t: m(t.view_as(x))[0].flatten(), x.flatten())
    assert abs(m(x)[1].item() - torch.linalg.slogdet(jac)[1].item()) < 1e-10


def _with_map(dtype=torch.float64, **kw) -> TarFlow:
    model = tiny_model(marginal_bins=8, dtype=dtype, **kw)
    with torch.no_grad():
        for block in model.blocks:  # random heads at full size can overflow a stack of random blocks
            block.proj_out.weight.mul_(0.5)
    return model


@pytest.mark.parametrize("conditional", [False, True])
def test_a_model_with_the_map_is_an_exact_flow(conditional):
    model = _with_map(num_classes=3 if conditional else 0)
    g = torch.Generator().manual_seed(3)
    x = torch.rand(2, 1, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    y = torch.tensor([0, 2]) if conditional else None
    z, logdet = model(x, y)
    jac = torch.autograd.functional.jacobian(lambda t: model(t.view_as(x[:1]), y[:1] if conditional else None)[0]
                                             .flatten(), x[:1].flatten())  # fmt: skip
    assert abs(logdet[0].item() - torch.linalg.slogdet(jac)[1].item()) < 1e-9
    assert (model.reverse(z, y) - x).abs().max() < 1e-10
    noise = torch.randn(2, model.config.num_patches, model.config.token_dim, generator=g, dtype=torch.float64)
    _agrees_with_every_sampler(model, noise, y, {}, "f64")


def test_parameters_state_shapes_and_checkpoints_keep_the_map(tmp_path):
    model = _with_map(dtype=torch.float32)
    cfg = model.config
    assert cfg.num_parameters() == sum(p.numel() for p in model.parameters())
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == state_shapes(cfg)
    save_checkpoint(tmp_path / "ck", model)
    loaded = load_checkpoint(tmp_path / "ck")[0]
    assert loaded.config.marginal_bins == 8 and torch.equal(loaded.marginal.theta, model.marginal.theta)
    x = torch.rand(2, 1, 4, 4) * 2 - 1
    assert torch.equal(loaded.log_prob(x), model.log_prob(x))
    assert TarFlow(cfg.__class__(**{**cfg.to_dict(), "marginal_bins": 0})).marginal is None


def test_training_with_the_map_learns_it_and_resumes_exactly(tmp_path):
    kw = dict(max_steps=12, marginal_bins=16, noise="uniform", checkpoint_every=0, sample_every=0, eval_every=0)
    straight, _, _ = assert_resume_is_exact(tmp_path, 5, **kw)
    theta = load_checkpoint(straight.checkpoint)[0].marginal.theta
    assert theta.abs().max() > 0  # it trained


def test_the_default_follows_the_noise_and_older_runs_keep_no_map(tmp_path):
    """Likelihood runs get the map by default (where it was measured to win), Gaussian-noise runs do not;
    a run directory of a version without the map (no `marginal_bins` in config.json) resumes without one."""
    from tarflow_core.config import TrainConfig
    from tarflow_core.train import load_run_config, train
    from tests.core.test_train import tiny_cfg

    assert [TrainConfig(noise=n).model_config(1, 8, 0).marginal_bins for n in ("uniform", "variational")] == [256] * 2
    assert TrainConfig(noise="gaussian").model_config(1, 8, 0).marginal_bins == 0
    assert TrainConfig(noise="uniform", marginal_bins=0).model_config(1, 8, 0).marginal_bins == 0
    kw = dict(max_steps=4, noise="uniform", marginal_bins=0, checkpoint_every=0, sample_every=0, eval_every=0)
    run = tmp_path / "old"
    train(tiny_cfg(run, **kw))
    doc = json.loads((run / "config.json").read_text())
    del doc["train"]["marginal_bins"]
    (run / "config.json").write_text(json.dumps(doc))
    cfg = load_run_config(run)
    assert cfg.resolved_marginal_bins == 0
    result = train(cfg.replace(max_steps=6), resume=True)
    assert result.status == "finished" and load_checkpoint(result.checkpoint)[0].marginal is None
