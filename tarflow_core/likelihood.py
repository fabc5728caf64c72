"""Exact densities: log p(x), nats and bits per dimension, Bayes classification, denoising."""

from __future__ import annotations

import torch

from . import flow, inputs
from .model import TarFlow


def log_prob(model: TarFlow, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    """log p(x) in nats per sample: prior N(0, var) of z plus every block's log-determinant."""
    return model.log_prob(x, y)


def nll(model: TarFlow, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    """-log p(x) / D in nats per dimension, D = C * H * W."""
    return -log_prob(model, x, y) / model.config.data_dim


def bpd(
    model: TarFlow,
    x_uint8: torch.Tensor,
    y: torch.Tensor | None = None,
    *,
    generator: torch.Generator | None = None,
    samples: int = 1,
) -> torch.Tensor:
    """Bits per dimension of 8-bit images with uniform dequantization (mean over `samples` draws)."""
    inputs.uint8_images(x_uint8)
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples must be a whole number >= 1 (got {samples!r})")
    total = torch.zeros(x_uint8.shape[0], device=x_uint8.device)
    for _ in range(samples):
        x = flow.dequantize_uniform(x_uint8, generator=generator).to(model.var.dtype)
        total += flow.nats_to_bpd(nll(model, x, y)).to(total)  # scored on the model's device
    return total / samples


def class_log_likelihoods(model: TarFlow, x: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """log p(x | y=k) for every class k, (B, K), scoring all classes as batched passes."""
    K = model.config.num_classes
    if K == 0:
        raise ValueError("classification needs a class-conditional model")
    B = x.shape[0]
    xs = x.unsqueeze(0).expand(K, *x.shape).reshape(K * B, *x.shape[1:])
    ys = torch.arange(K, device=x.device).repeat_interleave(B)
    parts = [log_prob(model, xs[i : i + chunk], ys[i : i + chunk]) for i in range(0, K * B, chunk)]
    return torch.cat(parts).view(K, B).t()


def classify(model: TarFlow, x: torch.Tensor, log_prior: torch.Tensor | None = None) -> torch.Tensor:
    """Posterior log p(y | x) over classes by Bayes' rule (uniform prior unless given), (B, K)."""
    ll = class_log_likelihoods(model, x)
    if log_prior is not None:
        ll = ll + log_prior.to(ll)
    return torch.log_softmax(ll, dim=1)


def denoise(
    model: TarFlow, x: torch.Tensor, y: torch.Tensor | None = None, *, sigma: float, lr_scale: float = 1.0
) -> torch.Tensor:
    """One score step: x + lr_scale * sigma^2 * grad_x log p(x) (Tweedie's formula at lr_scale 1)."""
    inputs.check_denoise_step(sigma, lr_scale)
    with torch.inference_mode(False), torch.enable_grad():
        xg = inputs.images(model, x).detach().clone().requires_grad_(True)
        y = inputs.labels(model, y, xg.shape[0], check=False)  # log_prob checks the range
        y = y.clone() if y is not None else None  # an inference tensor cannot enter autograd
        (grad,) = torch.autograd.grad(log_prob(model, xg, y).sum(), xg)
    return (xg + (lr_scale * sigma**2) * grad).detach()
