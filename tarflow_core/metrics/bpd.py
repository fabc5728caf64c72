"""Bits per dimension of a data set: the reference protocol (uniform dequantization of 8-bit
pixels, exact density; the variational bound for a model with a learned q(u | x)), batched and
seeded exactly like ``tarflow score``."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from .. import flow
from ..likelihood import dequantization, dequantized_nll
from .common import model_labels, ordered_batches


@dataclass
class BpdResult:
    bpd: float  # mean bits per 8-bit sub-pixel over the images (a variational model's: the bound)
    nll: float  # mean -log p(x) / D in nats (of the dequantized x; variational: plus log q(u | x) / D)
    count: int
    per_image: np.ndarray  # bpd of each image, float64, dataset order
    conditioned: bool  # whether log p(x | y) with the data's labels was scored
    dequant: str = "uniform"  # "uniform", or "variational": `bpd` is the variational bound
    bpd_uniform: float | None = None  # variational: the mean bpd with uniform dequantization, same draws

    @property
    def stderr(self) -> float:
        """Standard error of the mean bpd over images."""
        n = len(self.per_image)
        return float(self.per_image.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")


def dataset_bpd(
    model,
    dataset: Dataset,
    *,
    batch_size: int = 256,
    generator: torch.Generator | None = None,
    samples: int = 1,
    device: torch.device | str | None = None,
    on_batch: Callable[[int, int], None] | None = None,
    max_batch: int | None = None,
    dequant: str | None = None,
) -> BpdResult:
    """Mean bpd of ``dataset`` (uint8 images) under ``model``.

    Per batch, in dataset order: ``samples`` U[0, 1) draws u from ``generator`` (on the CPU), each
    x = ((x_int + u) / 256) * 2 - 1 scored exactly; the per-image nll is the mean over draws
    (accumulated in float64), and bpd = (nll + ln 128) / ln 2. A model with a learned q(u | x)
    scores the variational bound instead (u = q's transform of the draws, plus log q(u | x)), and
    beside it (``bpd_uniform``) the uniform figure of the same draws; ``dequant="uniform"`` asks for
    the uniform figure alone. With the same seed and batch size this equals ``tarflow score
    --dequant-samples K`` on the same images. A class-conditional model scores log p(x | y) with the
    data's labels when the data has them. ``max_batch``: the most images one pass scores (a batch
    is split into passes; the same numbers).
    """
    if samples < 1:
        raise ValueError(f"samples must be >= 1 (got {samples})")
    device = torch.device(device) if device is not None else model.var.device
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    dequant = dequantization(model, dequant)
    dequants = (dequant, "uniform") if dequant == "variational" else (dequant,)
    n = len(dataset)
    nlls: list[list[torch.Tensor]] = [[] for _ in dequants]
    done, conditioned = 0, False
    with torch.inference_mode():
        for images, labels in ordered_batches(dataset, batch_size):
            y = model_labels(model, labels, device)
            conditioned = conditioned or y is not None
            totals = [torch.zeros(len(images), dtype=torch.float64) for _ in dequants]
            for _ in range(samples):
                uniform = torch.rand(images.shape, generator=generator, dtype=torch.float32)
                for total, kind in zip(totals, dequants):
                    scored = dequantized_nll(model, images, uniform, y, dequant=kind, max_batch=max_batch)
                    total += scored.double().cpu()
            for kept, total in zip(nlls, totals):
                kept.append(total / samples)
            done += len(images)
            if on_batch is not None:
                on_batch(done, n)
    nll, *others = [torch.cat(k) if k else torch.zeros(0, dtype=torch.float64) for k in nlls]
    per_image = flow.nats_to_bpd(nll).numpy()
    return BpdResult(
        bpd=_mean(per_image),
        nll=float(nll.mean()) if len(nll) else float("nan"),
        count=len(per_image),
        per_image=per_image,
        conditioned=conditioned,
        dequant=dequant,
        bpd_uniform=_mean(flow.nats_to_bpd(others[0]).numpy()) if others else None,
    )


def _mean(values: np.ndarray) -> float:
    return float(values.mean()) if len(values) else float("nan")
