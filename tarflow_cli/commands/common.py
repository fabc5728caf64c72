"""Helpers the commands share: device, checkpoint, input images, labels, batches, output notes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import typer

from tarflow_core.checkpoint import CheckpointInfo, load_checkpoint
from tarflow_core.dist import DistError
from tarflow_core.dist import resolve_device as resolve_torch_device
from tarflow_core.model import TarFlow
from tarflow_core.runtime import busy_note, use_tf32, use_threads

from ..console import UsageError, info, to_stdout
from ..io import Inputs, read_labels


def resolve_device(spec: str, threads: int | None = None) -> torch.device:
    """`auto` picks CUDA, then MPS, then CPU; an explicit device must exist. Torch computes with
    `threads` CPU threads (None: its own count); on a busy machine one line says that fewer may be
    faster, without changing the count (results depend on it)."""
    device = _resolve_device(spec)
    count = use_threads(threads)
    note = busy_note(count, device.type)
    if note:
        info(f"note: {note}")
    return device


def check_device_spelling(spec: str) -> None:
    """For commands that put nothing on a device (info): a misspelt --device is still an error,
    but an absent CUDA or MPS is not."""
    text = spec.strip().lower()
    if text == "auto":
        return
    try:
        kind = torch.device(text).type
    except RuntimeError:
        kind = None
    if kind not in ("cpu", "cuda", "mps"):
        raise UsageError(f"--device {spec}: expected auto, cpu, cuda, cuda:N or mps")


def _resolve_device(spec: str) -> torch.device:
    spec = spec.strip().lower()
    if (
        spec == "auto"
        and not torch.cuda.is_available()
        and getattr(torch.backends, "mps", None)
        and torch.backends.mps.is_available()
    ):
        return torch.device("mps")
    try:
        return resolve_torch_device(spec)
    except DistError as e:
        raise UsageError(str(e)) from None


def load(ckpt: str, device: torch.device, patch_size: int | None) -> tuple[TarFlow, CheckpointInfo]:
    """The model of --ckpt on `device`, for inference: float32 products on CUDA then run on TF32
    (`use_tf32`; the commands record it), except in the FID network, which keeps float32."""
    if patch_size is not None and patch_size < 1:
        raise UsageError(f"--patch-size {patch_size}: expected a positive integer")
    loaded = load_checkpoint(ckpt, device, patch_size=patch_size)
    use_tf32(device)
    return loaded


def check_model_inputs(data, cfg, inputs: list[str], verb: str = "scored") -> None:
    """Images read for `score`/`denoise` must have the model's shape (they are used as they are);
    float ones far outside model space (0..255 pixels saved as floats) get a warning."""
    shape, want = tuple(data.images.shape[1:]), (cfg.in_channels, cfg.img_size, cfg.img_size)
    if shape != want:
        raise UsageError(
            f"{', '.join(inputs)}: images are {'x'.join(map(str, shape))} (CxHxW) but the model expects "
            f"{'x'.join(map(str, want))} "
            f"(images are {verb} as they are, not resized; `tarflow eval --data` resizes and center-crops)"
        )
    if data.is_uint8 or not len(data.images):
        return
    lo, hi = float(data.images.min()), float(data.images.max())
    if max(abs(lo), abs(hi)) > 4:  # samples stray a little past [-1, 1]; pixels do not
        info(
            f"warning: {', '.join(map(str, inputs))} holds float values from {lo:g} to {hi:g}, but float inputs are "
            "taken as model-space values in [-1, 1]; 8-bit pixels belong in a uint8 array (or PNG files)"
        )


def resolve_labels(
    info: CheckpointInfo,
    num: int | None,
    *,
    class_: int | None,
    labels_path: Path | None,
    from_inputs: np.ndarray | None = None,
    inputs_name: str = "the inputs",
) -> torch.Tensor | None:
    """Labels for `num` images from --class, --labels or the inputs (named `inputs_name` in
    messages); validated against the model. `num` None: as many as the labels file holds."""
    k = info.config.num_classes
    if class_ is not None and labels_path is not None:
        raise UsageError("--class and --labels cannot be used together")
    if (class_ is not None or labels_path is not None) and k == 0:
        opt = "--class" if class_ is not None else "--labels"
        raise UsageError(f"{opt}: checkpoint {info.path} is unconditional; class labels need a class-conditional model")
    if class_ is not None:
        if not 0 <= class_ < k:
            raise UsageError(f"--class {class_}: expected a class in 0..{k - 1}")
        return torch.full((num,), class_, dtype=torch.long)
    if labels_path is not None:
        arr = read_labels(str(labels_path))
        source = f"--labels {labels_path}"
    elif from_inputs is not None and k > 0:
        arr, source = np.asarray(from_inputs, dtype=np.int64), f"the labels stored in {inputs_name}"
    else:
        return None
    if num is not None and len(arr) != num:
        raise UsageError(f"{source}: holds {len(arr)} labels for {num} images")
    bad = arr[(arr < -1) | (arr >= k)]
    if len(bad):
        raise UsageError(f"{source}: label {int(bad[0])} is out of range; expected 0..{k - 1} (or -1 for no class)")
    return torch.as_tensor(arr, dtype=torch.long)


def batches(n: int, size: int):
    for start in range(0, n, size):
        yield start, min(n, start + size)


def announce_output(summary: str, written: str | None, out: str) -> None:
    """Tell what was made (and where, on stderr), then print the --out path on stdout for a script
    to pick up; with `--out -` stdout holds the images themselves."""
    info(summary + (f" -> {written}" if written else ""))
    if out != "-":
        with to_stdout():
            typer.echo(out)


def key_values(settings: dict) -> str:
    """Settings as `key=value` pairs (lists comma-joined), the form `sample -v` prints them in."""
    return " ".join(f"{k}={','.join(map(str, v)) if isinstance(v, (list, tuple)) else v}" for k, v in settings.items())


def per_image(seconds: float) -> str:
    """A time per image that stays readable when tiny: `0.004 s`, `0.25 ms`, not `0.000 s`."""
    if seconds >= 0.001:
        return f"{seconds:.3f} s"
    return f"{seconds * 1e3:.2g} ms" if seconds >= 1e-6 else f"{seconds * 1e6:.2g} µs"


def count(n: int, noun: str) -> str:
    """`1 image`, `2 images`: a number and its noun in agreement."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def skipped_warning(data: Inputs, where: str) -> str | None:
    """The one warning naming the unreadable files `read_inputs` skipped (`where` says how the
    results name the files that were read), or None."""
    if not data.skipped:
        return None
    return (
        f"warning: {count(len(data.skipped), 'unreadable image file')} skipped ({names_shown(data.skipped)}); "
        f"{where}; --strict refuses them"
    )


def names_shown(names: list[str], shown: int = 5) -> str:
    """The first `shown` of `names`, then how many more."""
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")
