"""Data sources for tarflow (README.md, "Data"): the embedded digits, image folders,
``.npz``/``.npy`` arrays (incl. downsampled-ImageNet batches), MNIST IDX files and CIFAR
python batches, plus a deterministic, resumable, shardable loader.

    ds = open_dataset("digits", split="train")          # ImageDataset
    img, label = ds[0]                                   # uint8 (C, H, W), int (-1: none)
    loader = make_loader(ds, batch_size=64, seed=0)     # ResumableLoader
"""

from .arrays import open_array_file, open_imagenet_batches
from .base import (
    ArrayDataset,
    DataError,
    ImageDataset,
    ViewOptions,
    held_out_indices,
    normalize_split,
    resize_center_crop,
)
from .cifar import SafeUnpickler, open_cifar, safe_load_pickle
from .digits import load_digits_arrays, open_digits
from .folder import IMAGE_EXTS, FolderDataset
from .idx import open_idx, read_idx
from .loader import ResumableLoader, ResumableSampler, make_loader, seed_worker
from .registry import detect_kind, open_dataset

__all__ = [
    "ArrayDataset",
    "DataError",
    "FolderDataset",
    "IMAGE_EXTS",
    "ImageDataset",
    "ResumableLoader",
    "ResumableSampler",
    "SafeUnpickler",
    "ViewOptions",
    "detect_kind",
    "held_out_indices",
    "load_digits_arrays",
    "make_loader",
    "normalize_split",
    "open_array_file",
    "open_cifar",
    "open_dataset",
    "open_digits",
    "open_idx",
    "open_imagenet_batches",
    "read_idx",
    "resize_center_crop",
    "safe_load_pickle",
    "seed_worker",
]
