"""Reading image inputs and writing model outputs for the `tarflow` commands.

Model space is NCHW float in [-1, 1] scale; 8-bit images are NCHW uint8.
"""

from __future__ import annotations

import io
import json
import math
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from tarflow_core.atomic import atomic_path
from tarflow_core.data.arrays import IMAGE_KEYS as DATA_IMAGE_KEYS
from tarflow_core.data.arrays import LABEL_KEYS
from tarflow_core.data.base import eight_bit
from tarflow_core.data.folder import IMAGE_EXTS as FOLDER_IMAGE_EXTS
from tarflow_core.load_errors import describe, file_head, not_numpy

from .console import InputError, WriteError  # noqa: F401 - raised here, caught by console.user_errors

_COMMON_EXTS = (".png", ".jpg", ".jpeg")
IMAGE_EXTS = _COMMON_EXTS + tuple(sorted(FOLDER_IMAGE_EXTS - set(_COMMON_EXTS)))
FLOAT_DTYPES = (np.float16, np.float32, np.float64)
PNG_META_KEY = "tarflow"
NPZ_META_KEY = "tarflow_meta"
# the keys `--data` reads, our own `arr_0` first
_NPZ_IMAGE_KEYS = ("arr_0",) + tuple(k for k in DATA_IMAGE_KEYS if k != "arr_0")
_OUT_FORMS = "a .png, .npz, .npy path, a folder ending in /, or -"


@dataclass
class Inputs:
    images: np.ndarray  # NCHW; uint8 when is_uint8, else float32 model space
    is_uint8: bool
    sources: list[str]
    labels: np.ndarray | None
    skipped: list[str] = field(default_factory=list)  # unreadable image files in the folders given


@dataclass
class _Chunk:
    name: str
    images: np.ndarray
    sources: list[str]
    labels: np.ndarray | None


# --------------------------------------------------------------------------- reading


def read_inputs(
    paths: list[str], stdin: BinaryIO | None = None, *, channels: int | None = None, strict: bool = False
) -> Inputs:
    """Read image files, folders, .npz/.npy arrays and `-` (a .npy on stdin), in order. A folder's
    unreadable image file is skipped and listed in `Inputs.skipped` (as training skips them); `strict`
    refuses them, naming each. Any NCHW array of `channels` channels (the model's) is taken as it is."""
    dashes = sum(str(p) == "-" for p in paths)
    if dashes > 1:
        raise InputError(f"- (stdin) is given {dashes} times; stdin can be read only once")
    chunks: list[_Chunk] = []
    skipped: list[tuple[str, str]] = []  # (file, why)
    for p in paths:
        chunks.extend(_read_one(str(p), stdin, channels, skipped))
    if skipped and (strict or not any(len(c.images) for c in chunks)):
        first, why = skipped[0]
        rest = [name for name, _ in skipped[1:]]
        more = f" ({len(rest)} more unreadable file{'s' * (len(rest) > 1)}: {', '.join(rest)})" if rest else ""
        raise InputError(f"could not read image {first}: {why}{more}")
    if not chunks or sum(len(c.images) for c in chunks) == 0:
        given = ", ".join(map(str, paths)) or "no inputs were given"
        raise InputError(f"no images to read: {given} (expected image files, folders, .npz, .npy or -)")

    chunks = [c for c in chunks if len(c.images)]
    first = chunks[0]
    for c in chunks:
        if c.images.shape[1:] != first.images.shape[1:] or c.images.dtype != first.images.dtype:
            raise InputError(
                f"{c.name} holds images of shape {_describe(c.images)} but {first.name} "
                f"holds {_describe(first.images)}; all inputs must share one shape and kind"
            )
    labels = None
    if all(c.labels is not None for c in chunks):
        labels = np.concatenate([c.labels for c in chunks]).astype(np.int64)
    return Inputs(
        images=np.concatenate([c.images for c in chunks]),
        is_uint8=first.images.dtype == np.uint8,
        sources=[s for c in chunks for s in c.sources],
        labels=labels,
        skipped=[name for name, _ in skipped],
    )


def read_labels(path: str) -> np.ndarray:
    """Read a 1-D integer label array from a .npy (or a .npz `labels`/`arr_0`) as int64."""
    arr = None
    problem = not_numpy(file_head(path))
    if problem:
        raise InputError(f"could not read labels {path}: {problem} (expected a .npy of integers)")
    try:
        with open(path, "rb") as f:
            loaded = np.load(f, allow_pickle=False)
            if isinstance(loaded, np.lib.npyio.NpzFile):
                key = next((k for k in ("labels", "arr_0") if k in loaded.files), None)
                arr = loaded[key] if key else None
            else:
                arr = loaded
    except (OSError, ValueError, EOFError) as e:
        raise InputError(f"could not read labels {path}: {describe(e)} (expected a .npy of integers)") from None
    if arr is None or arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        got = "no labels or arr_0 array" if arr is None else f"{arr.dtype} array of shape {arr.shape}"
        raise InputError(f"labels file {path} holds a {got}; expected a 1-D integer array")
    if arr.dtype.kind == "u" and len(arr) and int(arr.max()) > np.iinfo(np.int64).max:  # would wrap negative
        raise InputError(f"labels file {path}: label {int(arr.max())} is far out of range; expected class indices")
    return arr.astype(np.int64)


def _read_one(path: str, stdin: BinaryIO | None, channels: int | None, skipped: list) -> list[_Chunk]:
    if path == "-":
        if stdin is None:
            if sys.stdin is None:  # `<&-`
                raise InputError("stdin (-) is closed; expected .npy bytes, e.g. from `tarflow sample --out -`")
            if sys.stdin.isatty():  # reading would wait for typing that never comes
                raise InputError(
                    "stdin (-) is a terminal; pipe .npy bytes into it (e.g. from `tarflow sample "
                    "--out -`) or give a file"
                )
            stdin = sys.stdin.buffer
        data = stdin.read()
        if not data:
            raise InputError("stdin (-) is empty; expected .npy bytes, e.g. from `tarflow sample --out -`")
        return [_load_array_bytes(data, "-", channels)]
    p = Path(path)
    if not p.exists():
        raise InputError(f"input {path} does not exist; expected an image file, a folder, a .npz, a .npy or -")
    if p.is_dir():
        files = sorted(
            f
            for f in p.rglob("*")
            if f.is_file()
            and f.suffix.lower() in IMAGE_EXTS
            and not any(part.startswith(".") for part in f.relative_to(p).parts)
        )
        if not files:
            looked = ", ".join("*" + e for e in IMAGE_EXTS)
            raise InputError(f"folder {path} holds no image files (looked for {looked})")
        return [chunk for chunk in (_read_folder_image(f, skipped) for f in files) if chunk is not None]
    if p.suffix.lower() in (".npy", ".npz"):
        try:
            data = p.read_bytes()
        except OSError as e:
            raise InputError(f"could not read {path}: {e}") from None
        return [_load_array_bytes(data, path, channels)]
    return [_read_image(p)]


def _read_image(p: Path) -> _Chunk:
    try:
        with Image.open(p) as img:
            img.load()
            arr = _image_to_hwc(img)
    except Exception as e:  # Pillow raises many types for bad files
        raise InputError(f"could not read image {p}: {e}") from None
    return _Chunk(str(p), arr.transpose(2, 0, 1)[None], [str(p)], None)


def _read_folder_image(p: Path, skipped: list) -> _Chunk | None:
    """A folder's image, or None with (file, why) added to `skipped` when it cannot be read."""
    try:
        return _read_image(p)
    except InputError as e:
        skipped.append((str(p), str(e).removeprefix(f"could not read image {p}: ")))
        return None


def _image_to_hwc(img: Image.Image) -> np.ndarray:
    arr = np.asarray(eight_bit(img))
    return arr[..., None] if arr.ndim == 2 else arr


def _load_array_bytes(data: bytes, name: str, channels: int | None = None) -> _Chunk:
    problem = not_numpy(data[:6])
    if problem:
        raise InputError(f"could not load {name} as a .npy/.npz array: {problem}")
    try:
        loaded = np.load(io.BytesIO(data), allow_pickle=False)
        labels = None
        flat_key = None
        if isinstance(loaded, np.lib.npyio.NpzFile):
            key = next((k for k in _NPZ_IMAGE_KEYS if k in loaded.files), None)
            label_key = next((k for k in LABEL_KEYS if k in loaded.files), None)
            if key is None:
                rest = [k for k in loaded.files if k not in (label_key, NPZ_META_KEY)]
                if len(rest) != 1:
                    raise InputError(
                        f"{name} holds arrays {loaded.files or 'none'}; expected one named "
                        f"{', '.join(_NPZ_IMAGE_KEYS)} (labels optional: {', '.join(LABEL_KEYS)})"
                    )
                key = rest[0]
            arr = loaded[key]
            if label_key is not None:
                labels = loaded[label_key]
            flat_key = key
        else:
            arr = loaded
    except InputError:
        raise
    except (OSError, ValueError, EOFError) as e:
        raise InputError(f"could not load {name} as a .npy/.npz array: {describe(e)}") from None

    images = _to_nchw(arr, name, channels)
    if labels is not None:
        if labels.ndim != 1 or len(labels) != len(images) or not np.issubdtype(labels.dtype, np.integer):
            raise InputError(
                f"{name}: the labels are a {labels.dtype} array of shape {labels.shape}; "
                f"expected {len(images)} integers, one per image"
            )
        labels = labels.astype(np.int64)
        if flat_key == "data" and arr.ndim == 2 and len(labels) and labels.min() >= 1:
            labels = labels - 1  # downsampled-ImageNet batches use 1-based labels
    return _Chunk(name, images, [f"{name}[{i}]" for i in range(len(images))], labels)


def _to_nchw(arr: np.ndarray, name: str, channels: int | None = None) -> np.ndarray:
    """Arrange a uint8 (NHWC, NCHW, NHW, flat rows) or float (NCHW, NHW) array as NCHW; an NCHW
    array of `channels` channels (the model's) is taken as it is."""
    is_float = arr.dtype in FLOAT_DTYPES
    bad = f"{name}: unsupported {arr.dtype} array of shape {arr.shape}; expected "
    model_shaped = channels is not None and arr.ndim == 4 and arr.shape[1] == channels
    if model_shaped and arr.dtype == np.uint8:
        return np.ascontiguousarray(arr)
    if is_float:
        if arr.ndim == 3:
            arr = arr[:, None]
        if arr.ndim != 4 or (arr.shape[1] not in (1, 3) and not model_shaped):
            raise InputError(bad + "float model-space images as NCHW (C = 1 or 3) or NHW")
        if not np.isfinite(arr).all():
            bad_images = int((~np.isfinite(arr.reshape(len(arr), -1))).any(axis=1).sum())
            raise InputError(
                f"{name}: {bad_images} of {len(arr)} images hold nan or inf; expected finite model-space values"
            )
        return np.ascontiguousarray(arr, dtype=np.float32)
    if arr.dtype != np.uint8:
        raise InputError(bad + "uint8 images (NHWC, NCHW or NHW) or float NCHW model-space values")
    if arr.ndim == 2:  # flat rows of C*H*W, e.g. downsampled ImageNet
        n, cols = arr.shape
        for c in (3, 1):
            s = math.isqrt(cols // c)
            if cols % c == 0 and s * s * c == cols and s > 0:
                return arr.reshape(n, c, s, s)
        raise InputError(bad + "rows of 3*S*S or S*S pixels when 2-D")
    if arr.ndim == 3:
        return arr[:, None]
    if arr.ndim == 4:
        if arr.shape[-1] in (1, 3, 4) and arr.shape[1] not in (1, 3):
            arr = arr.transpose(0, 3, 1, 2)
        if arr.shape[1] == 4:
            arr = arr[:, :3]  # drop alpha
        if arr.shape[1] in (1, 3):
            return np.ascontiguousarray(arr)
    raise InputError(bad + "uint8 images as NHWC, NCHW (C = 1, 3 or 4) or NHW")


def _describe(images: np.ndarray) -> str:
    kind = "uint8" if images.dtype == np.uint8 else "float"
    return f"{tuple(images.shape[1:])} ({kind})"


# --------------------------------------------------------------------------- conversion


def _numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor, without importing torch here
        x = x.detach().cpu().float().numpy()
    return np.asarray(x)


def to_uint8(x) -> np.ndarray:
    """Model-space floats (tensor or array) -> uint8 by round((clip(x, -1, 1) + 1) * 127.5)."""
    x = np.nan_to_num(_numpy(x).astype(np.float32), nan=0.0)
    v = (np.clip(x, -1.0, 1.0) + 1.0) * 127.5
    return np.clip(np.floor(v + 0.5), 0, 255).astype(np.uint8)  # round half up, like save_image


def make_grid(images_uint8_nchw: np.ndarray, nrow: int | None = None, padding: int = 2, scale: int = 1) -> np.ndarray:
    """Tile NCHW uint8 images into one HWC grid, `nrow` images per row, black padding."""
    imgs = np.asarray(images_uint8_nchw)
    n, c, h, w = imgs.shape
    if n == 0:
        raise ValueError("make_grid needs at least one image")
    if scale > 1:
        imgs = imgs.repeat(scale, axis=2).repeat(scale, axis=3)
        h, w = h * scale, w * scale
    ncol = nrow or math.ceil(math.sqrt(n))
    nrows = math.ceil(n / ncol)
    grid = np.zeros((nrows * (h + padding) + padding, ncol * (w + padding) + padding, c), np.uint8)
    for i in range(n):
        y, x = padding + (i // ncol) * (h + padding), padding + (i % ncol) * (w + padding)
        grid[y : y + h, x : x + w] = imgs[i].transpose(1, 2, 0)
    return grid


# --------------------------------------------------------------------------- writing


def strict_json(obj) -> str:
    """`obj` as strict JSON: NaN and inf, which JSON cannot hold, become null."""
    return json.dumps(_finite(obj))


def _finite(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def check_output(out: str, stdout_is_tty: bool | None = None) -> None:
    """Refuse an `--out` that cannot be written, before any work is done: an unknown form, a
    folder form naming a file, a location under a file or not writable, or raw array bytes to
    a terminal. (An existing folder is the folder form, with or without the trailing /.)"""
    out = str(out)
    if not out.strip():  # e.g. `--out "$OUT"` with OUT unset: not the current folder
        raise InputError(f"--out {out!r} is empty; expected {_OUT_FORMS}")
    if out == "-":
        if sys.stdout is None and stdout_is_tty is None:  # `... --out - >&-`
            raise InputError("--out -: stdout is closed; give a file, or pipe stdout into a command")
        if stdout_is_tty if stdout_is_tty is not None else sys.stdout.isatty():
            raise InputError(
                "--out -: stdout is a terminal; pipe it into a command (e.g. `| tarflow score ... -`) or give a file"
            )
        return
    path = Path(out)
    folder_form = out.endswith(("/", "\\")) or path.is_dir()
    if not folder_form and path.suffix.lower() not in (".png", ".npz", ".npy"):
        raise InputError(f"--out {out}: expected {_OUT_FORMS}")
    if folder_form and path.exists() and not path.is_dir():
        raise InputError(f"--out {out}: {path} is a file, not a folder")
    existing = path if folder_form else path.parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise InputError(f"--out {out}: {existing} is a file, so nothing can be written under it")
    try:  # the one sure test: create a file there (access() says yes to root everywhere)
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise InputError(f"--out {out}: cannot write in {existing} ({e.strerror or e})") from None


def write_output(x, out: str, labels=None, metadata: dict | None = None, stdout: BinaryIO | None = None) -> str | None:
    """Write model-space NCHW images to `out` (.png grid, folder/, .npz, .npy or -)."""
    try:
        return _write_output(x, out, labels, metadata, stdout)
    except BrokenPipeError:
        raise
    except OSError as e:
        raise WriteError(
            f"could not write --out {out}: {e.strerror or e}"
            f"{f' ({e.filename})' if getattr(e, 'filename', None) else ''}"
        ) from None


def _write_output(x, out: str, labels, metadata: dict | None, stdout: BinaryIO | None) -> str | None:
    x = _numpy(x)
    if x.ndim != 4:
        raise ValueError(f"write_output expects NCHW images, got shape {x.shape}")
    out = str(out)
    if out == "-":
        buf = io.BytesIO()
        np.save(buf, x.astype(np.float32))
        stream = stdout if stdout is not None else sys.stdout.buffer
        _write_all(stream, buf.getvalue())
        stream.flush()
        return None
    if out.endswith(("/", "\\")) or Path(out).is_dir():
        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        for i, img in enumerate(to_uint8(x)):
            _save_png(img.transpose(1, 2, 0), folder / f"{i:06d}.png", metadata)
        # numbered PNGs past the ones just written are left from an earlier, longer run: anything that
        # reads the folder (score, an FID tool) would take them too, so say so
        older = sum(1 for f in folder.glob("*.png") if f.stem.isdigit() and len(f.stem) == 6 and int(f.stem) >= len(x))
        note = (
            f" (note: {older} older numbered PNG{'s' if older != 1 else ''} from an earlier run remain there)"
            if older
            else ""
        )
        return f"{len(x)} PNG files in {folder}/{note}"
    suffix = Path(out).suffix.lower()
    if suffix == ".png":
        n, _, _, w = x.shape
        ncol = math.ceil(math.sqrt(n)) if n else 1
        scale = max(1, math.ceil(256 / (ncol * w)))
        _save_png(make_grid(to_uint8(x), scale=scale), Path(out), metadata)
        return out
    if suffix == ".npz":
        arrays = {"arr_0": to_uint8(x).transpose(0, 2, 3, 1)}
        if labels is not None:
            arrays["labels"] = _numpy(labels).astype(np.int64)
        if metadata is not None:
            arrays[NPZ_META_KEY] = np.array(json.dumps(metadata, default=str))
        with atomic_path(out) as tmp, open(tmp, "wb") as f:
            np.savez(f, **arrays)
        return out
    if suffix == ".npy":
        with atomic_path(out) as tmp, open(tmp, "wb") as f:
            np.save(f, x.astype(np.float32))
        return out
    raise InputError(f"--out {out}: expected {_OUT_FORMS}")


def _write_all(stream: BinaryIO, data: bytes) -> None:
    """Write every byte: with PYTHONUNBUFFERED=1 (common in containers) sys.stdout.buffer is the raw
    file, whose write() may take only part of the data (a disk filling up, a signal) and say so in its
    return value, which a single call would ignore, leaving a truncated array and exit 0."""
    view = memoryview(data)
    while len(view):
        n = stream.write(view)
        view = view[len(view) if n is None else n :]  # None: a stream that took everything


def _save_png(hwc: np.ndarray, path: Path, metadata: dict | None) -> None:
    img = Image.fromarray(hwc[..., 0], "L") if hwc.shape[-1] == 1 else Image.fromarray(hwc, "RGB")
    info = PngInfo()
    if metadata is not None:
        info.add_text(PNG_META_KEY, json.dumps(metadata, default=str))
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG", pnginfo=info)


def read_png_metadata(path) -> dict | None:
    """The JSON metadata `write_output` stored in a PNG's `tarflow` text chunk, or None."""
    try:
        with Image.open(path) as img:
            text = getattr(img, "text", {}).get(PNG_META_KEY)
    except Exception as e:
        raise InputError(f"could not read image {path}: {e}") from None
    return json.loads(text) if text is not None else None
