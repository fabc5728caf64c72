"""``open_dataset``: one entry point that works out what kind of source ``spec`` is.

Order of detection: the word ``digits``; a folder that is (or contains) CIFAR python
batches, then downsampled-ImageNet ``.npz`` batches, then MNIST IDX files, else an image
folder; a file by its name: ``.npz``/``.npy`` arrays or ``*-idx3-ubyte[.gz]``.
"""

from __future__ import annotations

from pathlib import Path

from .arrays import is_imagenet_batch_folder, open_array_file, open_imagenet_batches
from .base import DataError, ImageDataset, normalize_split
from .cifar import find_cifar, open_cifar
from .digits import open_digits
from .folder import FolderDataset
from .idx import IMAGES_RE, find_idx_images, open_idx

EXPECTED = "`digits`, an image folder, .npz/.npy, MNIST IDX files, or a CIFAR python-batches folder"


def detect_kind(spec: str) -> str:
    """One of ``digits``, ``cifar``, ``imagenet-npz``, ``idx``, ``folder``, ``array``."""
    if spec == "digits":
        return "digits"
    if not spec.strip():
        raise DataError(f"the data source is empty (expected {EXPECTED})")
    path = Path(spec).expanduser()
    if not path.exists():
        raise DataError(f"data source {spec} does not exist (expected {EXPECTED})")
    if path.is_dir():
        if find_cifar(path) is not None:
            return "cifar"
        if is_imagenet_batch_folder(path):
            return "imagenet-npz"
        if find_idx_images(path):
            return "idx"
        return "folder"
    name = path.name.lower()
    if name.endswith((".npz", ".npy")):
        return "array"
    if IMAGES_RE.match(path.name):
        return "idx"
    if "idx1-ubyte" in name:
        raise DataError(
            f"data source {spec} is an IDX labels file; give the images file (*-images-idx3-ubyte[.gz]) or its folder"
        )
    raise DataError(f"data source {spec} is not a recognised file type (expected {EXPECTED})")


OTHER_VERSIONS = (  # (a file that shows it, what it is, what to get instead)
    ("data_batch_1.bin", "the binary version of CIFAR-10", "the python version (cifar-10-python.tar.gz)"),
    ("train.bin", "the binary version of CIFAR-100", "the python version (cifar-100-python.tar.gz)"),
    (
        "train_data_batch_1",
        "the pickled version of downsampled ImageNet",
        "its npz version (Imagenet32_train_npz.zip, ...)",
    ),
    ("val_data", "the pickled version of downsampled ImageNet", "its npz version (Imagenet32_val_npz.zip, ...)"),
)


def _refuse_other_versions(path: Path) -> None:
    """For a folder without images: formats of the public data sets that are not read, named
    with what to use instead (rather than "no images found")."""
    places = (path, *(p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")))
    for name, what, instead in OTHER_VERSIONS:
        for place in places:
            if (place / name).is_file():
                raise DataError(f"{place / name} is {what}, which is not read; use {instead}")


def open_dataset(
    spec: str = "digits",
    split: str = "train",
    image_size: int | None = None,
    channels: int | None = None,
    flip: bool = False,
) -> ImageDataset:
    """Open a data source (README.md, "Data"; detected as the module docstring says) as an
    :class:`ImageDataset`.

    ``split``: ``train``, ``test`` (alias ``val``) or ``all``. ``image_size`` / ``channels``
    default to what the data has. ``flip`` enables random horizontal flips, which the
    loader's sampler decides per (seed, epoch, index). Raises :class:`DataError`.
    """
    spec = str(spec)
    split = normalize_split(split)
    if image_size is not None and int(image_size) < 1:
        raise DataError(f"image size must be a positive number of pixels, got {image_size}")
    if channels is not None and int(channels) not in (1, 3):
        raise DataError(f"channels must be 1 or 3, got {channels}")
    kwargs = dict(split=split, image_size=image_size, channels=channels, flip=flip)
    try:
        kind = detect_kind(spec)
        if kind == "digits":
            return open_digits(**kwargs)
        path = Path(spec).expanduser()
        opener = {
            "cifar": open_cifar,
            "imagenet-npz": open_imagenet_batches,
            "idx": open_idx,
            "folder": FolderDataset,
            "array": open_array_file,
        }[kind]
        try:
            return opener(path, **kwargs)
        except DataError:
            if kind == "folder":
                _refuse_other_versions(path)
            raise
    except OSError as e:  # e.g. a folder without read permission: a bad source, not a crash
        where = "" if e.filename in (None, spec) else f": {e.filename}"
        raise DataError(f"data source {spec}{where} cannot be read ({e.strerror or e})") from None
