"""Variational dequantization: q(u | x) is a density with the log q it reports, starts as uniform
dequantization, and the bound it gives is a valid upper bound on -log P(x) that tightens as q trains;
training minimises that bound (single process, micro-batches, resume, non-finite steps), and the
held-out evaluation reports it beside the uniform figure."""

from __future__ import annotations

import copy
import itertools
import math

import numpy as np
import pytest
import torch

from tarflow_core import flow
from tarflow_core.checkpoint import load_checkpoint, load_model, save_checkpoint
from tarflow_core.config import ModelConfig, TrainConfig
from tarflow_core.dequant import DequantizingFlow, VariationalDequantizer, dequantize
from tarflow_core.events import read_events
from tarflow_core.likelihood import bpd, bpd_figures
from tarflow_core.model import TarFlow, state_shapes
from tarflow_core.sampling import generate
from tarflow_core.train import train
from tarflow_core.train.step import objective

from .test_accumulation import _batches, _stepper
from .test_train import assert_resume_is_exact, tiny_cfg, weights


def _randomise(module: torch.nn.Module, scale: float = 0.3, seed: int = 0) -> None:
    """Every weight random: q's zero-initialised output convolutions would make it the uniform."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)


# ------------------------------------------------------------------------------ q itself


def test_log_q_is_minus_the_log_det_of_u_as_a_function_of_the_draws():
    """float64: u = f(draws) is a bijection of the unit cube whose draws are uniform, so q(u) = 1 / |det J|."""
    torch.manual_seed(0)
    q = VariationalDequantizer(channels=2, width=6, layers=3).double()
    _randomise(q, scale=0.1)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (3, 2, 3, 3), generator=g, dtype=torch.uint8)
    draws = torch.rand(3, 2, 3, 3, generator=g, dtype=torch.float64) * 0.98 + 0.01
    with torch.no_grad():
        sample = q(x, draws)
    assert sample.log_q.abs().min() > 0.1 and ((sample.u - draws).abs() > 0.01).any()  # a q far from uniform
    for i in range(3):
        jac = torch.autograd.functional.jacobian(
            lambda d: q(x[i : i + 1], d.view(1, 2, 3, 3)).u.flatten(), draws[i].flatten()
        )
        _, logdet = torch.linalg.slogdet(jac)
        assert abs(float(sample.log_q[i]) + float(logdet)) < 1e-10, (i, float(sample.log_q[i]), float(logdet))


def test_q_starts_as_uniform_dequantization_and_u_stays_inside_the_bin():
    q = VariationalDequantizer(channels=3, width=8, layers=4)
    g = torch.Generator().manual_seed(2)
    x = torch.randint(0, 256, (5, 3, 4, 4), generator=g, dtype=torch.uint8)
    draws = torch.rand(5, 3, 4, 4, generator=g)
    u, log_q = q(x, draws)
    assert torch.equal(log_q, torch.zeros(5)) and (u - draws).abs().max() < 1e-6
    for dtype in (torch.float32, torch.float64):  # far from uniform, at the edges of the draws' range
        wild = copy.deepcopy(q).to(dtype)
        _randomise(wild, scale=3.0, seed=3)
        edges = torch.tensor([0.0, 1e-30, 1e-7, 0.5, 1 - 1e-7, 1 - 1e-16], dtype=dtype)
        d = edges[torch.randint(0, 6, (5, 3, 4, 4), generator=g)]
        u, log_q = wild(x, d)
        assert ((u > 0) & (u < 1)).all() and torch.isfinite(log_q).all(), dtype


def test_under_bf16_autocast_q_is_computed_in_float32():
    torch.manual_seed(0)
    model = TarFlow(_toy_config(nvp=True))
    _randomise(model.dequantizer)
    wrapped = DequantizingFlow(model)
    x = torch.randint(0, 256, (4, 1, 2, 2), dtype=torch.uint8)
    draws = torch.rand(4, 1, 2, 2)
    _, _, plain = wrapped(x, draws)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, _, autocast = wrapped(x, draws)
    assert autocast.dtype == torch.float32 and torch.equal(plain, autocast)


# ------------------------------------------------------------------------- the bound on a toy

# 2x2 one-channel images of 4 grey levels one step apart: 4^4 = 256 images. A VP flow's learned prior
# variance fits their spread in a few steps (about 2 pixel values wide), so its density varies inside
# every bin: the uniform bound is visibly loose there, and q has something to learn.
LEVELS = torch.tensor([126, 127, 128, 129], dtype=torch.uint8)
TOY = LEVELS[torch.tensor(list(itertools.product(range(4), repeat=4)))].view(256, 1, 2, 2)
PIXEL_LOG_JACOBIAN = 4 * math.log(2 / 256)  # density of y -> density in pixel units


def _toy_config(nvp: bool = False) -> ModelConfig:
    return ModelConfig(
        in_channels=1, img_size=2, patch_size=1, width=8, num_blocks=2, layers_per_block=1, head_dim=8,
        nvp=nvp, dequant="variational", dequant_width=8, dequant_layers=2,
    )  # fmt: skip


@pytest.fixture(scope="module")
def toy_flow():
    """The toy flow (float64) trained 50 steps on the toy images with uniform dequantization; q untrained."""
    torch.manual_seed(0)
    model = TarFlow(_toy_config()).double()
    flow_params = [p for n, p in model.named_parameters() if not n.startswith("dequantizer.")]
    opt = torch.optim.Adam(flow_params, lr=1e-2)
    g = torch.Generator().manual_seed(1)
    for _ in range(50):
        z, _ = model(dequantize(None, TOY, torch.rand(TOY.shape, generator=g, dtype=torch.float64)).x)
        loss = 0.5 * (z.pow(2) / model.var).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.update_prior(z, rate=0.2)
    return model.eval().requires_grad_(False)


def _log_p_bins(model: TarFlow, nodes: int, images: torch.Tensor = TOY) -> torch.Tensor:
    """log P(x) = log of the integral of the density over x's bin [x, x + 1)^4 (pixel units), by
    Gauss-Legendre quadrature with `nodes` nodes per dimension."""
    t, w = (torch.from_numpy(a) for a in np.polynomial.legendre.leggauss(nodes))
    t, log_w = (t + 1) / 2, (w / 2).log()
    grid = torch.cartesian_prod(*[t] * 4)
    log_weights = torch.cartesian_prod(*[log_w] * 4).sum(-1)
    y = ((images.double().view(-1, 1, 4) + grid) / 256 * 2 - 1).view(-1, 1, 2, 2)
    with torch.no_grad():
        lp = torch.cat([model.log_prob(c) for c in y.split(65536)]).view(len(images), -1)
    return torch.logsumexp(lp + log_weights, dim=1) + PIXEL_LOG_JACOBIAN


def _bound(model: TarFlow, draws: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per toy image: the Monte Carlo mean of -log p(x + u) + log q(u | x), u ~ q, and its standard error."""
    g = torch.Generator().manual_seed(seed)
    x = TOY.repeat_interleave(draws, 0)
    with torch.no_grad():
        dq = dequantize(model.dequantizer, x, torch.rand(x.shape, generator=g, dtype=torch.float64))
        terms = (-(model.log_prob(dq.x) + PIXEL_LOG_JACOBIAN) + dq.log_q).view(len(TOY), draws)
    return terms.mean(1), terms.std(1) / math.sqrt(draws)


def test_the_bound_bounds_the_exact_discrete_likelihood_and_tightens_as_q_trains(toy_flow):
    model = copy.deepcopy(toy_flow)
    log_p = _log_p_bins(model, 6)
    check = slice(0, 256, 37)  # doubling the nodes changes nothing that matters
    assert (log_p[check] - _log_p_bins(model, 12, TOY[check])).abs().max() < 1e-6
    assert float(torch.logsumexp(log_p, 0)) < 0  # the bins hold part of the density's mass, not more
    uniform, se = _bound(model, 500, seed=2)  # q untrained: uniform dequantization
    assert (uniform >= -log_p - 3 * se).all(), (uniform + log_p).min()
    gap_uniform = float((uniform + log_p).mean())
    assert gap_uniform > 10 * float(se.mean()) / math.sqrt(len(TOY))  # the uniform bound is loose here
    # train q alone on the bound, the flow frozen
    q = model.dequantizer.requires_grad_(True)
    opt = torch.optim.Adam(q.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(4)
    x = TOY.repeat(2, 1, 1, 1)
    for _ in range(100):
        dq = dequantize(q, x, torch.rand(x.shape, generator=g, dtype=torch.float64))
        loss = (dq.log_q - model.log_prob(dq.x)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    trained, se = _bound(model.requires_grad_(False), 500, seed=3)
    assert (trained >= -log_p - 3 * se).all(), (trained + log_p).min()
    gap_trained = float((trained + log_p).mean())
    assert gap_trained < 0.7 * gap_uniform, (gap_trained, gap_uniform)


def test_bpd_scores_the_bound_and_the_uniform_figure_from_the_same_draws(toy_flow):
    model = copy.deepcopy(toy_flow)
    _randomise(model.dequantizer, scale=0.1)
    seeded = lambda: dict(generator=torch.Generator().manual_seed(7), samples=3)  # noqa: E731
    bound, uniform = bpd_figures(model, TOY, dequants=("variational", "uniform"), **seeded())
    assert torch.equal(bound, bpd(model, TOY, **seeded())) and torch.equal(
        uniform, bpd(model, TOY, dequant="uniform", **seeded())
    )
    g = torch.Generator().manual_seed(7)
    by_hand = torch.zeros(len(TOY), dtype=torch.float64)
    for _ in range(3):
        dq = dequantize(model.dequantizer, TOY, torch.rand(TOY.shape, generator=g).double())
        by_hand += flow.nats_to_bpd((dq.log_q - model.log_prob(dq.x)) / 4) / 3
    assert (bound - by_hand).abs().max() < 1e-5  # bpd sums the draws in float32, as it always has
    with pytest.raises(ValueError, match="learned q"):
        bpd(TarFlow(tiny_uniform_config()), torch.zeros(2, 1, 4, 4, dtype=torch.uint8), dequant="variational")


def tiny_uniform_config() -> ModelConfig:
    return ModelConfig(in_channels=1, img_size=4, patch_size=2, width=16, num_blocks=1, head_dim=8)


# ------------------------------------------------------------------------------ training


def test_the_training_loss_is_the_bound_and_q_trains_through_u():
    for nvp in (True, False):
        cfg = TrainConfig(
            width=32, head_dim=16, num_blocks=2, batch_size=8, lr=3e-3, warmup_steps=0, conditional=False,
            noise="variational", nvp=nvp,
        )  # fmt: skip
        stepper = _stepper(cfg, None)
        _randomise(stepper.model.dequantizer, scale=0.1)
        if not nvp:
            stepper.model.var.fill_(0.5)
        before, draws = copy.deepcopy(stepper.model), torch.Generator()
        draws.set_state(stepper.noise_gen.get_state())
        x, y = _batches(1, 8)[0]
        ok, metrics, _ = stepper(0, x, y)
        assert bool(ok)
        with torch.no_grad():
            dq = dequantize(before.dequantizer, x, torch.rand(x.shape, generator=draws).double())
            z, logdet = before(dq.x)
        assert abs(float(dq.log_q.mean())) / 64 > 1e-3  # log q is far from 0: the check below sees it
        # the loss weighs a VP model's z^2 by its variance (0.5 here): 0.5 z^2 / 0.5 = 0.5 z^2 + 0.5 z^2
        want = objective(z, logdet, 64) + dq.log_q.mean() / 64 + (0 if nvp else 0.5 * z.pow(2).mean())
        assert abs(float(metrics.loss) - float(want)) < 1e-5, (nvp, float(metrics.loss), float(want))
        if nvp:  # (a VP model's nll is read with the prior updated by the step)
            with torch.no_grad():
                bound = (dq.log_q - before.log_prob(dq.x)).mean() / 64  # in nats per dimension
            assert abs(float(metrics.nll) - float(bound)) < 1e-5, (float(metrics.nll), float(bound))
        q, q_before = stepper.model.dequantizer, before.dequantizer
        moved = [n for n, p in q.named_parameters() if not torch.equal(p, q_before.get_parameter(n))]
        assert len(moved) == len(list(q.parameters())), moved


@pytest.fixture(scope="module")
def variational_run(tmp_path_factory):
    """160 steps of a VP flow with a learned q on flat 8x8 images of 4 adjacent grey levels: the prior's
    variance soon shrinks to about a bin's width, so the density varies inside the bins and q has much
    to learn. A non-finite step injected at step 5, EMA off."""
    root = tmp_path_factory.mktemp("variational")
    level = LEVELS[torch.randint(0, 4, (240, 1, 1), generator=torch.Generator().manual_seed(0))]
    np.save(root / "levels.npy", level.expand(240, 8, 8).numpy().copy())

    def hook(step, x, y):
        return (x * float("nan"), y) if step == 5 else (x, y)

    cfg = tiny_cfg(
        root / "run", data=str(root / "levels.npy"), noise="variational", nvp=False, max_steps=160,
        eval_every=40, sample_every=0, checkpoint_every=80, log_every=40, eval_images=40,
    )  # fmt: skip
    result = train(cfg, batch_hook=hook)
    return root, result, list(read_events(root / "run" / "events.jsonl"))


def test_a_variational_run_reports_the_bound_and_the_uniform_figure(variational_run):
    root, result, events = variational_run
    assert result.status == "finished" and result.step == 160
    assert [e["step"] for e in events if e["kind"] == "warning"] == [6]  # the non-finite step, skipped
    evals = [e for e in events if e["kind"] == "eval"]
    assert [e["step"] for e in evals] == [40, 80, 120, 160]
    for e in evals:
        assert e["dequant"] == "variational" and math.isfinite(e["bpd"]) and math.isfinite(e["bpd_uniform"])
    assert evals[-1]["bpd"] < evals[-1]["bpd_uniform"] - 0.02, evals[-1]  # q learned where p varies in the bins
    trains = [e for e in events if e["kind"] == "train"]
    assert all(math.isfinite(e["bpd"]) for e in trains)
    start = events[0]
    assert (
        start["model"]["dequant"] == "variational"
        and start["parameters"] == TarFlow(ModelConfig.from_dict(start["model"])).num_parameters()
    )


def test_the_bound_starts_at_the_uniform_figure(variational_run):
    root, _, events = variational_run
    cfg = ModelConfig.from_dict(events[0]["model"])
    torch.manual_seed(0)
    fresh = TarFlow(cfg).eval()  # q as it starts: uniform
    x = torch.from_numpy(np.load(root / "levels.npy")[:32]).unsqueeze(1)
    bound, uniform = bpd_figures(
        fresh, x, dequants=("variational", "uniform"), generator=torch.Generator().manual_seed(0)
    )
    assert (bound - uniform).abs().max() < 1e-4, (bound - uniform).abs().max()


def test_a_variational_checkpoint_loads_q_exactly_and_old_ones_have_none(variational_run, tmp_path):
    _, result, _ = variational_run
    model, info = load_checkpoint(result.checkpoint)
    saved = weights(result.checkpoint)
    assert any(k.startswith("dequantizer.") for k in saved)
    for k, v in model.state_dict().items():
        assert torch.equal(v, saved[k]), k
    assert info.noise == {"type": "variational", "std": None} and model.config.dequant == "variational"
    assert model.config.num_parameters() == model.num_parameters()
    assert {k: tuple(v.shape) for k, v in saved.items()} == state_shapes(model.config)
    save_checkpoint(tmp_path / "again", model, noise=info.noise)  # and round trip
    again = load_model(tmp_path / "again")
    for k, v in model.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k


def test_samples_do_not_depend_on_q():
    """The same flow weights with and without a dequantizer (the flow's initialisation is the same
    function of the seed too) give the same samples."""
    plain_cfg = tiny_uniform_config()
    torch.manual_seed(3)
    plain = TarFlow(plain_cfg)
    torch.manual_seed(3)
    with_q = TarFlow(ModelConfig.from_dict({**plain_cfg.to_dict(), "dequant": "variational"}))
    flow_state = {k: v for k, v in with_q.state_dict().items() if not k.startswith("dequantizer.")}
    assert (
        all(torch.equal(v, flow_state[k]) for k, v in plain.state_dict().items())
        and flow_state.keys() == plain.state_dict().keys()
    )
    _randomise(plain, scale=0.15, seed=5)
    with_q.load_state_dict(plain.state_dict(), strict=False)
    _randomise(with_q.dequantizer, seed=6)
    a = generate(plain.eval(), 6, generator=torch.Generator().manual_seed(1))
    b = generate(with_q.eval(), 6, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a.images, b.images)


def test_resume_of_a_variational_run_is_exact(tmp_path):
    kw = dict(max_steps=12, nvp=False, ema=0.9, noise="variational", checkpoint_every=0, sample_every=0, eval_every=0)
    _, _, rest = assert_resume_is_exact(tmp_path, 5, **kw)
    assert any(k.startswith("dequantizer.") for k in weights(rest.checkpoint, "ema.safetensors"))


def test_a_bf16_variational_run_trains(tmp_path):
    result = train(
        tiny_cfg(
            tmp_path / "run",
            noise="variational",
            precision="bf16",
            max_steps=4,
            log_every=2,
            eval_every=4,
            sample_every=0,
        )
    )
    assert result.status == "finished"
    events = list(read_events(tmp_path / "run" / "events.jsonl"))
    assert all(math.isfinite(e["loss"]) for e in events if e["kind"] == "train")
    assert [e["dequant"] for e in events if e["kind"] == "eval"] == ["variational"]
