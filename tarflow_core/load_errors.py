"""Why a file could not be loaded, in a few words.

NumPy's and torch's own messages for a file that is not what it claims run to paragraphs and
suggest loading it unsafely ("If you trust the file ... allow_pickle=", "Re-running torch.load
with weights_only set to False ..."), which is the wrong advice for a user of this tool.
"""

from __future__ import annotations


def describe(exc: BaseException) -> str:
    """A short reason for a failed `np.load` / `torch.load` (without the unsafe-loading advice)."""
    if isinstance(exc, OSError) and exc.strerror:  # e.g. "No such file or directory"
        return exc.strerror
    text = str(exc).strip()
    lowered = text.lower()
    if "pickle" in lowered or "weights_only" in lowered or "unsupported operand" in lowered:
        return "not a plain array or tensor file (reading it would mean unpickling Python objects)"
    first = text.splitlines()[0].split(". ")[0].rstrip(".") if text else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


NUMPY_MAGIC = (b"\x93NUMPY", b"PK")  # .npy, and .npz (a zip archive)
TORCH_MAGIC = (b"PK", b"\x80")  # torch.save: a zip archive, or a bare pickle before torch 1.6


def not_numpy(head: bytes | None) -> str | None:
    """Why bytes starting with `head` cannot be a .npy/.npz file, or None when they might be
    (or `head` is None: unknown)."""
    return _wrong_header(head, NUMPY_MAGIC, "not a .npy/.npz file (it has neither the NumPy nor the zip header)")


def not_torch(head: bytes | None) -> str | None:
    """Why bytes starting with `head` cannot be a torch.save file, or None when they might be
    (or `head` is None: unknown)."""
    return _wrong_header(head, TORCH_MAGIC, "not a PyTorch file (neither a torch.save zip archive nor a pickle)")


def _wrong_header(head: bytes | None, magics: tuple[bytes, ...], otherwise: str) -> str | None:
    if head is None or head.startswith(magics):
        return None
    return "the file is empty" if not head else otherwise


def file_head(path, size: int = 6) -> bytes | None:
    """The first bytes of a file; None when it cannot be read (the load itself then says why)."""
    try:
        with open(path, "rb") as f:
            return f.read(size)
    except OSError:
        return None
