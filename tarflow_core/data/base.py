"""Shared pieces of every data source: the error type, the dataset base class, the
in-memory array dataset, per-image shape adaptation and the fixed held-out split.

Every dataset yields ``(image, label)`` with ``image`` a uint8 tensor (C, H, W) and
``label`` an int (-1 when the source has no labels). Index keys are either an int or an
``(int, flip)`` pair; the pair form is what :class:`~tarflow_core.data.loader.ResumableSampler`
produces when horizontal flips are on, so flips are decided by the sampler (from the seed,
epoch and index) and never by a global random generator.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TypedDict

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset

SPLITS = ("train", "test", "all")
SPLIT_ALIASES = {"val": "test", "valid": "test", "validation": "test", "eval": "test"}
HELD_OUT_FRACTION = 0.05
SPLIT_SEED = 20240611  # fixed forever: changing it would move images between splits


class DataError(ValueError):
    """A data source is missing, malformed or empty. The message names the source and what
    was expected; the CLI shows it as-is (exit code 2)."""


class ViewOptions(TypedDict, total=False):
    """How a data set serves its images, whatever the source (the openers pass these through)."""

    image_size: int | None  # resize the shorter side and centre-crop to this; None: as stored
    channels: int | None  # 1 or 3; None: as stored
    flip: bool  # random horizontal flips, decided by the loader's sampler


def normalize_split(split: str) -> str:
    """Map ``train``/``test``/``all`` (and ``val``, ``valid``, ``validation``, ``eval`` as
    names for ``test``) to the canonical name, or raise :class:`DataError`."""
    s = SPLIT_ALIASES.get(str(split).lower(), str(split).lower())
    if s not in SPLITS:
        raise DataError(f"unknown data split {split!r} (expected train, test/val or all)")
    return s


def held_out_indices(n: int, split: str, n_test: int | None = None) -> np.ndarray:
    """Sorted indices of ``split`` for a source without its own split.

    The test split is ``n_test`` images (default: 5%, at least 1 when n >= 2) picked by a
    permutation from a fixed seed, so it never changes between runs or machines.
    """
    split = normalize_split(split)
    if split == "all":
        return np.arange(n)
    if n_test is None:
        n_test = max(1, int(math.ceil(n * HELD_OUT_FRACTION))) if n >= 2 else 0
    perm = np.random.default_rng(SPLIT_SEED).permutation(n)
    chosen = perm[n - n_test :] if split == "test" else perm[: n - n_test]
    return np.sort(chosen)


def rgb_to_gray(chw: np.ndarray) -> np.ndarray:
    """(3, H, W) uint8 -> (1, H, W) uint8 with Pillow's ``convert("L")`` integer formula."""
    r, g, b = (chw[i].astype(np.uint32) for i in range(3))
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).astype(np.uint8)[None]


HIGH_DEPTH_GRAY_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")
GRAY_MODES = ("1", "L", "LA", "La", *HIGH_DEPTH_GRAY_MODES)  # Pillow modes of grayscale images


ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
BACKGROUND = 255  # transparent pixels are shown over white


def on_white(img: Image.Image) -> Image.Image:
    """An image with transparency (an alpha channel, or a palette / colour marked transparent)
    composited onto white, as viewers show it; the colour stored under a transparent pixel is
    undefined (black in one file, anything in the next), so it is never used as it is. Images
    without transparency are returned unchanged."""
    if img.mode not in ALPHA_MODES and not (img.mode in ("1", "L", "P", "RGB") and "transparency" in img.info):
        return img
    gray = img.mode in GRAY_MODES
    rgba = img.convert("RGBA")
    flat = Image.alpha_composite(Image.new("RGBA", rgba.size, (BACKGROUND,) * 4), rgba)
    return flat.convert("L" if gray else "RGB")


def eight_bit(img: Image.Image) -> Image.Image:
    """An image as 8-bit "L" (grayscale sources) or "RGB" (everything else).

    16-bit, 32-bit and float grayscale are scaled, not clipped: values above 255 are taken
    as 16-bit (divided by 257), as PNG writes them; float images ("F", e.g. TIFF) all within
    [0, 1] as that range (times 255); other values are rounded as they are.
    Transparent pixels are composited onto white (:func:`on_white`).
    """
    img = on_white(img)
    if img.mode in HIGH_DEPTH_GRAY_MODES:
        a = np.asarray(img, dtype=np.float64)
        if a.max(initial=0) > 255:
            a = a / 257.0
        elif img.mode == "F" and a.min(initial=0) >= 0 and a.max(initial=0) <= 1:
            a = a * 255.0
        return Image.fromarray(np.clip(np.floor(a + 0.5), 0, 255).astype(np.uint8), "L")
    if img.mode in GRAY_MODES:
        return img.convert("L")
    return img.convert("RGB")


EXIF_ORIENTATION = 0x0112


def upright(img: Image.Image) -> Image.Image:
    """The image as viewers show it: turned by its EXIF orientation tag (camera and phone
    JPEGs store the sensor's pixels and say how to rotate them), unchanged when it has none."""
    try:
        if img.getexif().get(EXIF_ORIENTATION, 1) in (1, None):
            return img
        return ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001 - a damaged EXIF block: the pixels as stored
        return img


def resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    """Resize so the shorter side is ``size`` then center-crop to ``size`` x ``size``
    (the ADM / TarFlow ``center_crop_arr``: box-halve while large, then bicubic)."""
    while min(img.size) >= 2 * size:
        img = img.resize(tuple(x // 2 for x in img.size), resample=Image.BOX)
    scale = size / min(img.size)
    img = img.resize(tuple(max(size, round(x * scale)) for x in img.size), resample=Image.BICUBIC)
    left = (img.size[0] - size) // 2
    top = (img.size[1] - size) // 2
    return img.crop((left, top, left + size, top + size))


def adapt_array(chw: np.ndarray, channels: int, size: int) -> np.ndarray:
    """Bring one (C, H, W) uint8 image to ``channels`` (1 or 3) and ``size`` x ``size``."""
    c, h, w = chw.shape
    if c == 4:
        chw, c = chw[:3], 3
    if c != channels:
        chw = np.repeat(chw, 3, axis=0) if channels == 3 else rgb_to_gray(chw)
    if h != size or w != size:
        mode = "L" if channels == 1 else "RGB"
        pil = Image.fromarray(chw[0] if channels == 1 else chw.transpose(1, 2, 0), mode)
        out = np.asarray(resize_center_crop(pil, size))
        chw = out[None] if channels == 1 else out.transpose(2, 0, 1)
    return np.ascontiguousarray(chw)


def split_key(key) -> tuple[int, bool]:
    """An index key is ``i`` or ``(i, flip)``."""
    if isinstance(key, (tuple, list)):
        return int(key[0]), bool(key[1])
    return int(key), False


class ImageDataset(Dataset):
    """Base of every data source.

    Attributes: ``name`` (the source as given), ``split`` (train/test/all), ``channels``,
    ``image_size``, ``num_classes`` (0 when unlabelled), ``class_names``, ``skipped`` (files
    that could not be read), ``flip`` (random horizontal flip requested; applied only for
    ``(i, True)`` keys) and ``description``.
    """

    name: str = ""
    split: str = "train"
    channels: int = 0
    image_size: int = 0
    num_classes: int = 0
    class_names: list[str]
    skipped: int = 0
    flip: bool = False

    def __len__(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def load(self, i: int) -> tuple[np.ndarray, int]:  # pragma: no cover - abstract
        """Image ``i`` as (C, H, W) uint8 at the dataset's shape, and its label (-1: none)."""
        raise NotImplementedError

    def __getitem__(self, key) -> tuple[torch.Tensor, int]:
        i, flip = split_key(key)
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} images")
        img, label = self.load(i % len(self))
        if flip:
            img = img[:, :, ::-1]
        return torch.from_numpy(np.array(img, dtype=np.uint8, order="C")), int(label)

    @property
    def labelled(self) -> bool:
        return self.num_classes > 0

    @property
    def description(self) -> str:
        classes = f"{self.num_classes} classes" if self.num_classes else "unlabelled"
        text = (
            f"{self.name} ({len(self)} {self.split} images, "
            f"{self.channels}x{self.image_size}x{self.image_size}, {classes}"
        )
        if self.skipped:
            text += f", {self.skipped} unreadable file{'' if self.skipped == 1 else 's'} skipped"
        return text + ")"

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.description}>"


def _layout_to_nchw(images: np.ndarray, source: str) -> np.ndarray:
    if images.ndim == 3:
        if images.shape[-1] in (3, 4) and images.shape[1] > 4 * images.shape[-1]:
            raise DataError(
                f"{source}: shape {images.shape} looks like one {images.shape[0]}x{images.shape[1]} "
                f"image with {images.shape[-1]} channels, not {images.shape[0]} grayscale images; "
                "expected a stack of images, NHWC, NCHW or NHW (add the first axis: x[None])"
            )
        return images[:, None]
    if images.ndim != 4:
        raise DataError(f"{source}: expected images shaped NHWC, NCHW or NHW, got shape {images.shape}")
    chan = (1, 3, 4)
    _, a, b, c = images.shape
    if c in chan and a not in chan:
        return images.transpose(0, 3, 1, 2)
    if a in chan and c in chan and b == a != c:
        return images.transpose(0, 3, 1, 2)  # (N, 4, 4, 3): square 4x4 RGB, not 4 channels of 4x3
    if a in chan:  # NCHW, also when the shape cannot tell (N, 3, 3, 3)
        return images
    raise DataError(f"{source}: cannot find a channel axis of size 1, 3 or 4 in image shape {images.shape}")


class ConcatImages:
    """Several (N_k, C, H, W) uint8 arrays (memory maps of batch files) indexed as one
    (sum N_k, C, H, W) array, without copying them into one."""

    ndim = 4
    dtype = np.dtype(np.uint8)

    def __init__(self, parts: Sequence[np.ndarray]):
        if not parts or any(p.ndim != 4 or p.shape[1:] != parts[0].shape[1:] for p in parts):
            raise ValueError("ConcatImages needs (N, C, H, W) arrays of one image shape")
        self.parts = list(parts)
        self.ends = np.cumsum([len(p) for p in self.parts])
        self.shape = (int(self.ends[-1]), *parts[0].shape[1:])

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, j: int) -> np.ndarray:
        j = int(j)
        if not 0 <= j < len(self):
            raise IndexError(f"image {j} out of range for {len(self)}")
        k = int(np.searchsorted(self.ends, j, side="right"))
        return self.parts[k][j - (int(self.ends[k - 1]) if k else 0)]


class ArrayDataset(ImageDataset):
    """Images held in memory as one uint8 array, any of NCHW, NHWC or NHW.

    Channel and size changes (``channels``/``image_size`` differing from the array) are
    applied per image when it is read: gray <-> RGB, resize shorter side + center crop.
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray | None,
        *,
        name: str,
        split: str = "train",
        indices: np.ndarray | None = None,
        class_names: Sequence[str] | None = None,
        num_classes: int | None = None,
        image_size: int | None = None,
        channels: int | None = None,
        flip: bool = False,
        skipped: int = 0,
    ):
        if not isinstance(images, (np.ndarray, ConcatImages)) or images.dtype != np.uint8:
            dtype = getattr(images, "dtype", type(images).__name__)
            kind = getattr(dtype, "kind", "")
            hint = {
                "f": "; floats in [0, 1]? save (x * 255).round().astype(np.uint8)",
                "i": "; whole numbers in 0..255? save x.astype(np.uint8)",
                "u": "; 16-bit? save (x / 257).round().astype(np.uint8)",
            }.get(kind, "")
            raise DataError(f"{name}: expected uint8 images (0..255), got dtype {dtype}{hint}")
        self.images = _layout_to_nchw(images, name)
        if labels is not None:
            labels = check_labels(labels, len(self.images), name)
        self.labels = labels
        self.indices = np.arange(len(self.images)) if indices is None else np.asarray(indices)
        self.name, self.split, self.flip, self.skipped = name, split, flip, skipped
        _, c, h, w = self.images.shape
        src_channels = 3 if c == 4 else c
        self.channels = channels or src_channels
        if self.channels not in (1, 3):
            raise DataError(f"{name}: channels must be 1 or 3, got {self.channels}")
        self.image_size = image_size or min(h, w)
        self._adapt = (self.channels != c) or h != self.image_size or w != self.image_size
        if labels is None:
            self.num_classes, self.class_names = 0, []
        else:
            self.num_classes = int(
                num_classes if num_classes is not None else (int(labels.max()) + 1 if len(labels) else 0)
            )
            self.class_names = (
                list(class_names) if class_names is not None else [str(k) for k in range(self.num_classes)]
            )
        if len(self.indices) == 0:
            raise DataError(f"{name}: the {split} split has no images")

    def __len__(self) -> int:
        return len(self.indices)

    def load(self, i: int) -> tuple[np.ndarray, int]:
        j = int(self.indices[i])
        img = self.images[j]
        if self._adapt:
            img = adapt_array(img, self.channels, self.image_size)
        return img, int(self.labels[j]) if self.labels is not None else -1


def check_labels(labels, n: int, source: str) -> np.ndarray:
    """Validate a label vector: integer, one per image, non-negative."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or len(labels) != n:
        hint = (
            "; one-hot or multi-label rows? give one class index per image (e.g. their argmax)"
            if labels.ndim == 2 and len(labels) == n
            else ""
        )
        raise DataError(f"{source}: expected one label per image ({n}), got labels shaped {labels.shape}{hint}")
    if labels.dtype.kind not in "iu":
        raise DataError(f"{source}: expected integer labels, got dtype {labels.dtype}")
    labels = labels.astype(np.int64)
    if n and labels.min() < 0:
        raise DataError(f"{source}: labels must be >= 0, found {labels.min()}")
    return labels
