"""CIFAR-10 / CIFAR-100 "python version" batch folders.

- ``cifar-10-batches-py``: ``data_batch_1`` .. ``data_batch_5`` (train), ``test_batch``
  (test), ``batches.meta`` (``label_names``).
- ``cifar-100-python``: ``train``, ``test``, ``meta`` (``fine_label_names``); the 100 fine
  labels are used.
The folder itself or its parent (holding one of those folders) may be given.

The batches are pickles. They are read with :class:`SafeUnpickler`, which resolves only
the numpy names needed to rebuild plain arrays (``_reconstruct``, ``ndarray``, ``dtype``,
and ``_frombuffer`` for pickle protocol 5) and non-object numpy scalars (``scalar``), plus
a latin-1-only ``_codecs.encode`` (how Python 3 protocol-2 pickles store bytes), and
refuses every other global, so a crafted file cannot run code: it is rejected with a
:class:`DataError`.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .arrays import rows_to_nchw
from .base import ArrayDataset, DataError, ViewOptions, normalize_split

if TYPE_CHECKING:
    from typing_extensions import Unpack

_RECONSTRUCT = np.empty(0).__reduce__()[0]
_FROMBUFFER = np.zeros(1).__reduce_ex__(5)[0]
_SCALAR = np.int64(0).__reduce__()[0]  # numpy.core.multiarray.scalar(dtype, raw bytes)


def _scalar(dtype, data=None):
    """A numpy scalar from its dtype and raw bytes (labels kept as numpy integers pickle this
    way); only plain, non-object dtypes, so it cannot hand back an arbitrary object."""
    if not isinstance(dtype, np.dtype) or dtype.hasobject or not isinstance(data, bytes):
        raise pickle.UnpicklingError(f"numpy scalar of {dtype!r} is not allowed")
    return _SCALAR(dtype, data)


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """What Python 3 protocol-2 pickles use to store bytes: ``_codecs.encode(s, "latin1")``."""
    if encoding.replace("-", "").lower() != "latin1" or not isinstance(text, str):
        raise pickle.UnpicklingError(f"_codecs.encode with {encoding!r} is not allowed")
    return text.encode("latin1")


ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy.core.numeric", "_frombuffer"): _FROMBUFFER,
    ("numpy._core.numeric", "_frombuffer"): _FROMBUFFER,
    ("numpy.core.multiarray", "scalar"): _scalar,
    ("numpy._core.multiarray", "scalar"): _scalar,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
}

CIFAR10 = {
    "dir": "cifar-10-batches-py",
    "train": [f"data_batch_{i}" for i in range(1, 6)],
    "test": ["test_batch"],
    "meta": "batches.meta",
    "names": "label_names",
    "labels": "labels",
    "classes": 10,
}
CIFAR100 = {
    "dir": "cifar-100-python",
    "train": ["train"],
    "test": ["test"],
    "meta": "meta",
    "names": "fine_label_names",
    "labels": "fine_labels",
    "classes": 100,
}


class SafeUnpickler(pickle.Unpickler):
    """Unpickler that builds only containers, strings, numbers and numpy arrays."""

    def find_class(self, module: str, name: str):
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed") from None

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("persistent ids are not allowed")


def safe_load_pickle(path: str | os.PathLike) -> dict[str, object]:
    """Load a CIFAR batch (a dict) with :class:`SafeUnpickler`; bytes keys become str."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            obj = SafeUnpickler(fh, encoding="bytes").load()
    except pickle.UnpicklingError as exc:
        raise DataError(
            f"{path}: refused to load this pickle ({exc}); CIFAR batches hold only dicts, lists, bytes and numpy arrays"
        ) from None
    except Exception as exc:  # noqa: BLE001 - truncated or not a pickle at all
        raise DataError(f"{path}: not a readable CIFAR python batch ({type(exc).__name__}: {exc})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a CIFAR batch dict, found {type(obj).__name__}")
    return {(k.decode("latin-1") if isinstance(k, bytes) else str(k)): v for k, v in obj.items()}


def _layout_at(root: Path) -> dict | None:
    if not root.is_dir():
        return None
    if any((root / f).is_file() for f in CIFAR10["train"] + CIFAR10["test"]):
        return CIFAR10
    if any((root / f).is_file() for f in CIFAR100["train"] + CIFAR100["test"]) and (root / "meta").is_file():
        return CIFAR100
    return None


def find_cifar(path: Path) -> tuple[Path, dict] | None:
    """The CIFAR batch folder at ``path`` (or in it) and its layout, or None. A folder holding
    both ``cifar-10-batches-py`` and ``cifar-100-python`` is ambiguous (:class:`DataError`)."""
    layout = _layout_at(path)
    if layout is not None:
        return path, layout
    found = [(path / lay["dir"], lay) for lay in (CIFAR10, CIFAR100) if _layout_at(path / lay["dir"]) is lay]
    if len(found) > 1:
        raise DataError(
            f"{path} holds both {CIFAR10['dir']} and {CIFAR100['dir']}; give the one to use "
            f"(--data {found[0][0]} or --data {found[1][0]})"
        )
    return found[0] if found else None


def _read_batch(path: Path, layout: dict) -> tuple[np.ndarray, np.ndarray]:
    batch = safe_load_pickle(path)
    data = batch.get("data")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim not in (2, 4):
        raise DataError(
            f"{path}: expected 'data' to be a uint8 array of rows (N, 3072), "
            f"got {type(data).__name__} {getattr(data, 'dtype', '')} {getattr(data, 'shape', '')}"
        )
    images = rows_to_nchw(data, str(path)) if data.ndim == 2 else data
    key = layout["labels"]
    if key not in batch:
        raise DataError(f"{path}: no {key!r} entry (expected a {layout['dir']} batch)")
    labels = np.asarray(batch[key])
    if labels.ndim != 1 or len(labels) != len(images) or labels.dtype.kind not in "iu":
        raise DataError(f"{path}: expected {len(images)} integer {key!r}, got {labels.dtype} {labels.shape}")
    return images, labels.astype(np.int64)


def _class_names(root: Path, layout: dict) -> list[str]:
    meta = root / layout["meta"]
    if meta.is_file():
        names = safe_load_pickle(meta).get(layout["names"])
        if isinstance(names, (list, tuple)) and names:
            return [n.decode("utf-8", "replace") if isinstance(n, bytes) else str(n) for n in names]
    return [str(k) for k in range(layout["classes"])]


def open_cifar(path: str | os.PathLike, split: str = "train", **view: Unpack[ViewOptions]) -> ArrayDataset:
    path = Path(path)
    split = normalize_split(split)
    found = find_cifar(path)
    if found is None:
        raise DataError(
            f"{path}: not a CIFAR python-batches folder (looked for data_batch_1..5 / "
            "test_batch, or train / test / meta)"
        )
    root, layout = found
    wanted = layout["train"] + layout["test"] if split == "all" else layout[split]
    files = [root / f for f in wanted if (root / f).is_file()]
    if not files:
        raise DataError(f"{root}: no {split} batches found (looked for {', '.join(wanted)})")
    parts = [_read_batch(f, layout) for f in files]
    if len({p[0].shape[1:] for p in parts}) > 1:
        raise DataError(f"{root}: the batches {', '.join(f.name for f in files)} differ in image shape")
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    names = _class_names(root, layout)
    if len(labels) and labels.max() >= len(names):
        raise DataError(f"{root}: label {labels.max()} is out of range for {len(names)} classes")
    return ArrayDataset(
        images,
        labels,
        name=str(root),
        split=split,
        class_names=names,
        num_classes=len(names),
        **view,
    )
