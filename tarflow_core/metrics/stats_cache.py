"""Where reference FID statistics computed from a data source are cached."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from .inception import INPUT_SIZE, cache_dir


def data_slug(spec: str) -> str:
    """``digits`` as is; a path as its name plus a hash of its absolute location."""
    if spec == "digits":
        return "digits"
    path = Path(spec).expanduser().resolve()
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", path.name)[:40] or "data"
    return f"{name}-{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"


def default_stats_path(
    spec: str, split: str, channels: int, image_size: int, weights_tag: str, resize: str = "tf", size: int = INPUT_SIZE
) -> Path:
    """``<cache>/fid-stats/<source>-<split>-<C>x<S>-<resize>[<size>]-<weights>.npz``: keyed by
    everything that changes the statistics (data source, split, image shape, preprocessing,
    and the weight file's sha256 prefix or ``random-SEED``)."""
    pre = resize if size == INPUT_SIZE else f"{resize}{size}"
    name = f"{data_slug(spec)}-{split}-{channels}x{image_size}-{pre}-{weights_tag}.npz"
    return cache_dir() / "fid-stats" / name
