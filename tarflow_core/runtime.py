"""The CPU threads torch computes with, and the environment a run's bit-exactness depends on.

The number of intra-op threads sets the order of floating-point reductions (matrix products, sums),
so two thread counts give results that differ in the last bits, and those differences grow over a
training run. The count is therefore a setting (`--threads`, recorded with the run and reused by
`--resume`), chosen without looking at the machine's load: the same command and seed give the same
numbers whatever else the machine is doing. A busy machine is told about, never acted on.

Used by the trainer and by the commands; no user interface here (the callers word and show it).
"""

from __future__ import annotations

import contextlib
import os
import platform
from collections.abc import Iterator
from typing import Any

import torch

# The environment entries a comparison names, in this order, with their labels in messages.
ENVIRONMENT_LABELS = {
    "torch": "torch",
    "device_type": "device",
    "device_name": "device name",
    "threads": "threads",
    "precision": "precision",
    "deterministic": "deterministic algorithms",
}


def threads_problem(threads: Any, flag: str = "--threads") -> str | None:
    """What is wrong with a thread count given by the user, or None."""
    if threads is None:
        return None
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        return f"{flag} must be a positive integer (got {threads})"
    return None


def use_threads(threads: int | None) -> int:
    """Compute with `threads` intra-op threads; None keeps torch's own count (its default for the
    machine, or OMP_NUM_THREADS; under torchrun the launcher's). The count now in use."""
    if threads is not None and threads != torch.get_num_threads():
        torch.set_num_threads(threads)
    return torch.get_num_threads()


@contextlib.contextmanager
def threads_for(threads: int | None) -> Iterator[int]:
    """`use_threads` for a block; the caller's count afterwards (a library call leaves the process as
    it found it)."""
    before = torch.get_num_threads()
    try:
        yield use_threads(threads)
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the system has one)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def busy_note(threads: int, device_type: str = "cpu") -> str | None:
    """One sentence when the machine is busy and several threads compute on the CPU: each parallel
    operator then waits for its threads to be scheduled, so one thread can be much faster (measured:
    45 against 341 images/s on 2 shared cores). Telling it, not switching, keeps the numbers fixed."""
    if device_type != "cpu" or threads <= 1:
        return None
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # no load average on this system
        return None
    cores = available_cores()
    if load <= cores - 0.5:
        return None
    return (
        f"the machine is busy (load average {load:.1f} on {cores} core(s)) and torch computes with {threads} "
        f"threads: --threads 1 may be much faster here (its results differ slightly from {threads} threads')"
    )


def device_name(device: torch.device) -> str:
    """The accelerator's or the CPU's model name ("" when unknown)."""
    if device.type == "cuda":
        with contextlib.suppress(RuntimeError, AssertionError):
            return torch.cuda.get_device_name(device)
        return ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device, threads: int, precision: str) -> dict[str, Any]:
    """What bit-exact repetition depends on beside the settings and the seed."""
    return {
        "torch": torch.__version__,
        "device_type": device.type,
        "device_name": device_name(device),
        "threads": threads,
        "precision": precision,
        "deterministic": torch.are_deterministic_algorithms_enabled(),
    }


def environment_changes(saved: Any, now: dict[str, Any], skip: tuple[str, ...] = ()) -> list[str]:
    """The entries of `now` that differ from a recorded environment, as `threads 2 -> 1`. Nothing
    for a record that is missing or unreadable (runs of older versions) or entries it lacks."""
    if not isinstance(saved, dict):
        return []
    return [
        f"{label} {saved[k]} -> {now[k]}"
        for k, label in ENVIRONMENT_LABELS.items()
        if k not in skip and k in saved and k in now and saved[k] != now[k]
    ]


def use_tf32(device: torch.device) -> bool:
    """Let float32 matrix products and convolutions on CUDA run on TF32 tensor cores (about 5x the
    float32 rate on an H100; 10-bit mantissa products, float32 accumulation). True when it applies.
    The FID network turns it off for itself: the standard FID tools compute its features in full
    float32. Nothing changes off CUDA, so CPU results stay bit-exact."""
    if device.type != "cuda":
        return False
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return True


def tf32_in_use(device: torch.device) -> bool:
    """Whether float32 matrix products on `device` run on TF32 now (as `use_tf32` sets; recorded with
    the results, which it changes: TF32 rounds the products' inputs to 10 mantissa bits)."""
    return device.type == "cuda" and bool(torch.backends.cuda.matmul.allow_tf32)


@contextlib.contextmanager
def tf32_restored(allow: bool | None = None) -> Iterator[None]:
    """The caller's TF32 settings (matrix products and cuDNN convolutions) back afterwards; `allow`
    True or False sets both for the block (None leaves them to what runs inside, e.g. `use_tf32`)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    if allow is not None:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = allow
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
