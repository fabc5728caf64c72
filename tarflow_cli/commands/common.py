"""Options and helpers shared by the commands: checkpoint, device, seed, labels."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import torch
import typer

from tarflow_core.checkpoint import CheckpointInfo, load_checkpoint
from tarflow_core.model import TarFlow

from ..console import UsageError
from ..io import read_labels

CkptOpt = Annotated[str, typer.Option("--ckpt", "-c", help="Run directory (its latest checkpoint), native checkpoint directory, or reference .pth file.", envvar="TARFLOW_CKPT", show_default=False)]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps.")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Random seed: same seed and options give the same output.")]
PatchOpt = Annotated[Optional[int], typer.Option("--patch-size", help="Patch size of a reference .pth whose file name does not give it.", show_default=False)]
ClassOpt = Annotated[Optional[int], typer.Option("--class", help="Use class K for every image (class-conditional models).", show_default=False)]
LabelsOpt = Annotated[Optional[Path], typer.Option("--labels", help="Per-image class labels: a .npy of integers.", show_default=False)]
BatchOpt = Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Images per batch.")]


def resolve_device(spec: str) -> torch.device:
    """`auto` picks CUDA, then MPS, then CPU; an explicit device must exist."""
    device = _resolve_device(spec)
    if device.type == "cpu":
        limit_cpu_threads_when_busy()
    return device


def limit_cpu_threads_when_busy() -> None:
    """On a CPU already busy with other work, several intra-op threads wait on each other at every
    small operator (measured: 80x slower token-by-token sampling on 2 shared cores); use one."""
    if "OMP_NUM_THREADS" in os.environ or torch.get_num_threads() <= 1:
        return
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return
    if load > (os.cpu_count() or 1) - 0.5:
        torch.set_num_threads(1)


def _resolve_device(spec: str) -> torch.device:
    spec = spec.strip().lower()
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise UsageError(f"--device {spec}: expected auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {spec}: CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) are present")
    elif device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UsageError(f"--device {spec}: MPS is not available on this machine")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"--device {spec}: expected auto, cpu, cuda, cuda:N or mps")
    return device


def load(ckpt: str, device: torch.device, patch_size: int | None) -> tuple[TarFlow, CheckpointInfo]:
    if patch_size is not None and patch_size < 1:
        raise UsageError(f"--patch-size {patch_size}: expected a positive integer")
    return load_checkpoint(ckpt, device, patch_size=patch_size)


def resolve_labels(info: CheckpointInfo, num: int, *, class_: int | None, labels_path: Path | None,
                   from_inputs: np.ndarray | None = None) -> torch.Tensor | None:
    """Labels for `num` images from --class, --labels or the inputs; validated against the model."""
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
        arr, source = np.asarray(from_inputs, dtype=np.int64), "the labels stored with the inputs"
    else:
        return None
    if len(arr) != num:
        raise UsageError(f"{source}: holds {len(arr)} labels for {num} images")
    bad = arr[(arr < -1) | (arr >= k)]
    if len(bad):
        raise UsageError(f"{source}: label {int(bad[0])} is out of range; expected 0..{k - 1} (or -1 for no class)")
    return torch.as_tensor(arr, dtype=torch.long)


def batches(n: int, size: int):
    for start in range(0, n, size):
        yield start, min(n, start + size)
