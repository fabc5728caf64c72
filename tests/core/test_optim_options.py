"""The optimisation options: --weight-decay-on, --adam-eps, --ema-warmup and --zero-init; each leaves
today's run bit-identical at its default and resumes exactly when set."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch

from tarflow_core.config import TrainConfig
from tarflow_core.dist import DistInfo
from tarflow_core.ema import EMA
from tarflow_core.model import TarFlow
from tarflow_core.train import Schedule, train
from tarflow_core.train.parts import build_model
from tarflow_core.train.step import Stepper

from .test_accumulation import _batches
from .test_train import assert_resume_is_exact, assert_same_weights, tiny_cfg, weights

SMALL = dict(width=32, head_dim=16, num_blocks=2, layers_per_block=2, batch_size=8, lr=3e-3, warmup_steps=0)
ALL_FOUR = dict(decay_params="matrices", adam_eps=1e-6, ema=0.99, ema_warmup=8, zero_init_residual=True)
# the weights of the linear layers (in/out projections, attention qkv and proj, MLP) and the dequantizer's
# convolutions; nothing else (norms, biases, pos_embed, class_embed)
DECAYED = re.compile(
    r"blocks\.\d+\.(proj_in|proj_out|attn_blocks\.\d+\.(attention\.(qkv|proj)|mlp\.main\.[02]))\.weight"
    r"|dequantizer\.(context\.[02]|couplings\.\d+\.net\.[02])\.weight"
)


def _built(dequant: str = "uniform", **kw):
    cfg = TrainConfig(**SMALL, **kw)
    model_cfg = cfg.model_config(1, 8, 10)
    if dequant != "uniform":  # the model side of variational dequantization: its convolutions are matrices too
        model_cfg = dataclasses.replace(model_cfg, dequant=dequant, dequant_width=8, dequant_layers=2)
    return cfg, build_model(cfg, model_cfg, DistInfo())


def _group_names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[set[str]]:
    name = {id(p): n for n, p in model.named_parameters()}
    return [{name[id(p)] for p in g["params"]} for g in optimizer.param_groups]


# ------------------------------------------------------------------------------ weight decay, eps


@pytest.mark.parametrize("dequant", ["uniform", "variational"])
def test_decay_on_matrices_is_exactly_the_linear_and_conv_weights(dequant):
    cfg, built = _built(dequant, decay_params="matrices", weight_decay=0.1)
    decayed, kept = _group_names(built.model, built.optimizer)
    assert decayed and kept and decayed | kept == {n for n, _ in built.model.named_parameters()}
    assert decayed == {n for n, _ in built.model.named_parameters() if DECAYED.fullmatch(n)}
    assert any(".pos_embed" in n for n in kept) and any(".class_embed" in n for n in kept)
    assert [g["weight_decay"] for g in built.optimizer.param_groups] == [0.1, 0.0]


@pytest.mark.parametrize("fused", [False, True])
def test_a_step_on_zero_gradients_shrinks_only_the_decayed_weights(fused, monkeypatch):
    """lr > 0, every gradient 0: Adam's own update is 0, so what moves is the decay, p * (1 - lr * wd),
    on the matrices only; fused, a step flagged non-finite (found_inf) moves nothing at all."""
    if fused:
        monkeypatch.setenv("TARFLOW_FUSED_ADAMW", "1")
    cfg, built = _built(decay_params="matrices", weight_decay=0.1)
    model, opt = built.model, built.optimizer
    assert built.fused == fused
    for g in opt.param_groups:
        g["lr"] = 0.5
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    if fused:
        opt.found_inf = torch.ones(())
        opt.step()
        assert_same_weights(before, dict(model.named_parameters()))
        opt.found_inf = torch.zeros(())
    opt.step()
    for n, p in model.named_parameters():
        if DECAYED.fullmatch(n):
            torch.testing.assert_close(p, before[n] * (1 - 0.5 * 0.1), rtol=1e-6, atol=0, msg=n)
            assert not torch.equal(p, before[n]) or not before[n].any(), n  # proj_out starts at 0
        else:
            assert torch.equal(p, before[n]), n


def test_adam_eps_reaches_every_group_and_the_defaults_are_todays_optimizer():
    _, built = _built(decay_params="matrices", adam_eps=1e-5)
    assert [g["eps"] for g in built.optimizer.param_groups] == [1e-5, 1e-5]
    cfg, built = _built()
    [group] = built.optimizer.param_groups
    assert group["eps"] == 1e-8 and group["weight_decay"] == cfg.weight_decay
    assert [id(p) for p in group["params"]] == [id(p) for p in built.model.parameters()]


class _LegacyEMA(EMA):
    """The EMA as it was before --ema-warmup: the decay ramp min(decay, (1 + n) / (10 + n))."""

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))


def test_the_default_options_train_bit_identically_to_the_optimizer_and_ema_of_before():
    """20 steps with EMA: the trainer's parts at the defaults == AdamW over model.parameters() (torch's eps)
    and the earlier EMA ramp, bit for bit (weights, EMA, optimizer state)."""
    cfg, built = _built(ema=0.9)
    torch.manual_seed(cfg.seed)
    model = TarFlow(cfg.model_config(1, 8, 10))
    opt = torch.optim.AdamW(
        model.parameters(), lr=cfg.min_lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay
    )
    old = (model, opt, _LegacyEMA(model, 0.9))
    new = (built.model, built.optimizer, built.ema)
    steppers = [_stepper(cfg, *parts) for parts in (old, new)]
    for step, (x, y) in enumerate(_batches(20, cfg.batch_size)):
        for s in steppers:
            assert bool(s(step, x, y)[0])
    assert_same_weights(old[0].state_dict(), new[0].state_dict())
    assert_same_weights(old[2].state_dict(), new[2].state_dict())
    a, b = old[1].state_dict(), new[1].state_dict()
    assert a["param_groups"] == b["param_groups"]
    for i in a["state"]:
        assert_same_weights(a["state"][i], b["state"][i])


def _stepper(cfg: TrainConfig, model, optimizer, ema) -> Stepper:
    return Stepper(
        cfg=cfg,
        model_cfg=model.config,
        d=DistInfo(),
        model=model,
        forward=model,
        optimizer=optimizer,
        ema=ema,
        noise_gen=torch.Generator().manual_seed(cfg.seed + 1),
        schedule=Schedule.for_run(cfg, 10),
        fused=False,
        autocast_dtype=None,
    )


# ----------------------------------------------------------------------------------- EMA warm-up


def test_ema_warmup_reaches_the_decay_at_update_n_and_not_before():
    ema = EMA(torch.nn.Linear(2, 2), 0.999, warmup=500)
    decays = []
    for n in range(601):
        ema.updates = n
        decays.append(ema.current_decay())
    assert decays[0] == 0.0  # the first update copies the weights
    assert all(a < b for a, b in zip(decays[:501], decays[1:501]))
    assert max(decays[:500]) < 0.999 and decays[500:] == [0.999] * 101
    for n in (1, 100, 250, 499):  # the averaging window 1 / (1 - d) grows linearly, 1 -> 1000
        assert 1 / (1 - decays[n]) == pytest.approx(1 + n * 999 / 500, rel=1e-9)


def test_without_warmup_the_ramp_is_the_earlier_one():
    ema = EMA(torch.nn.Linear(2, 2), 0.999)
    for n in (0, 1, 9, 1500, 8990, 8991, 20_000):
        ema.updates = n
        assert ema.current_decay() == min(0.999, (1 + n) / (10 + n))


def test_the_first_warmed_up_update_copies_the_weights():
    model = torch.nn.Linear(3, 3)
    ema = EMA(model, 0.99, warmup=10)
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    assert torch.equal(ema.shadow["weight"], model.weight)


# ------------------------------------------------------------------------------------- zero-init


def test_zero_init_makes_every_branch_zero_and_each_layer_the_identity():
    _, plain = _built()
    _, zeroed = _built(zero_init_residual=True)
    _, again = _built(zero_init_residual=True)
    assert_same_weights(zeroed.model.state_dict(), again.model.state_dict())  # no random numbers used
    h = torch.randn(3, 16, 32)
    for block, plain_block in zip(zeroed.model.blocks, plain.model.blocks):
        assert not plain_block.proj_out.weight.any()  # the published init already zeroes the head's weight
        for layer in block.attn_blocks:
            assert not layer.attention(h).any() and not layer.mlp(h).any()
            assert torch.equal(layer(h), h)
    a, b = plain.model.state_dict(), zeroed.model.state_dict()
    outs = re.compile(r".*\.(attention\.proj|mlp\.main\.2)\.(weight|bias)")
    assert all(torch.equal(a[k], b[k]) for k in a if not outs.fullmatch(k))  # the rest: today's init
    assert all(a[k].any() and not b[k].any() for k in a if outs.fullmatch(k))


# ------------------------------------------------------------------------------------ in a run


def test_a_run_with_all_four_set_resumes_bit_exactly(tmp_path):
    """Two AdamW groups, eps, the EMA warm-up (its update count) and zero-init through stop + resume; the
    zero-initialised branches did learn."""
    kw = dict(max_steps=12, checkpoint_every=0, sample_every=0, eval_every=0, **ALL_FOUR)
    straight, _, rest = assert_resume_is_exact(tmp_path, 5, **kw)
    a, b = (torch.load(r.checkpoint / "train_state.pt", weights_only=True) for r in (straight, rest))
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"] and len(a["optimizer"]["param_groups"]) == 2
    assert a["ema_updates"] == b["ema_updates"] == 12
    for i in a["optimizer"]["state"]:
        assert_same_weights(a["optimizer"]["state"][i], b["optimizer"]["state"][i])
    w = weights(rest.checkpoint)
    assert all(w[k].any() for k in w if k.endswith(("attention.proj.weight", "mlp.main.2.weight")))


def test_fused_skipped_steps_leave_the_zero_initialised_model_as_built(tmp_path, monkeypatch):
    """The fused AdamW path with two groups, gated by found_inf: non-finite steps change nothing."""
    monkeypatch.setenv("TARFLOW_FUSED_ADAMW", "1")
    kw = dict(max_steps=3, log_every=3, max_bad_steps=100, checkpoint_every=0, sample_every=0, eval_every=0)
    cfg = tiny_cfg(tmp_path / "run", **kw, **ALL_FOUR)
    nan = lambda step, x, y: (x * float("nan"), y)  # noqa: E731
    result = train(cfg, batch_hook=nan)
    assert result.status == "finished"
    fresh = build_model(cfg, cfg.model_config(1, 8, 10), DistInfo()).model.state_dict()
    assert_same_weights(weights(result.checkpoint), fresh)
    assert_same_weights(weights(result.checkpoint, "ema.safetensors"), fresh)
