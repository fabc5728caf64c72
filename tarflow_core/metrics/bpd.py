"""Bits per dimension of a data set: the reference protocol (uniform dequantization of 8-bit
pixels, exact density), batched and seeded exactly like ``tarflow score``."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from .. import flow
from ..likelihood import nll as model_nll
from .common import model_labels, ordered_batches


@dataclass
class BpdResult:
    bpd: float  # mean bits per 8-bit sub-pixel over the images
    nll: float  # mean -log p(x) / D in nats (of the dequantized x)
    count: int
    per_image: np.ndarray  # bpd of each image, float64, dataset order
    conditioned: bool  # whether log p(x | y) with the data's labels was scored

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
) -> BpdResult:
    """Mean bpd of ``dataset`` (uint8 images) under ``model``.

    Per batch, in dataset order: ``samples`` draws x = ((x_int + u) / 256) * 2 - 1 with u from
    ``generator`` (on the CPU), each scored exactly; the per-image nll is the mean over draws
    (accumulated in float64), and bpd = (nll + ln 128) / ln 2. With the same seed and batch
    size this equals ``tarflow score --dequant-samples K`` on the same images. A class-conditional
    model scores log p(x | y) with the data's labels when the data has them. ``max_batch``: the
    most images one pass scores (a batch is split into passes; the same numbers).
    """
    if samples < 1:
        raise ValueError(f"samples must be >= 1 (got {samples})")
    device = torch.device(device) if device is not None else model.var.device
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    n = len(dataset)
    nlls, done, conditioned = [], 0, False
    with torch.inference_mode():
        for images, labels in ordered_batches(dataset, batch_size):
            y = model_labels(model, labels, device)
            conditioned = conditioned or y is not None
            total = torch.zeros(len(images), dtype=torch.float64)
            for _ in range(samples):
                x = flow.dequantize_uniform(images, generator=generator)
                total += model_nll(model, x.to(device), y, max_batch=max_batch).double().cpu()
            nlls.append(total / samples)
            done += len(images)
            if on_batch is not None:
                on_batch(done, n)
    nll = torch.cat(nlls) if nlls else torch.zeros(0, dtype=torch.float64)
    per_image = flow.nats_to_bpd(nll).numpy()
    return BpdResult(
        bpd=float(per_image.mean()) if len(per_image) else float("nan"),
        nll=float(nll.mean()) if len(nll) else float("nan"),
        count=len(per_image),
        per_image=per_image,
        conditioned=conditioned,
    )
