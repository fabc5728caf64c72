"""Shared helpers of the metrics: batching a data set in order, labels for a model."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset


def ordered_batches(dataset: Dataset, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(uint8 images (B, C, H, W), int64 labels (B,)) in dataset order, no shuffling, no workers."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0, drop_last=False)
    for images, labels in loader:
        yield images, torch.as_tensor(labels, dtype=torch.long)


def model_labels(model, labels: torch.Tensor, device: torch.device | str) -> torch.Tensor | None:
    """The labels to condition on: None for unconditional models or unlabelled data (-1 rows
    of a labelled source use the mean class embedding, as the model defines)."""
    k = model.config.num_classes
    if k == 0 or bool((labels < 0).all()):
        return None
    if int(labels.max()) >= k:
        raise ValueError(f"data label {int(labels.max())} is out of range for a model with {k} classes")
    return labels.to(device)
