"""Exact densities: log p(x), nats and bits per dimension (the variational bound for models with a
learned dequantization q(u | x)), Bayes classification, denoising."""

from __future__ import annotations

from collections.abc import Callable

import torch

from . import flow, inputs
from .chunking import denoising_bytes_per_row, rows_per_pass, scoring_bytes_per_row, spans
from .config import ModelConfig
from .dequant import dequantize, dequantize_unautocast
from .model import TarFlow

DEQUANTIZATIONS = ("uniform", "variational")

# (image, class) pairs per classification pass unless memory or `max_batch` asks for fewer
CLASSIFY_ROWS = 4096


def log_prob(model: TarFlow, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    """log p(x) in nats per sample: prior N(0, var) of z plus every block's log-determinant."""
    return model.log_prob(x, y)


def pass_rows(model: TarFlow, rows: int, max_batch: int | None, per_row: Callable[[ModelConfig, int], int]) -> int:
    """The rows one pass over `model` holds (`chunking.rows_per_pass`), `per_row` bytes each."""
    per_row_bytes = per_row(model.config, model.var.element_size())
    return rows_per_pass(rows, per_row_bytes=per_row_bytes, max_batch=max_batch, device=model.var.device)


def nll(
    model: TarFlow, x: torch.Tensor, y: torch.Tensor | None = None, *, max_batch: int | None = None
) -> torch.Tensor:
    """-log p(x) / D in nats per dimension, D = C * H * W; scored in passes of at most `max_batch`
    images (and on CUDA of what the free memory holds; see `chunking`). A plain tensor: scoring keeps
    no autograd graph (differentiate `log_prob` for gradients)."""
    x = inputs.images(model, x)
    with torch.no_grad():
        return _nll(model, x, y, max_batch)


def _nll(model: TarFlow, x: torch.Tensor, y, max_batch: int | None) -> torch.Tensor:
    size = pass_rows(model, x.shape[0], max_batch, scoring_bytes_per_row)
    if size >= x.shape[0]:
        return -log_prob(model, x, y) / model.config.data_dim
    y = inputs.labels(model, y, x.shape[0])
    parts = [log_prob(model, x[a:b], y[a:b] if y is not None else None) for a, b in spans(x.shape[0], size)]
    return -torch.cat(parts) / model.config.data_dim


def dequantization(model: TarFlow, asked: str | None = None) -> str:
    """How 8-bit images are scored: `asked` ("uniform" or "variational"), else the model's own:
    "variational" when it has a learned q(u | x) (trained with --noise variational), else "uniform"."""
    if asked is None:
        return "uniform" if model.dequantizer is None else "variational"
    if asked not in DEQUANTIZATIONS:
        raise ValueError(f"dequantization must be one of {', '.join(DEQUANTIZATIONS)} (got {asked!r})")
    if asked == "variational" and model.dequantizer is None:
        raise ValueError("variational dequantization needs a model with a learned q(u|x) (--noise variational)")
    return asked


def dequantized_nll(
    model: TarFlow,
    x_uint8: torch.Tensor,
    uniform: torch.Tensor,
    y: torch.Tensor | None = None,
    *,
    dequant: str = "uniform",
    max_batch: int | None = None,
) -> torch.Tensor:
    """Nats per dimension of 8-bit images dequantized from the U[0, 1) draws `uniform` (x's shape):
    "uniform": -log p(x + u) / D with u the draws; "variational": the bound's (-log p(x + u) +
    log q(u | x)) / D with u what the model's q makes of the draws. Scored as `nll` does."""
    if dequant == "uniform":  # on the draws' device, as `flow.dequantize_uniform`: today's numbers
        return nll(model, dequantize(None, x_uint8, uniform).x, y, max_batch=max_batch)
    device = model.var.device
    with torch.no_grad():
        x, log_q = dequantize_unautocast(model.dequantizer, x_uint8.to(device), uniform.to(device))
    scored = nll(model, x, y, max_batch=max_batch)
    return scored + log_q.to(scored.dtype) / model.config.data_dim


def bpd(
    model: TarFlow,
    x_uint8: torch.Tensor,
    y: torch.Tensor | None = None,
    *,
    generator: torch.Generator | None = None,
    samples: int = 1,
    max_batch: int | None = None,
    dequant: str | None = None,
) -> torch.Tensor:
    """Bits per dimension of 8-bit images (mean over `samples` draws), scored in passes of at most
    `max_batch` images (see `nll`): with uniform dequantization, or for a model with a learned q(u | x)
    the variational bound E_q[-log p(x + u) + log q(u | x)]. `dequant="uniform"` asks any model for
    the uniform figure."""
    return bpd_figures(
        model, x_uint8, y, generator=generator, samples=samples, max_batch=max_batch,
        dequants=(dequantization(model, dequant),),
    )[0]  # fmt: skip


def bpd_figures(
    model: TarFlow,
    x_uint8: torch.Tensor,
    y: torch.Tensor | None = None,
    *,
    dequants: tuple[str, ...],
    generator: torch.Generator | None = None,
    samples: int = 1,
    max_batch: int | None = None,
) -> list[torch.Tensor]:
    """`bpd` per image under each dequantization of `dequants`, all from the same U[0, 1) draws (so the
    variational bound and the uniform figure of one model compare draw for draw)."""
    inputs.uint8_images(x_uint8)
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples must be a whole number >= 1 (got {samples!r})")
    totals = [torch.zeros(x_uint8.shape[0], device=x_uint8.device) for _ in dequants]
    for _ in range(samples):
        uniform = torch.rand(x_uint8.shape, generator=generator, device=x_uint8.device, dtype=torch.float32)
        for total, dequant in zip(totals, dequants):
            scored = dequantized_nll(model, x_uint8, uniform, y, dequant=dequant, max_batch=max_batch)
            total += flow.nats_to_bpd(scored).to(total)  # scored on the model's device
    return [total / samples for total in totals]


def classification_rows(model: TarFlow, batch: int, max_batch: int | None = None, chunk: int = CLASSIFY_ROWS) -> int:
    """The (image, class) pairs one pass of `class_log_likelihoods` holds for `batch` images."""
    rows = max(1, model.config.num_classes) * batch
    return pass_rows(model, min(rows, chunk), max_batch, scoring_bytes_per_row)


def class_log_likelihoods(
    model: TarFlow, x: torch.Tensor, chunk: int = CLASSIFY_ROWS, *, max_batch: int | None = None
) -> torch.Tensor:
    """log p(x | y=k) for every class k, (B, K): the K x B (image, class) pairs, class-major, scored
    in passes of at most `chunk` pairs (fewer with `max_batch`, or on CUDA where memory asks)."""
    K = model.config.num_classes
    if K == 0:
        raise ValueError("classification needs a class-conditional model")
    B = x.shape[0]
    size = classification_rows(model, B, max_batch, chunk)
    parts = []
    for start, stop in spans(K * B, size):
        # only this pass's pairs are built: K x B copies of the images would not fit at 1,000 classes
        pair = torch.arange(start, stop, device=x.device)
        with torch.no_grad():  # a plain tensor, as every scoring result
            parts.append(log_prob(model, x[pair % B], pair // B))
    return torch.cat(parts).view(K, B).t()


def classify(
    model: TarFlow, x: torch.Tensor, log_prior: torch.Tensor | None = None, *, max_batch: int | None = None
) -> torch.Tensor:
    """Posterior log p(y | x) over classes by Bayes' rule (uniform prior unless given), (B, K)."""
    ll = class_log_likelihoods(model, x, max_batch=max_batch)
    if log_prior is not None:
        ll = ll + log_prior.to(ll)
    return torch.log_softmax(ll, dim=1)


def denoise(
    model: TarFlow,
    x: torch.Tensor,
    y: torch.Tensor | None = None,
    *,
    sigma: float,
    lr_scale: float = 1.0,
    max_batch: int | None = None,
) -> torch.Tensor:
    """One score step: x + lr_scale * sigma^2 * grad_x log p(x) (Tweedie's formula at lr_scale 1).

    One autograd pass keeps a whole forward per image, so the images go through in passes of at most
    `max_batch` (and on CUDA of what the free memory holds); each image's step is its own."""
    inputs.check_denoise_step(sigma, lr_scale)
    x = inputs.images(model, x)
    size = pass_rows(model, x.shape[0], max_batch, denoising_bytes_per_row)
    if size >= x.shape[0]:
        return _denoise_step(model, x, y, sigma, lr_scale)
    y = inputs.labels(model, y, x.shape[0], check=False)
    parts = [
        _denoise_step(model, x[a:b], y[a:b] if y is not None else None, sigma, lr_scale)
        for a, b in spans(x.shape[0], size)
    ]
    return torch.cat(parts)


def _denoise_step(model: TarFlow, x: torch.Tensor, y, sigma: float, lr_scale: float) -> torch.Tensor:
    with torch.inference_mode(False), torch.enable_grad():
        xg = inputs.images(model, x).detach().clone().requires_grad_(True)
        y = inputs.labels(model, y, xg.shape[0], check=False)  # log_prob checks the range
        y = y.clone() if y is not None else None  # an inference tensor cannot enter autograd
        (grad,) = torch.autograd.grad(log_prob(model, xg, y).sum(), xg)
    return (xg + (lr_scale * sigma**2) * grad).detach()
