"""``.npz`` / ``.npy`` image arrays, and folders of downsampled-ImageNet ``.npz`` batches.

- ``.npy``: one uint8 array, NHWC, NCHW or NHW (grayscale); unlabelled. When both axis 1
  and the last could hold the channels, the reading that gives square images wins
  ((N, 4, 4, 3) is NHWC); when both do ((N, 3, 3, 3)), NCHW.
- ``.npz``: images under ``images``, ``x``, ``arr_0`` or ``data`` (or the only array in the
  file); optional integer ``labels`` (or ``y``, ``targets``), one per image ((N, 1) is fine).
- ``.npz`` with its own split: ``x_train``/``y_train``, ``x_test``/``y_test`` (Keras's
  ``mnist.npz``) or ``train_images``/``train_labels``, ``test_images``/``test_labels`` (and
  ``val_*``, used only in the ``all`` split; MedMNIST).
- Downsampled-ImageNet batch layout: ``data`` of shape (N, C*H*W) (rows in C, H, W order,
  C = 3, or 1 when C*H*W is not 3 times a square) and ``labels`` 1-based; they are shifted
  to 0-based (when the smallest label is 0 they are taken as 0-based already).
- A folder of such batches (``train_data_batch_*.npz`` and ``val_data.npz``) gives the
  train / test split. The batches may also sit one folder down, as the downloads unpack
  (``Imagenet32_train_npz/``, ``Imagenet32_val_npz/``; ``Imagenet64_train_part1_npz/`` and
  ``..._part2_npz/``), so their common parent is the whole data set. Without ``val_data.npz``,
  and for a single file, the test split is the fixed held-out fraction.

Arrays are loaded with ``allow_pickle=False``; a ``.npy`` file, and an image array stored
uncompressed in an ``.npz`` (``np.savez``, as the ImageNet batches are), are memory-mapped
rather than read into memory, and batches are not concatenated (:class:`ConcatImages`), so
ImageNet 64 takes no more memory than the page cache shares among all training processes.
If ``image_size`` or ``channels`` differ from the array, each image is converted when read
(resize shorter side + center crop).
"""

from __future__ import annotations

import math
import os
import zipfile
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from ..load_errors import describe, file_head, not_numpy
from .base import ArrayDataset, ConcatImages, DataError, ViewOptions, check_labels, held_out_indices, normalize_split

if TYPE_CHECKING:
    from typing_extensions import Unpack

IMAGE_KEYS = ("images", "x", "arr_0", "data")
LABEL_KEYS = ("labels", "y", "targets")
IMAGENET_TRAIN_GLOB = "train_data_batch_*.npz"
IMAGENET_VAL_NAME = "val_data.npz"


def rows_to_nchw(rows: np.ndarray, source: str) -> np.ndarray:
    """(N, C*H*W) rows -> (N, C, H, W), with C = 3 if the row length allows, else 1."""
    n, d = rows.shape
    for c in (3, 1):
        side = math.isqrt(d // c) if d % c == 0 else 0
        if side and c * side * side == d:
            return rows.reshape(n, c, side, side)
    raise DataError(f"{source}: rows of {d} values are not C*H*W of a square 1- or 3-channel image")


SPLIT_KEYS = (  # arrays saved with their own split: split -> (images key, labels key)
    {"train": ("x_train", "y_train"), "test": ("x_test", "y_test")},
    {
        "train": ("train_images", "train_labels"),
        "test": ("test_images", "test_labels"),
        "val": ("val_images", "val_labels"),
    },
)


def _open_npy(path: Path, mapped: bool = False):
    """``np.load`` without pickles; ``mapped``: a plain .npy comes back memory-mapped (read-only),
    so a large file is read as it is used and shared by every process that trains on it."""
    head = file_head(path)
    problem = not_numpy(head)
    if problem:
        raise DataError(f"{path}: {problem}")
    if mapped and head is not None and head.startswith(b"\x93NUMPY"):
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
            if arr.dtype == np.uint8:
                return arr
        except Exception:  # noqa: BLE001 - read it plainly below, which says what is wrong
            pass
    try:
        return np.load(path, allow_pickle=False)
    except ValueError as exc:
        if "pickle" not in str(exc):
            raise DataError(f"{path}: not a readable .npy/.npz file ({exc})") from None
        raise DataError(
            f"{path}: cannot read the array without unpickling objects; expected plain uint8 arrays ({exc})"
        ) from None
    except (OSError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"{path}: not a readable .npy/.npz file ({describe(exc)})") from None


def _mapped_member(path: Path, key: str) -> np.ndarray | None:
    """Array ``key`` of an .npz memory-mapped (read-only) when the archive stores it
    uncompressed (``np.savez``; the downsampled-ImageNet batches), else None (then it is read)."""
    try:
        with zipfile.ZipFile(path) as zf:
            info = zf.getinfo(key + ".npy")
            if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1:
                return None
            with zf.open(info) as f:
                version = np.lib.format.read_magic(f)
                if version not in ((1, 0), (2, 0)):
                    return None
                read_header = (
                    np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                )
                shape, fortran, dtype = read_header(f)
                header = f.tell()
        with open(path, "rb") as fh:  # the member's data starts after its local header
            fh.seek(info.header_offset)
            local = fh.read(30)
        if local[:4] != b"PK\x03\x04" or dtype != np.uint8 or fortran:
            return None
        name_len, extra_len = int.from_bytes(local[26:28], "little"), int.from_bytes(local[28:30], "little")
        offset = info.header_offset + 30 + name_len + extra_len + header
        if offset + math.prod(shape) > os.path.getsize(path) or math.prod(shape) == 0:
            return None
        return np.memmap(path, dtype=np.uint8, mode="r", offset=offset, shape=tuple(shape))
    except (KeyError, OSError, ValueError, EOFError, zipfile.BadZipFile):
        return None


def _member(z, path: Path, key: str, what: str) -> np.ndarray:
    try:
        return z[key]
    except ValueError:
        raise DataError(
            f"{path}: array {key!r} holds Python objects (it cannot be read without unpickling them); expected {what}"
        ) from None
    except (OSError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"{path}: array {key!r} cannot be read ({describe(exc)})") from None


def _as_label_vector(labels: np.ndarray) -> np.ndarray:
    """Labels saved as a column or a row, (N, 1) or (1, N), made a vector; other shapes are kept
    so that the check reports them as they are."""
    labels = np.asarray(labels)
    return labels.reshape(-1) if labels.ndim == 2 and 1 in labels.shape else labels


class FileArrays(NamedTuple):
    """The arrays of one file."""

    images: np.ndarray
    labels: np.ndarray | None
    rows: bool  # the downsampled-ImageNet row layout, whose labels are 1-based
    own_split: bool  # the file has its own split: only the asked split's arrays were read


def _load_file(path: Path, split: str | None = None) -> FileArrays:
    """The arrays of an .npy/.npz file; of a file with its own split, ``split``'s (all of them
    for ``all``)."""
    loaded = _open_npy(path, mapped=True)
    if isinstance(loaded, np.ndarray):
        return FileArrays(loaded, None, rows=False, own_split=False)
    with loaded as z:
        keys = list(z.files)
        layout = next((lay for lay in SPLIT_KEYS if lay["train"][0] in keys), None) if split else None
        if layout is not None:
            if layout["test"][0] not in keys:  # train arrays only: the fixed held-out fraction of them
                return FileArrays(*_own_split_arrays(z, path, layout, "train"), rows=False, own_split=False)
            return FileArrays(*_own_split_arrays(z, path, layout, split), rows=False, own_split=True)
        key = next((k for k in IMAGE_KEYS if k in keys), keys[0] if len(keys) == 1 else None)
        if key is None:
            raise DataError(
                f"{path}: no image array found (expected one of the keys "
                f"{', '.join(IMAGE_KEYS)}, or x_train / train_images; "
                f"the file has {', '.join(keys) or 'none'})"
            )
        lkey = next((k for k in LABEL_KEYS if k in keys), None)
        images = _mapped_member(path, key)
        if images is None:
            images = _member(z, path, key, "uint8 images")
        labels = _as_label_vector(_member(z, path, lkey, "integer labels")) if lkey else None
    rows = images.ndim == 2
    if rows:
        images = rows_to_nchw(images, str(path))
    return FileArrays(images, labels, rows, own_split=False)


def _own_split_arrays(z, path: Path, layout: dict, split: str) -> tuple[np.ndarray, np.ndarray | None]:
    present = [s for s in layout if layout[s][0] in z.files]
    wanted = present if split == "all" else [split]
    images = [_member(z, path, layout[s][0], "uint8 images") for s in wanted]
    has_labels = [layout[s][1] in z.files for s in wanted]
    if any(has_labels) and not all(has_labels):
        missing = [layout[s][1] for s, h in zip(wanted, has_labels) if not h]
        raise DataError(f"{path}: some splits have labels and others not ({', '.join(missing)} missing)")
    labels = None
    if all(has_labels):
        labels = [_as_label_vector(_member(z, path, layout[s][1], "integer labels")) for s in wanted]
        for s, im, lab in zip(wanted, images, labels):
            check_labels(lab, len(im), f"{path} ({layout[s][1]})")
        labels = np.concatenate(labels) if len(labels) > 1 else labels[0]
    if len({im.shape[1:] for im in images}) > 1:
        raise DataError(f"{path}: the {', '.join(layout[s][0] for s in wanted)} images differ in shape")
    return (np.concatenate(images) if len(images) > 1 else images[0]), labels


def _class_count(path: Path) -> int | None:
    """For a file with its own split: the class count over every split's labels."""
    with _open_npy(path) as z:
        layout = next(lay for lay in SPLIT_KEYS if lay["train"][0] in z.files)
        labels = [_member(z, path, lkey, "integer labels") for _, lkey in layout.values() if lkey in z.files]
    tops = [int(lab.max()) for lab in labels if lab.size]
    return max(tops) + 1 if tops else None


def _fix_one_based(labels: np.ndarray | None, rows: bool) -> np.ndarray | None:
    if labels is None or not rows or len(labels) == 0 or labels.dtype.kind not in "iu":
        return labels
    return labels.astype(np.int64) - 1 if labels.min() >= 1 else labels


def open_array_file(path: str | os.PathLike, split: str = "train", **view: Unpack[ViewOptions]) -> ArrayDataset:
    path = Path(path)
    split = normalize_split(split)
    loaded = _load_file(path, split)
    labels = _fix_one_based(loaded.labels, loaded.rows)
    n = len(loaded.images)
    if n == 0:
        raise DataError(f"{path}: the array holds no images")
    num_classes = _class_count(path) if loaded.own_split and labels is not None else None
    return ArrayDataset(
        loaded.images,
        labels,
        name=str(path),
        split=split,
        indices=None if loaded.own_split else held_out_indices(n, split),
        num_classes=num_classes,
        **view,
    )


IMAGENET_PROBE_NAMES = (IMAGENET_VAL_NAME,) + tuple(f"train_data_batch_{k}.npz" for k in range(1, 11))


def _batch_dirs(root: Path) -> list[Path]:
    """``root`` and those of its (non-hidden) sub-folders that hold downsampled-ImageNet
    batches (found by name, so an image folder with many class folders is not listed)."""
    if not root.is_dir():
        return []
    subs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    return [root] + [d for d in subs if any((d / name).is_file() for name in IMAGENET_PROBE_NAMES)]


def is_imagenet_batch_folder(path: Path) -> bool:
    return path.is_dir() and (
        any(path.glob(IMAGENET_TRAIN_GLOB)) or (path / IMAGENET_VAL_NAME).is_file() or len(_batch_dirs(path)) > 1
    )


def _batch_number(p: Path) -> int:
    tail = p.stem.rsplit("_", 1)[-1]
    return int(tail) if tail.isdigit() else 0


def _find_batches(root: Path) -> tuple[list[Path], list[Path]]:
    """The train batches (in batch order) and the val file under ``root`` (see the module doc)."""
    dirs = _batch_dirs(root)
    train = sorted(
        (f for d in dirs for f in d.glob(IMAGENET_TRAIN_GLOB) if f.is_file()), key=lambda f: (_batch_number(f), str(f))
    )
    val = [d / IMAGENET_VAL_NAME for d in dirs if (d / IMAGENET_VAL_NAME).is_file()]
    twice = {n for n, k in Counter(f.name for f in train).items() if k > 1}
    if twice or len(val) > 1:
        dup = [str(f.relative_to(root)) for f in train if f.name in twice] or [str(f.relative_to(root)) for f in val]
        raise DataError(
            f"{root}: cannot tell which batches to use: {', '.join(dup)} appear more than once "
            "(two data sets in one folder?); pass the folder of one data set"
        )
    return train, val


def open_imagenet_batches(root: str | os.PathLike, split: str = "train", **view: Unpack[ViewOptions]) -> ArrayDataset:
    """A folder of downsampled-ImageNet batches: ``train_data_batch_*.npz`` / ``val_data.npz``."""
    root = Path(root)
    split = normalize_split(split)
    train, val = _find_batches(root)
    held_out = not val and split != "all"  # no split of its own: hold out the fixed fraction
    files = train if held_out else {"train": train, "test": val, "all": train + val}[split]
    if not files:
        wanted = IMAGENET_TRAIN_GLOB if split == "train" else IMAGENET_VAL_NAME
        raise DataError(f"{root}: no {split} batches found (looked for {wanted}, also one folder down)")
    parts = [_load_file(f) for f in files]
    first = parts[0]
    for f, part in zip(files, parts):
        if part.images.shape[1:] != first.images.shape[1:] or (part.labels is None) != (first.labels is None):
            raise DataError(f"{f}: image shape or labels differ from {files[0]}")
    images = ConcatImages([p.images for p in parts]) if len(parts) > 1 else first.images
    labels, num_classes = None, None
    if first.labels is not None:
        rows = all(p.rows for p in parts)
        labels = _fix_one_based(np.concatenate([p.labels for p in parts]), rows)
        # the class count of the whole source, so both splits agree (labels only: cheap to read)
        others = [f for f in train + val if f not in files]
        top = max(
            [int(labels.max()) if len(labels) else -1]
            + [int(lab.max()) for lab in (_labels_of(f, rows) for f in others) if lab is not None and len(lab)]
        )
        num_classes = top + 1
    indices = held_out_indices(len(images), split) if held_out else None
    return ArrayDataset(
        images,
        labels,
        name=str(root),
        split=split,
        indices=indices,
        num_classes=num_classes,
        **view,
    )


def _labels_of(path: Path, rows: bool) -> np.ndarray | None:
    """A batch file's labels, 0-based like the loaded ones (`rows`), without reading its images."""
    try:
        with np.load(path, allow_pickle=False) as z:
            key = next((k for k in LABEL_KEYS if k in z.files), None)
            labels = None if key is None else np.asarray(z[key]).reshape(-1)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path}: not a readable .npz batch ({exc})") from None
    return _fix_one_based(labels, rows)
