"""One optimisation step, and the metrics it leaves on the device.

The recipe is the reference's: Gaussian noise augmentation (or uniform dequantization for
likelihood runs), loss 0.5 * mean(z^2) - mean(logdet) / D, AdamW, label drop (-1) for
conditional runs, the VP prior update after each step, bf16 autocast when asked. A step whose
loss or gradient is not finite changes nothing (weights, optimizer, EMA, prior).

Variational dequantization (`--noise variational`) draws the same U[0, 1) numbers as uniform
dequantization and lets the model's q(u | x) turn them into u (reparameterised, so q trains with
the flow); the loss adds mean(log q) / D, making it the bound E_q[-log p(x + u) + log q(u | x)] / D
up to the prior's constant (a VP model's z^2 weighed by its learned variance, as the bound does), and
the metrics' nll is that bound.

With `--micro-batch` the step's batch goes through forward and backward in equal micro-batches, each
loss scaled by its share, so the gradients add up to the whole batch's; the random draws, the VP prior
and the metrics are those of the whole batch, so the step computes the same function (micro.py).

Metrics stay on the device (no host sync per step) and are read at log intervals."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from .. import flow
from ..config import ModelConfig, TrainConfig
from ..dist import DistInfo, all_reduce_mean, all_reduce_sum
from ..ema import EMA
from ..model import TarFlow
from .schedule import Schedule

# (step, x, labels) -> (x, labels): x is the flow's input, or with --noise variational the U[0, 1) draws
BatchHook = Callable[[int, torch.Tensor, torch.Tensor | None], tuple[torch.Tensor, torch.Tensor | None]]


def objective(
    z: torch.Tensor,
    logdet: torch.Tensor,
    data_dim: int,
    log_q: torch.Tensor | None = None,
    var: torch.Tensor | None = None,
) -> torch.Tensor:
    """The reference's loss: 0.5 * mean(z^2) - mean(logdet) / D (nats per dimension, up to constants);
    with variational dequantization plus mean(log q(u | x)) / D, and for VP models z^2 / var (`var`)."""
    prior = z.float().pow(2) if var is None else z.float().pow(2) / var
    loss = 0.5 * prior.mean() - (logdet.float() / data_dim).mean()
    return loss if log_q is None else loss + (log_q.float() / data_dim).mean()


class Augmented(NamedTuple):
    """A batch ready for the forward: `x` the flow's input, or (variational) the U[0, 1) draws that q
    turns into u for the 8-bit `pixels`; the (dropped) labels."""

    x: torch.Tensor
    labels: torch.Tensor | None
    pixels: torch.Tensor | None  # variational dequantization only

    def split(self, size: int) -> list[Augmented]:
        """Micro-batches of `size` images."""
        xs = self.x.split(size)
        ys = self.labels.split(size) if self.labels is not None else [None] * len(xs)
        ps = self.pixels.split(size) if self.pixels is not None else [None] * len(xs)
        return [Augmented(*parts) for parts in zip(xs, ys, ps)]


class Forward(NamedTuple):
    z: torch.Tensor
    logdet: torch.Tensor
    log_q: torch.Tensor | None  # nats per image; None: no learned dequantization


class StepMetrics(NamedTuple):
    """What one step measured (0-d tensors on the device), or an interval's means (floats)."""

    loss: torch.Tensor | float
    nll: torch.Tensor | float  # nats per dimension, the prior's constant included
    logdet: torch.Tensor | float  # per dimension
    grad_norm: torch.Tensor | float  # before clipping


class MetricSums:
    """Sums of the good steps' metrics over a log interval, and the non-finite step counters, all
    on the device: adding is asynchronous, `take()` reads (one host sync per interval)."""

    def __init__(self, device: torch.device, bad_run: int) -> None:
        self.sums = torch.zeros(len(StepMetrics._fields) + 1, device=device)  # the metrics, then the step count
        self.bad_in_interval = torch.zeros((), device=device)
        self.bad_run = torch.full((), float(bad_run), device=device)  # consecutive non-finite steps

    def add(self, metrics: StepMetrics, ok: torch.Tensor) -> None:
        vals = torch.stack([*metrics, torch.ones((), device=ok.device)])
        self.sums += torch.where(ok, vals, torch.zeros_like(vals)).nan_to_num(0.0)
        bad = (~ok).float()
        self.bad_in_interval += bad
        self.bad_run = (self.bad_run + 1) * bad

    def take(self, d: DistInfo) -> StepMetrics | None:
        """The interval's means over all ranks (None when every step was skipped); starts a new interval."""
        *sums, count = all_reduce_sum(self.sums.clone(), d).tolist()
        self.sums.zero_()
        self.bad_in_interval.zero_()
        return StepMetrics(*(v / count for v in sums)) if count > 0 else None


@dataclass
class Stepper:
    """The optimisation step. With the fused AdamW a skipped step is decided on the device (no host
    sync: `found_inf` and gated updates); else on the host."""

    cfg: TrainConfig
    model_cfg: ModelConfig
    d: DistInfo
    model: TarFlow
    forward: Callable  # the model (variational: in a DequantizingFlow), maybe wrapped in DDP and/or torch.compile
    optimizer: torch.optim.Optimizer
    ema: EMA | None
    noise_gen: torch.Generator
    schedule: Schedule
    fused: bool
    autocast_dtype: torch.dtype | None
    batch_hook: BatchHook | None = None
    micro_batch: int | None = None  # images per forward/backward; None: the whole per-process batch
    no_sync: Callable[[], Any] | None = None  # DDP's no_sync: no gradient all-reduce in that backward

    def augment(self, x_u8: torch.Tensor, y: torch.Tensor) -> Augmented:
        """uint8 batch -> noisy model-space input (variational: the U[0, 1) draws and the pixels) and
        (dropped) labels. The random draws are for the global batch, from a generator every rank holds
        identically; each rank keeps its share."""
        cfg, device, gen = self.cfg, self.d.device, self.noise_gen
        x = x_u8.to(device, non_blocking=True)
        shape = (cfg.batch_size, *x.shape[1:])
        r, w = self.d.rank, self.d.world_size
        pixels = None
        if cfg.noise == "uniform":
            u = torch.rand(shape, generator=gen, device=device)[r::w]
            xf = (x.float() + u) / 256 * 2 - 1
        elif cfg.noise == "variational":  # the uniform run's draws; q makes u of them in the forward
            xf, pixels = torch.rand(shape, generator=gen, device=device)[r::w], x
        else:
            eps = torch.randn(shape, generator=gen, device=device)[r::w]
            xf = flow.uint8_to_model(x) + cfg.noise_std * eps
        labels = None
        if self.model_cfg.conditional:
            labels = y.to(device, non_blocking=True).long()
            if cfg.label_drop > 0:
                drop = torch.rand(cfg.batch_size, generator=gen, device=device)[r::w] < cfg.label_drop
                labels = torch.where(drop, torch.full_like(labels, -1), labels)
        return Augmented(xf, labels, pixels)

    def __call__(self, step: int, x_u8: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, StepMetrics, float]:
        """Step with 0-based index `step`: (the on-device `ok` flag, the metrics, the learning rate)."""
        batch = self.augment(x_u8, y)
        if self.batch_hook is not None:
            x, labels = self.batch_hook(step, batch.x, batch.labels)
            batch = batch._replace(x=x, labels=labels)
        lr = self.schedule.at(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if self.micro_batch is None or self.micro_batch >= batch.x.shape[0]:
            out = self._forward(batch)
            loss = self._objective(out)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
        else:
            out, loss = self._accumulate(batch)
        grad_norm = self._grad_norm()
        ok = torch.isfinite(loss) & torch.isfinite(grad_norm)
        self._update(out.z, ok)
        return ok, self._metrics(out, loss, grad_norm), lr

    def _objective(self, out: Forward) -> torch.Tensor:
        # a VP model's prior N(0, var) learns its variance apart from the loss: the reference's loss drops
        # it, but the bound that trains q must weigh z^2 by it, or q would see the flow's density scaled by var
        var = self.model.var if out.log_q is not None and not self.model_cfg.nvp else None
        return objective(out.z, out.logdet, self.model_cfg.data_dim, out.log_q, var)

    def _forward(self, batch: Augmented) -> Forward:
        dtype = self.autocast_dtype
        with torch.autocast(self.d.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            if batch.pixels is None:
                z, logdet = self.forward(batch.x, batch.labels)
                log_q = None
            else:  # q runs without autocast inside (dequant.DequantizingFlow)
                z, logdet, log_q = self.forward(batch.pixels, batch.x, batch.labels)
        return Forward(z.float(), logdet, log_q)

    def _accumulate(self, batch: Augmented) -> tuple[Forward, torch.Tensor]:
        """Gradient accumulation: the batch in micro-batches of `micro_batch` images (equal sizes), each
        micro-batch's loss scaled by its share, so the summed gradient is the whole batch's. DDP
        all-reduces only in the last backward. The whole batch's forward (detached) and its loss."""
        parts = batch.split(self.micro_batch)
        outs = []
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            with contextlib.nullcontext() if last or self.no_sync is None else self.no_sync():
                out = self._forward(part)
                loss = self._objective(out) * (part.x.shape[0] / batch.x.shape[0])
                if i == 0:  # as in the unsplit step: the last step's gradients are freed after the forward
                    self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
            outs.append(Forward(*(t.detach() if t is not None else None for t in out)))
        log_q = torch.cat([o.log_q for o in outs]) if outs[0].log_q is not None else None
        out = Forward(torch.cat([o.z for o in outs]), torch.cat([o.logdet for o in outs]), log_q)
        with torch.no_grad():  # the whole batch's loss, as the metrics and the finiteness check see it
            return out, self._objective(out)

    def _grad_norm(self) -> torch.Tensor:
        """The global gradient norm, after clipping the gradients to `--grad-clip` when set."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        if self.cfg.grad_clip_value:
            return torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip_value, foreach=True)
        return torch.linalg.vector_norm(torch.stack(torch._foreach_norm([p.grad for p in params])))

    def _update(self, z: torch.Tensor, ok: torch.Tensor) -> None:
        # Skipped steps change nothing. Fused: skip on the device (no host sync); else on the host.
        # VP prior: running mean of z^2 per token and dim over the global batch; every rank joins
        # its all-reduce, also on a skipped step, and the gate then leaves `var` as it is.
        ok_host = None if self.fused else bool(ok)
        if self.fused:
            self.optimizer.found_inf = (~ok).float()
            self.optimizer.step()
        elif ok_host:
            self.optimizer.step()
        if not self.model_cfg.nvp:
            self.model.update_prior(z, reduce=lambda t: all_reduce_mean(t, self.d), gate=None if ok_host else ok)
        if self.ema is not None:
            if self.fused:
                self.ema.update(self.model, gate=ok)
            elif ok_host:
                self.ema.update(self.model)

    @torch.no_grad()
    def _metrics(self, out: Forward, loss, grad_norm) -> StepMetrics:
        """nll: -log p(x) / D of the noisy input, or with variational dequantization the bound's
        (-log p(x + u) + log q(u | x)) / D; the loss holds log q already (and a VP model's z^2 / var)."""
        z, logdet = out.z, out.logdet
        logdet_pd = (logdet.float() / self.model_cfg.data_dim).mean()
        if self.model_cfg.nvp:
            nll = loss + 0.5 * flow.LOG_2PI
        else:
            var = self.model.var
            nll = 0.5 * (z.detach().pow(2) / var).mean() + 0.5 * torch.log(var).mean() + 0.5 * flow.LOG_2PI - logdet_pd
            if out.log_q is not None:
                nll = nll + (out.log_q.float() / self.model_cfg.data_dim).mean()
        return StepMetrics(loss.detach(), nll.detach(), logdet_pd, grad_norm.detach().float())
