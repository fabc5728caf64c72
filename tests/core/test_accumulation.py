"""Gradient accumulation (--micro-batch): K micro-batches are one step on the whole batch (float64),
the default path is today's step, resume stays exact, and the run reports what it split."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tarflow_core.config import ConfigError, TrainConfig
from tarflow_core.dequant import DequantizingFlow
from tarflow_core.dist import DistInfo
from tarflow_core.events import read_events
from tarflow_core.model import TarFlow
from tarflow_core.train import Schedule, SetupError, load_run_config, train
from tarflow_core.train.micro import largest_divisor, micro_batch_for
from tarflow_core.train.step import Stepper

from .test_train import assert_resume_is_exact, assert_same_weights, tiny_cfg, weights


def _stepper(cfg: TrainConfig, micro: int | None, dtype=torch.float64) -> Stepper:
    """A Stepper on a float64 model, as the trainer builds one (same seeds: same weights and draws)."""
    model_cfg = cfg.model_config(1, 8, 10)
    torch.manual_seed(cfg.seed)
    model = TarFlow(model_cfg).to(dtype)
    model.set_checkpointing(cfg.checkpointing)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.min_lr, betas=(cfg.beta1, cfg.beta2), weight_decay=0.1)
    return Stepper(
        cfg=cfg,
        model_cfg=model_cfg,
        d=DistInfo(),
        model=model,
        forward=model if model.dequantizer is None else DequantizingFlow(model),  # as the trainer wraps it
        optimizer=optimizer,
        ema=None,
        noise_gen=torch.Generator().manual_seed(cfg.seed + 1),
        schedule=Schedule.for_run(cfg, 10),
        fused=False,
        autocast_dtype=None,
        micro_batch=micro,
    )


def _batches(n: int, size: int):
    g = torch.Generator().manual_seed(5)
    return [
        (
            torch.randint(0, 256, (size, 1, 8, 8), generator=g, dtype=torch.uint8),
            torch.randint(0, 10, (size,), generator=g),
        )
        for _ in range(n)
    ]


@pytest.mark.parametrize(
    "kw",
    [
        dict(),  # affine (NVP) blocks, Gaussian noise, label drop
        dict(nvp=False, noise="uniform", grad_clip=0.05),  # VP prior update, uniform dequantization, clipping
        dict(conditional=False, checkpointing="blocks"),
        dict(noise="variational"),  # q's draws, log q and its gradients split too
        dict(nvp=False, noise="variational", conditional=False),
    ],
)
def test_accumulated_micro_batches_are_one_step_on_the_whole_batch(kw):
    """float64: 4 micro-batches of 3 == one step on 12 images (weights, prior, metrics, draws) over 3 steps."""
    cfg = TrainConfig(
        width=32, head_dim=16, num_blocks=2, layers_per_block=2, batch_size=12, lr=3e-3, warmup_steps=0, **kw
    )
    whole, split = _stepper(cfg, None), _stepper(cfg, 3)
    for step, (x, y) in enumerate(_batches(3, 12)):
        ok_a, ma, _ = whole(step, x, y)
        ok_b, mb, _ = split(step, x, y)
        assert bool(ok_a) and bool(ok_b)
        for name, a, b in zip(ma._fields, ma, mb):
            assert abs(float(a) - float(b)) < 1e-12, (name, float(a), float(b))
    a, b = whole.model.state_dict(), split.model.state_dict()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < 1e-12, worst
    assert torch.equal(whole.noise_gen.get_state(), split.noise_gen.get_state())  # the same draws
    if not cfg.nvp:
        assert not torch.equal(a["var"], torch.ones_like(a["var"]))  # the prior did move, equally


def test_micro_batch_equal_to_the_share_is_todays_run_bit_for_bit(tmp_path):
    kw = dict(max_steps=6, nvp=False, ema=0.9, checkpoint_every=3, eval_every=3, sample_every=0, log_every=3)
    today = train(tiny_cfg(tmp_path / "a", **kw))
    same = train(tiny_cfg(tmp_path / "b", micro_batch=16, **kw))
    assert_same_weights(weights(today.checkpoint), weights(same.checkpoint))
    split = train(tiny_cfg(tmp_path / "c", micro_batch=4, **kw))
    a, c = weights(today.checkpoint), weights(split.checkpoint)
    for k in a:  # float32: the sums are ordered differently, nothing more
        torch.testing.assert_close(a[k], c[k], rtol=1e-4, atol=1e-5, msg=k)
    starts = [
        next(e for e in read_events(p / "events.jsonl") if e["kind"] == "start")
        for p in (tmp_path / "a", tmp_path / "c")
    ]
    assert [(s["micro_batch"], s["accumulation"], s["global_batch"]) for s in starts] == [(16, 1, 16), (4, 4, 16)]
    assert starts[1]["checkpointing"] == "off" and starts[1]["environment"]["tf32"] is False


def test_resume_with_micro_batches_is_exact(tmp_path):
    kw = dict(max_steps=8, micro_batch=8, nvp=False, noise="uniform", checkpoint_every=0, sample_every=0, eval_every=0)
    assert_resume_is_exact(tmp_path, 3, **kw)


def test_micro_batch_must_divide_each_process_share(tmp_path):
    with pytest.raises(SetupError, match=r"--micro-batch 5 must divide .*--batch-size 16 \(16 images\), e\.g\. 4"):
        train(tiny_cfg(tmp_path / "a", micro_batch=5))
    assert not (tmp_path / "a").exists()
    with pytest.raises(ConfigError, match="--micro-batch must be a positive integer or 'auto'"):
        TrainConfig(micro_batch=0)
    with pytest.raises(ConfigError, match="--checkpointing must be one of off, blocks, layers"):
        TrainConfig(checkpointing="some")
    two = DistInfo(0, 2, 0, torch.device("cpu"), "gloo")
    with pytest.raises(ConfigError, match=r"\(8 images over 2 processes\)"):
        micro_batch_for(TrainConfig(batch_size=16, micro_batch=3), None, two, "fp32", lambda n: True)
    assert [largest_divisor(12, k) for k in (1, 5, 12, 40)] == [1, 4, 12, 12]


def test_auto_off_cuda_is_the_whole_share_and_may_change_on_resume(tmp_path):
    cfg = TrainConfig(batch_size=16, micro_batch="auto")
    micro = micro_batch_for(cfg, cfg.model_config(1, 8, 10), DistInfo(), "fp32", lambda n: pytest.fail("no probe"))
    assert (micro.size, micro.steps) == (16, 1)
    kw = dict(max_steps=4, checkpoint_every=0, sample_every=0, eval_every=0)
    train(tiny_cfg(tmp_path / "a", **kw))
    resumed = dataclasses.replace(load_run_config(tmp_path / "a"), max_steps=6, micro_batch=4, checkpointing="layers")
    assert train(resumed, resume=True).status == "finished"
    events = list(read_events(tmp_path / "a" / "events.jsonl"))
    start = [e for e in events if e["kind"] == "start"][-1]
    assert (start["micro_batch"], start["accumulation"], start["checkpointing"]) == (4, 4, "layers")
    told = [e["message"] for e in events if e["kind"] == "warning" and e.get("reason") == "settings"]
    assert len(told) == 1 and "--micro-batch None -> 4" in told[0]  # the sums are ordered otherwise from here


def test_only_the_last_micro_step_synchronises_gradients():
    """DDP's `no_sync` wraps every micro-batch's backward but the last (which all-reduces the sum)."""
    import contextlib

    cfg = TrainConfig(width=32, head_dim=16, num_blocks=2, layers_per_block=1, batch_size=12)
    entered = []

    @contextlib.contextmanager
    def no_sync():
        entered.append(1)
        yield

    stepper = dataclasses.replace(_stepper(cfg, 3), no_sync=no_sync)
    for step, (x, y) in enumerate(_batches(2, 12)):
        stepper(step, x, y)
    assert len(entered) == 2 * 3


def test_auto_on_cuda_takes_the_plan_figure_confirmed_by_a_probe(monkeypatch):
    """CUDA without a GPU here: the device's memory faked, probes faked. The plan's largest divisor of the
    share first; a probe that runs out of memory steps down to the next divisor; none fits: one sentence."""
    from types import SimpleNamespace

    from tarflow_core import memory
    from tarflow_core.train import micro

    total = 8 * memory.GiB
    monkeypatch.setattr(micro.torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=total))
    cfg = TrainConfig(width=256, head_dim=64, num_blocks=4, layers_per_block=4, batch_size=4096, micro_batch="auto")
    model_cfg = cfg.model_config(3, 64, 0)
    cuda = DistInfo(device=torch.device("cuda", 0))
    fits = memory.largest_micro_batch(
        total, model_cfg, precision="bf16", checkpointing="off", world=1, accumulating=True, ema=False
    )
    assert 1 < fits < 4096
    tried = []
    chosen = micro_batch_for(cfg, model_cfg, cuda, "bf16", lambda n: tried.append(n) or True)
    assert tried == [largest_divisor(4096, fits)] and (chosen.size, chosen.steps) == (tried[0], 4096 // tried[0])
    assert "a probe step confirmed it" in chosen.note and chosen.planned_peak <= total
    tried.clear()
    chosen = micro_batch_for(cfg, model_cfg, cuda, "bf16", lambda n: tried.append(n) or n < tried[0])
    assert chosen.size == tried[1] == largest_divisor(4096, tried[0] - 1)
    with pytest.raises(ConfigError, match=r"--micro-batch auto: no micro-batch of up to \d+ images fitted"):
        micro_batch_for(cfg, model_cfg, cuda, "bf16", lambda n: False)


def test_a_probe_step_leaves_the_run_as_it_was(monkeypatch):
    from tarflow_core.train.micro import probe_step

    cfg = TrainConfig(width=32, head_dim=16, num_blocks=2, layers_per_block=1)
    model = TarFlow(cfg.model_config(1, 8, 10))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    assert probe_step(model, 4, None) is True
    assert all(p.grad is None for p in model.parameters()) and torch.equal(rng, torch.get_rng_state())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())

    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(model, "forward", oom)
    assert probe_step(model, 4, None) is False
