"""MNIST-format IDX files (MNIST, Fashion-MNIST, KMNIST, ...), plain or gzipped.

A folder (searched up to two levels down, e.g. ``root/MNIST/raw``) with
``<prefix>-images-idx3-ubyte[.gz]`` and optionally ``<prefix>-labels-idx1-ubyte[.gz]``
(``.`` is accepted in place of ``-`` before ``idx``). A prefix with a ``train*`` part (``train``,
``emnist-balanced-train``) or a ``t10k`` / ``test*`` part gives the train / test split; a
folder with only a train file, or one file of any other prefix, is split by the fixed
held-out fraction. A single images file is used on its own, split by the held-out fraction,
with its labels file picked up from beside it when present. Kaggle's layout, each file in
a folder of its own name (``train-images-idx3-ubyte/train-images-idx3-ubyte``), is read as
if the files sat in the folder above.
"""

from __future__ import annotations

import gzip
import math
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .base import ArrayDataset, DataError, ViewOptions, held_out_indices, normalize_split

if TYPE_CHECKING:
    from typing_extensions import Unpack

IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
IMAGES_RE = re.compile(r"^(?P<prefix>.+?)[-.]images[-.]idx3[-.]ubyte(?P<gz>\.gz)?$", re.IGNORECASE)
TRAIN_PREFIXES = ("train",)
TEST_PREFIXES = ("t10k", "test")
_PREFIX_PARTS = re.compile(r"[-_.]")


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Parse one IDX file (gzipped or not): magic 0x00 0x00 <type> <ndim>, big-endian uint32
    dimensions, then the values. Raises :class:`DataError` on any inconsistency."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            head = fh.read(2)
        opener = gzip.open if head == b"\x1f\x8b" else open
        with opener(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"{path}: cannot read IDX file ({exc})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in IDX_DTYPES:
        raise DataError(f"{path}: not an IDX file (bad magic number {raw[:4].hex() or 'empty'})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise DataError(f"{path}: truncated IDX header ({ndim} dimensions)")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(IDX_DTYPES[raw[2]])
    expected = math.prod(dims) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataError(
            f"{path}: IDX header says {dims} values of {dtype} ({expected} bytes) "
            f"but the file holds {len(raw) - header} bytes of data"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)


def _label_file(images_file: Path) -> Path | None:
    m = IMAGES_RE.match(images_file.name)
    base = images_file.name[: m.start("gz")] if m and m.group("gz") else images_file.name
    stem = re.sub(r"images([-.])idx3", r"labels\1idx1", base, flags=re.IGNORECASE)
    places = [images_file.parent]
    home = _home(images_file)
    if home != images_file.parent:  # a folder per file: the labels are in their own folder
        places += [home / stem, home]
    for place in places:
        for name in (stem, stem + ".gz"):
            if (place / name).is_file():
                return place / name
    return None


def _home(p: Path) -> Path:
    """The folder an IDX file belongs to: its own, or the one above when that is a folder named
    after the file (Kaggle's MNIST: ``train-images-idx3-ubyte/train-images-idx3-ubyte``)."""

    def bare(name: str) -> str:
        return name[:-3].lower() if name.lower().endswith(".gz") else name.lower()

    return p.parent.parent if bare(p.parent.name) == bare(p.name) else p.parent


def find_idx_images(root: Path, depth: int = 2) -> list[Path]:
    """Images files under ``root`` (up to ``depth`` levels down), one per folder and prefix:
    plain preferred over .gz, and a file beside its folder-per-file copy over that copy.
    Hidden files and folders (``._*`` from macOS, ``.git``) are passed over. Only names are
    looked at, so a large image folder is searched quickly."""
    found: dict[tuple[Path, str], Path] = {}
    level = [Path(root)]
    for _ in range(depth + 1):
        below: list[Path] = []
        for folder in level:
            try:
                with os.scandir(folder) as entries:
                    listed = sorted((e.name, e) for e in entries if not e.name.startswith("."))
            except OSError:
                continue
            for name, entry in listed:
                m = IMAGES_RE.match(name)
                try:
                    if entry.is_dir():
                        below.append(folder / name)
                    elif m and entry.is_file():
                        p = folder / name
                        key = (_home(p), m.group("prefix").lower())
                        if key not in found or (IMAGES_RE.match(found[key].name).group("gz") and not m.group("gz")):
                            found[key] = p
                except OSError:
                    continue
        level = below
    return sorted(found.values())


def _load_pair(images_file: Path) -> tuple[np.ndarray, np.ndarray | None]:
    images = read_idx(images_file)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DataError(f"{images_file}: expected uint8 images of shape (N, H, W), got {images.dtype} {images.shape}")
    lf = _label_file(images_file)
    labels = None
    if lf is not None:
        labels = read_idx(lf)
        if labels.ndim != 1 or len(labels) != len(images):
            raise DataError(f"{lf}: expected {len(images)} labels, got shape {labels.shape}")
    return images, labels


def _split_of(images_file: Path) -> str | None:
    """``train`` / ``test`` from a part of the prefix (``t10k``, ``emnist-letters-test``), else None."""
    parts = _PREFIX_PARTS.split(IMAGES_RE.match(images_file.name).group("prefix").lower())
    train = any(p.startswith(TRAIN_PREFIXES) for p in parts)
    test = any(p.startswith(TEST_PREFIXES) for p in parts)
    return None if train == test else ("train" if train else "test")


def open_idx(path: str | os.PathLike, split: str = "train", **view: Unpack[ViewOptions]) -> ArrayDataset:
    path = Path(path)
    split = normalize_split(split)
    kwargs = dict(name=str(path), split=split, **view)
    if path.is_file():
        images, labels = _load_pair(path)
        return ArrayDataset(images, labels, indices=held_out_indices(len(images), split), **kwargs)
    files = find_idx_images(path)
    if not files:
        raise DataError(f"{path}: no IDX images found (looked for *-images-idx3-ubyte[.gz])")
    own = {"train": [f for f in files if _split_of(f) == "train"], "test": [f for f in files if _split_of(f) == "test"]}
    if len(files) == 1 and not own["test"]:  # one file of its own: no split of its own either
        images, labels = _load_pair(files[0])
        return ArrayDataset(images, labels, indices=held_out_indices(len(images), split), **kwargs)
    if len(own["train"]) > 1 or len(own["test"]) > 1 or len(own["train"]) + len(own["test"]) != len(files):
        names = ", ".join(str(f.relative_to(path)) for f in files)
        raise DataError(
            f"{path}: cannot tell which IDX files to use among {names} (expected one "
            "train-* and one t10k-*/test-* images file); pass a narrower folder or one file"
        )
    chosen = own["train"] + own["test"] if split == "all" else own[split]
    if not chosen:
        wanted = "train-*" if split == "train" else "t10k-* or test-*"
        raise DataError(f"{path}: no {split} IDX images found (looked for {wanted} images-idx3-ubyte[.gz] files)")
    pairs = [_load_pair(f) for f in chosen]
    if len({p[0].shape[1:] for p in pairs}) > 1 or len({p[1] is None for p in pairs}) > 1:
        raise DataError(f"{path}: the IDX files {', '.join(f.name for f in chosen)} differ in image shape or labels")
    images = np.concatenate([p[0] for p in pairs])
    labels = None if pairs[0][1] is None else np.concatenate([p[1] for p in pairs])
    num_classes = None
    if labels is not None:  # the class count must not depend on which split was opened
        maxima = [int(labels.max())]
        for f in files:
            if f not in chosen and (other := _load_labels_only(f)) is not None and len(other):
                maxima.append(int(other.max()))
        num_classes = max(maxima) + 1
    return ArrayDataset(images, labels, num_classes=num_classes, **kwargs)


def _load_labels_only(images_file: Path) -> np.ndarray | None:
    lf = _label_file(images_file)
    return read_idx(lf) if lf is not None else None
