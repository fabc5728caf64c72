"""Folders of image files.

Layouts:
- ``root/<class_name>/**/*.png|jpg|...``: labelled, classes are the sorted sub-folder names
  (files directly in ``root`` are then ignored);
- ``root/*.png|jpg|...``: a flat folder, unlabelled;
- ``root/train/`` with ``root/val/`` (or ``test/``, ``valid/``, ``validation/``), each in one
  of the layouts above: the folder's own split. Otherwise the test split is a fixed
  held-out 5% (see :func:`~tarflow_core.data.base.held_out_indices`).

Only the file list is kept in memory. Every file is checked once up front (Pillow
``open`` + ``verify``, which reads headers and, for PNG, the chunk checksums); files that
fail are counted in ``skipped`` and left out. A file that passes but fails to decode later
(e.g. a truncated JPEG) raises :class:`DataError` naming it. Images are converted to RGB
(or L for ``channels=1``), the shorter side resized to ``image_size`` and center-cropped.
Defaults when not given: ``image_size`` = shorter side of the first image, ``channels`` = 1
when the first image is grayscale, else 3.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from .base import DataError, ImageDataset, held_out_indices, normalize_split, resize_center_crop

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"}
TEST_DIR_NAMES = ("val", "test", "valid", "validation")
GRAY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "F"}


def is_image_file(p: Path) -> bool:
    return p.suffix.lower() in IMAGE_EXTS and not p.name.startswith(".") and p.is_file()


def _subdirs(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))


def _images_under(d: Path) -> list[Path]:
    return sorted(p for p in d.rglob("*") if is_image_file(p))


def own_split_dirs(root: Path) -> dict[str, Path] | None:
    """``{"train": root/train, "test": root/val}`` when the folder has its own split."""
    names = {p.name.lower(): p for p in _subdirs(root)}
    test = next((names[n] for n in TEST_DIR_NAMES if n in names), None)
    if "train" in names and test is not None:
        return {"train": names["train"], "test": test}
    return None


def _class_names(d: Path) -> list[str]:
    """Sorted names of the sub-folders of ``d`` that hold at least one image (any depth)."""
    return [sub.name for sub in _subdirs(d) if any(is_image_file(p) for p in sub.rglob("*"))]


def _probe(path: Path) -> tuple[bool, tuple[int, int], str]:
    try:
        with Image.open(path) as im:
            size, mode = im.size, im.mode
            im.verify()
        return True, size, mode
    except Exception:  # noqa: BLE001 - any failure means "unreadable"
        return False, (0, 0), ""


def _probe_all(files: list[Path]) -> list[tuple[bool, tuple[int, int], str]]:
    if len(files) < 64:
        return [_probe(f) for f in files]
    with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 4)) as pool:
        return list(pool.map(_probe, files, chunksize=64))


class FolderDataset(ImageDataset):
    """Image files loaded lazily from a folder (see the module docstring for layouts)."""

    def __init__(self, root: str | os.PathLike, split: str = "train", image_size: int | None = None,
                 channels: int | None = None, flip: bool = False):
        root = Path(root)
        self.name, self.split, self.flip = str(root), normalize_split(split), flip
        split_dirs = own_split_dirs(root)
        all_dirs = [root] if split_dirs is None else [split_dirs["train"], split_dirs["test"]]
        use_dirs = all_dirs if split_dirs is None or self.split == "all" else [split_dirs[self.split]]
        class_names = {d: _class_names(d) for d in all_dirs}
        labelled = [bool(names) for names in class_names.values()]
        if any(labelled) and not all(labelled):
            raise DataError(f"{root}: the train and test folders disagree: one has class "
                            "sub-folders and the other does not")
        files: list[Path] = []
        labels: list[int] = []
        if any(labelled):
            self.class_names = sorted({c for names in class_names.values() for c in names})
            for d in use_dirs:
                for cname in class_names[d]:
                    cfiles = _images_under(d / cname)
                    files += cfiles
                    labels += [self.class_names.index(cname)] * len(cfiles)
        else:
            self.class_names = []
            files = [p for d in use_dirs for p in sorted(d.iterdir()) if is_image_file(p)]
            labels = [-1] * len(files)
        if not files:
            where = ", ".join(str(d) for d in use_dirs)
            raise DataError(f"{where}: no images found (looked for {', '.join(sorted(IMAGE_EXTS))} "
                            "files in class sub-folders or directly in the folder)")
        probes = _probe_all(files)
        good = [i for i, (ok, _, _) in enumerate(probes) if ok]
        self.skipped = len(files) - len(good)
        if not good:
            raise DataError(f"{root}: none of the {len(files)} image files could be read")
        self.files = [files[i] for i in good]
        self.labels = np.asarray([labels[i] for i in good], dtype=np.int64)
        self.num_classes = len(self.class_names)
        _, first_size, first_mode = probes[good[0]]
        self.image_size = int(image_size or min(first_size))
        self.channels = int(channels or (1 if first_mode in GRAY_MODES else 3))
        if self.channels not in (1, 3):
            raise DataError(f"{root}: channels must be 1 or 3, got {self.channels}")
        if split_dirs is None:
            self.indices = held_out_indices(len(self.files), self.split)
        else:
            self.indices = np.arange(len(self.files))
        if len(self.indices) == 0:
            raise DataError(f"{root}: the {self.split} split has no images")

    def __len__(self) -> int:
        return len(self.indices)

    def load(self, i: int) -> tuple[np.ndarray, int]:
        j = int(self.indices[i])
        path = self.files[j]
        try:
            with Image.open(path) as im:
                im = im.convert("L" if self.channels == 1 else "RGB")
        except Exception as exc:  # noqa: BLE001
            raise DataError(f"{path}: cannot decode image ({exc})") from None
        arr = np.asarray(resize_center_crop(im, self.image_size))
        arr = arr[None] if self.channels == 1 else arr.transpose(2, 0, 1)
        return arr, int(self.labels[j])

