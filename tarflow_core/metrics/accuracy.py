"""Bayes-rule classification accuracy of a class-conditional model: predict
argmax_k log p(x | y=k) (uniform prior), every (image, class) pair of a batch scored in passes
(`likelihood.class_log_likelihoods`): K times the work of bpd, which `accuracy_cost` tells."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from .. import flow
from ..chunking import scoring_bytes_per_row
from ..likelihood import class_log_likelihoods, classification_rows
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
    max_batch: int | None = None,
) -> AccuracyResult:
    """Accuracy of Bayes-rule predictions on ``dataset`` (which must carry labels 0..K-1).

    Images are dequantized uniformly from ``generator`` (the likelihood protocol; with the
    same seed and batch size, the same x as the first draw of :func:`dataset_bpd`), or mapped
    to [-1, 1] without noise when ``dequantize`` is false. ``max_batch``: the most (image, class)
    pairs one pass scores (see :func:`accuracy_cost`).
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
            ll = class_log_likelihoods(model, x.to(device), max_batch=max_batch)
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


@dataclass(frozen=True)
class AccuracyCost:
    """What :func:`bayes_accuracy` will compute, for telling before it starts."""

    images: int
    classes: int
    scorings: int  # (image, class) pairs, each one full log p(x | k)
    passes: int  # forward passes over the model
    pairs_per_pass: int  # the most pairs one pass holds
    bytes_per_pass: int  # estimated activation memory of the largest pass (the weights aside)


def accuracy_cost(model, images: int, *, batch_size: int = 256, max_batch: int | None = None) -> AccuracyCost:
    """The passes and memory :func:`bayes_accuracy` will take over ``images`` images in batches of
    ``batch_size``, with the pass size it will choose now (on CUDA the free memory may change)."""
    k = model.config.num_classes
    passes, widest = 0, 0
    full, rest = divmod(images, batch_size)
    for batch, count in ((batch_size, full), (rest, 1 if rest else 0)):
        if count:
            rows = classification_rows(model, batch, max_batch)
            passes += count * -(-k * batch // rows)
            widest = max(widest, rows)
    per_row = scoring_bytes_per_row(model.config, model.var.element_size())
    return AccuracyCost(images, k, images * k, passes, widest, widest * per_row)
