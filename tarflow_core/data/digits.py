"""The embedded default data set: UCI 8x8 handwritten digits (see DIGITS_ATTRIBUTION.md).

1,797 grayscale 8x8 images, 10 classes, pixel values 0..16 stored as round(v * 255 / 16).
Split: a fixed held-out set of 297 images (chosen by a fixed-seed permutation), leaving
1,500 for training.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .base import ArrayDataset, DataError, ViewOptions, held_out_indices, normalize_split

if TYPE_CHECKING:
    from typing_extensions import Unpack

DIGITS_FILE = Path(__file__).with_name("digits.npz")
DIGITS_TEST = 297


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 digits: images uint8 (N, 1, 8, 8) and labels uint8 (N,)."""
    try:
        with np.load(DIGITS_FILE, allow_pickle=False) as z:
            return z["images"], z["labels"]
    except (OSError, KeyError, ValueError) as exc:
        raise DataError(
            f"the embedded digits file {DIGITS_FILE} is missing or damaged (reinstall tarflow): {exc}"
        ) from None


def open_digits(split: str = "train", **view: Unpack[ViewOptions]) -> ArrayDataset:
    split = normalize_split(split)
    images, labels = load_digits_arrays()
    return ArrayDataset(
        images,
        labels,
        name="digits",
        split=split,
        indices=held_out_indices(len(images), split, DIGITS_TEST),
        class_names=[str(k) for k in range(10)],
        num_classes=10,
        **view,
    )
