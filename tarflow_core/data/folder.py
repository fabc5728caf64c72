"""Folders of image files.

Layouts:
- ``root/<class_name>/**/*.png|jpg|...``: labelled, classes are the sorted sub-folder names
  (files directly in ``root`` are then ignored);
- ``root/*.png|jpg|...``: a flat folder, unlabelled;
- ``root/train/`` with ``root/val/`` (or ``test/``, ``valid/``, ``validation/``), each in one
  of the layouts above: the folder's own split. Otherwise the test split is a fixed
  held-out 5% (see :func:`~tarflow_core.data.base.held_out_indices`).

Only the file list is kept in memory. Every file is checked once up front (Pillow
``open`` + ``verify``, which reads headers and, for PNG, the chunk checksums; a JPEG that does
not end in its end-of-image marker is decoded at 1/8 scale to see whether it is truncated);
files that fail (and broken links, and sub-folders that cannot be listed) are counted in
``skipped`` and left out. Hidden files and folders are ignored; linked folders are followed.
A file that passes but fails to decode later is replaced by the next file that decodes
(deterministically, so runs stay reproducible), with a Python warning and a count in
``late_skipped`` (of this process). Images are turned upright by their EXIF orientation (as
viewers show them), converted to 8-bit RGB (or L for ``channels=1``; 16-bit grayscale is
scaled, not clipped), the shorter side resized to ``image_size`` and center-cropped. Defaults
when not given: ``image_size`` = the most common shorter side, ``channels`` = 1 when every
image is grayscale, else 3.

A folder holding only ``train/`` (no ``val/``/``test/``) is that split's folder, with the fixed
held-out fraction as the test split.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, UnidentifiedImageError

from .base import (
    GRAY_MODES,
    DataError,
    ImageDataset,
    eight_bit,
    held_out_indices,
    normalize_split,
    resize_center_crop,
    upright,
)

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"}
# Photo formats tried as well: used where this Pillow reads them (AVIF, JPEG 2000), else counted
# as unreadable like a corrupt file, never passed over without a word (iPhone HEIC, JPEG XL).
MORE_EXTS = {".avif", ".jp2", ".heic", ".heif", ".jxl"}
ALL_EXTS = IMAGE_EXTS | MORE_EXTS
TEST_DIR_NAMES = ("val", "test", "valid", "validation")
MAX_REPLACEMENTS = 16  # images tried in place of one that fails to decode, before giving up


def is_image_file(p: Path) -> bool:
    """An image by its name (not hidden), that is a file or a link to one; a broken link is
    listed too, so that it is counted as unreadable rather than missed without a word."""
    return (
        p.suffix.lower() in ALL_EXTS
        and not p.name.startswith(".")
        and (p.is_file() or (p.is_symlink() and not p.exists()))
    )


def _subdirs(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))


def _iter_images(d: Path, unreadable: list[str] | None = None) -> Iterator[Path]:
    """Image files at any depth under ``d`` (as :func:`is_image_file` tells, from the directory
    listing: no call per file). Linked folders are followed, each once, and never a link back
    up to ``d`` or above it (which would loop, or take in other classes); hidden folders are
    not followed; folders that cannot be listed are added to ``unreadable``."""
    seen: set[str] = set()
    base = os.path.join(os.path.realpath(d), "")
    stack = [Path(d)]
    while stack:
        top = stack.pop()
        real = os.path.realpath(top)
        if real in seen or (seen and base.startswith(os.path.join(real, ""))):
            continue
        seen.add(real)
        try:
            with os.scandir(top) as it:
                entries = sorted((e.name, e) for e in it if not e.name.startswith("."))
        except OSError as err:
            if unreadable is not None:
                unreadable.append(str(err.filename or top))
            continue
        subdirs = []
        for name, entry in entries:
            try:
                if entry.is_dir():
                    subdirs.append(top / name)
                elif os.path.splitext(name)[1].lower() in ALL_EXTS and (entry.is_file() or entry.is_symlink()):
                    yield top / name  # a file, a link to one, or a broken link (counted as unreadable)
            except OSError:
                continue
        stack.extend(reversed(subdirs))


def _images_under(d: Path, unreadable: list[str] | None = None) -> list[Path]:
    return sorted(_iter_images(d, unreadable))


def own_split_dirs(root: Path) -> dict[str, Path | None] | None:
    """``{"train": root/train, "test": root/val}`` when the folder has its own split;
    ``{"train": root/train, "test": None}`` when ``train/`` is its only sub-folder with images."""
    names = {p.name.lower(): p for p in _subdirs(root)}
    if "train" not in names:
        return None
    test = next((names[n] for n in TEST_DIR_NAMES if n in names), None)
    if test is not None:
        return {"train": names["train"], "test": test}
    if any(is_image_file(f) for f in root.iterdir()) or _class_names(root) != [names["train"].name]:
        return None  # "train" is just one class among others
    return {"train": names["train"], "test": None}


def _class_names(d: Path) -> list[str]:
    """Sorted names of the sub-folders of ``d`` that hold at least one image (any depth), or
    that cannot be listed (a class all the same: its images are counted as unreadable)."""

    def is_class(sub: Path) -> bool:
        denied: list[str] = []
        return next(_iter_images(sub, denied), None) is not None or bool(denied)

    return [sub.name for sub in _subdirs(d) if is_class(sub)]


JPEG_END = b"\xff\xd9"


class Probe(NamedTuple):
    ok: bool  # readable
    size: tuple[int, int]  # (width, height); (0, 0) when unreadable
    mode: str  # the Pillow mode; for an unreadable file, why


def _probe(path: Path) -> Probe:
    """Whether ``path`` is an image Pillow reads to the end, and its size and mode."""
    try:
        with open(path, "rb") as f:  # one open for the header check and, for JPEG, the tail
            with Image.open(f) as im:
                size, mode, fmt = im.size, im.mode, im.format
                im.verify()  # for JPEG this checks nothing beyond the header
            if fmt == "JPEG" and not _ends_like_jpeg(f):
                f.seek(0)
                with Image.open(f) as im:
                    im.draft(im.mode, (1, 1))  # decode at 1/8 scale: enough to hit a truncation
                    im.load()
        return Probe(True, size, mode)
    except Exception as exc:  # noqa: BLE001 - any failure means "unreadable"
        if isinstance(exc, UnidentifiedImageError):
            reason = "not an image file Pillow can read"
        elif isinstance(exc, OSError) and exc.strerror:
            reason = exc.strerror
        else:
            reason = str(exc).strip().split("\n")[0]
        return Probe(False, (0, 0), reason or type(exc).__name__)


def _ends_like_jpeg(f) -> bool:
    """Whether an open file's last bytes hold the end-of-image marker (a truncated file lacks
    it; a few writers append padding, which the caller's trial decode then clears)."""
    f.seek(0, os.SEEK_END)
    f.seek(max(0, f.tell() - 16))
    return JPEG_END in f.read()


_LAST_PROBED: dict = {}  # the last probe of a file list: its fingerprint and compact results


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def _probe_all(files: list[Path]) -> list[Probe]:
    """``_probe`` of every file. Training opens the train and the test split of a folder one
    after the other, and both list the same files when the test split is held out of them:
    the second open reuses the first's checks (for files of unchanged size and time) instead
    of reading every file again. Only a fingerprint and compact results are kept."""
    key = hash((tuple(map(str, files)), tuple(_stamp(f) for f in files)))
    if _LAST_PROBED.get("key") == key:
        ok, sizes, modes = _LAST_PROBED["ok"], _LAST_PROBED["sizes"], _LAST_PROBED["modes"]
        return [Probe(bool(o), (int(w), int(h)), m) for o, (w, h), m in zip(ok, sizes, modes)]
    probes = _probe_files(files)
    _LAST_PROBED.clear()
    _LAST_PROBED.update(
        key=key,
        ok=np.array([p.ok for p in probes], bool),
        sizes=np.array([p.size for p in probes], np.int64).reshape(-1, 2),
        modes=[sys.intern(p.mode) for p in probes],
    )
    return probes


def _probe_files(files: list[Path]) -> list[Probe]:
    if len(files) < 64:
        return [_probe(f) for f in files]
    with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 4)) as pool:
        return list(pool.map(_probe, files, chunksize=64))


class FolderDataset(ImageDataset):
    """Image files loaded lazily from a folder (see the module docstring for layouts)."""

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "train",
        image_size: int | None = None,
        channels: int | None = None,
        flip: bool = False,
    ):
        root = Path(root)
        self.name, self.split, self.flip = str(root), normalize_split(split), flip
        split_dirs = own_split_dirs(root)
        held_out = split_dirs is None or split_dirs["test"] is None  # test = fixed fraction of the files
        all_dirs = [root] if split_dirs is None else [d for d in split_dirs.values() if d is not None]
        use_dirs = all_dirs if held_out or self.split == "all" else [split_dirs[self.split]]
        class_names = {d: _class_names(d) for d in all_dirs}
        labelled = [bool(names) for names in class_names.values()]
        if any(labelled) and not all(labelled):
            # ImageNet as shipped: train/<class>/*.JPEG but val/*.JPEG flat (labels in a separate
            # file). Training needs only train/; a test split without labels cannot be made.
            train_dir, test_dir = split_dirs["train"], split_dirs["test"]
            if not (self.split == "train" and class_names[train_dir]):
                flat, other = (test_dir, train_dir) if class_names[train_dir] else (train_dir, test_dir)
                raise DataError(
                    f"{root}: {flat.name}/ holds images without class sub-folders but "
                    f"{other.name}/ has them, so {flat.name}/'s images have no labels; sort them "
                    f"into class folders, or give --data {train_dir} alone (a fixed fraction of "
                    "it is then held out for testing)"
                )
            all_dirs = use_dirs = [train_dir]
            class_names = {train_dir: class_names[train_dir]}
        files: list[Path] = []
        labels: list[int] = []
        unreadable: list[str] = []  # folders that could not be listed
        if any(labelled):
            self.class_names = sorted({c for names in class_names.values() for c in names})
            for d in use_dirs:
                for cname in class_names[d]:
                    cfiles = _images_under(d / cname, unreadable)
                    files += cfiles
                    labels += [self.class_names.index(cname)] * len(cfiles)
        else:
            self.class_names = []
            files = [p for d in use_dirs for p in sorted(d.iterdir()) if is_image_file(p)]
            labels = [-1] * len(files)
        if not files:
            where = ", ".join(str(d) for d in use_dirs)
            denied = (
                f"; {len(unreadable)} folder(s) could not be read: {', '.join(unreadable[:3])}" if unreadable else ""
            )
            raise DataError(
                f"{where}: no images found (looked for {', '.join(sorted(ALL_EXTS))} "
                f"files in class sub-folders or directly in the folder{denied})"
            )
        probes = _probe_all(files)
        good = [i for i, probe in enumerate(probes) if probe.ok]
        self.skipped = len(files) - len(good) + len(unreadable)
        self.unreadable_dirs = unreadable
        if not good:
            raise DataError(
                f"{root}: none of the {len(files)} image files could be read (the first, {files[0]}: {probes[0].mode})"
            )
        self.files = [files[i] for i in good]
        self.labels = np.asarray([labels[i] for i in good], dtype=np.int64)
        self.num_classes = len(self.class_names)
        sides = Counter(min(probes[i].size) for i in good)
        self.image_size = int(image_size or sides.most_common(1)[0][0])
        self.channels = int(channels or (1 if all(probes[i].mode in GRAY_MODES for i in good) else 3))
        if self.channels not in (1, 3):
            raise DataError(f"{root}: channels must be 1 or 3, got {self.channels}")
        self.late_skipped = 0
        if held_out:
            self.indices = held_out_indices(len(self.files), self.split)
        else:
            self.indices = np.arange(len(self.files))
        if len(self.indices) == 0:
            raise DataError(f"{root}: the {self.split} split has no images")

    def __len__(self) -> int:
        return len(self.indices)

    def load(self, i: int) -> tuple[np.ndarray, int]:
        tries = min(len(self.indices), MAX_REPLACEMENTS + 1)
        for step in range(tries):
            j = int(self.indices[(i + step) % len(self.indices)])
            try:
                return self._decode(self.files[j]), int(self.labels[j])
            except Exception as exc:  # noqa: BLE001 - Pillow raises many types for bad files
                self.late_skipped += 1
                warnings.warn(
                    f"{self.files[j]}: cannot decode image ({exc}); using the next image instead",
                    RuntimeWarning,
                    stacklevel=2,
                )
        raise DataError(
            f"{self.name}: {tries} {self.split} images in a row could not be read "
            f"(the last: {self.files[j]}); has the data moved?"
        )

    def _decode(self, path: Path) -> np.ndarray:
        with Image.open(path) as im:
            im = eight_bit(upright(im))
        if self.channels == 1 and im.mode != "L":
            im = im.convert("L")
        elif self.channels == 3 and im.mode != "RGB":
            im = im.convert("RGB")
        arr = np.asarray(resize_center_crop(im, self.image_size))
        return arr[None] if self.channels == 1 else arr.transpose(2, 0, 1)
