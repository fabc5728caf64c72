"""Bayes-rule classification accuracy of a class-conditional model: predict
argmax_k log p(x | y=k) (uniform prior), all classes scored as one batched pass per batch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch.utils.data import Dataset

from .. import flow
from ..likelihood import class_log_likelihoods
from .common import ordered_batches


@dataclass
class AccuracyResult:
    accuracy: float
    correct: int
    count: int
    predictions: np.ndarray  # (N,) predicted class per image
    labels: np.ndarray  # (N,) true class per image

    @property
    def per_class(self) -> dict[int, float]:
        return {int(k): float((self.predictions[self.labels == k] == k).mean()) for k in np.unique(self.labels)}


def bayes_accuracy(
    model,
    dataset: Dataset,
    *,
    batch_size: int = 256,
    generator: torch.Generator | None = None,
    dequantize: bool = True,
    device: torch.device | str | None = None,
    on_batch: Callable[[int, int], None] | None = None,
) -> AccuracyResult:
    """Accuracy of Bayes-rule predictions on ``dataset`` (which must carry labels 0..K-1).

    Images are dequantized uniformly from ``generator`` (the likelihood protocol; with the
    same seed and batch size, the same x as the first draw of :func:`dataset_bpd`), or mapped
    to [-1, 1] without noise when ``dequantize`` is false.
    """
    k = model.config.num_classes
    if k == 0:
        raise ValueError("classification accuracy needs a class-conditional model")
    device = torch.device(device) if device is not None else model.var.device
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    n = len(dataset)
    preds, truth, done = [], [], 0
    with torch.inference_mode():
        for images, labels in ordered_batches(dataset, batch_size):
            if bool((labels < 0).any()) or int(labels.max()) >= k:
                bad = int(labels[(labels < 0) | (labels >= k)][0])
                raise ValueError(f"data label {bad} is not a class of this model (0..{k - 1})")
            x = flow.dequantize_uniform(images, generator=generator) if dequantize else flow.uint8_to_model(images)
            ll = class_log_likelihoods(model, x.to(device))
            preds.append(ll.argmax(dim=1).cpu())
            truth.append(labels)
            done += len(images)
            if on_batch is not None:
                on_batch(done, n)
    p = torch.cat(preds).numpy() if preds else np.zeros(0, np.int64)
    t = torch.cat(truth).numpy() if truth else np.zeros(0, np.int64)
    correct = int((p == t).sum())
    return AccuracyResult(
        accuracy=correct / len(t) if len(t) else float("nan"), correct=correct, count=len(t), predictions=p, labels=t
    )
