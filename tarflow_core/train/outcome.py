"""How a run ends: its result, the two errors a run can raise, and which exception ends it how."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError

from ..config import ConfigError
from ..data import DataError
from ..dist import DistError


class TrainError(RuntimeError):
    """A run that cannot start or go on; `exit_code` 2 for bad usage/input, 1 for run-time failures."""

    exit_code = 1


class SetupError(TrainError):
    """Bad settings, data or run directory, found before training starts."""

    exit_code = 2


@dataclass
class TrainResult:
    status: str  # finished / interrupted / failed
    step: int
    run_dir: Path
    reason: str = ""
    checkpoint: Path | None = None

    @property
    def exit_code(self) -> int:
        return {"finished": 0, "interrupted": 130}.get(self.status, 1)


def classify_failure(e: BaseException, *, started: bool, distributed: bool) -> str:
    """Which way exception `e` ends a run, before (`started` False) or after its first event:

    - "setup": before the start, bad settings or a launch that cannot work (raised as `SetupError`);
    - "raise": before the start, anything else (`SetupError`/`TrainError` included) goes on as it is;
    - "failed": a `TrainError` (the run ends "failed", its message is the reason);
    - "oom": the device (or the host) ran out of memory (a training step: the run ends "failed", its last
      checkpoint kept as it is; a preview or an evaluation: a warning, and the run goes on);
    - "io": the data or the disk failed mid-run (the run ends "failed", saving its progress if it can);
    - "interrupted": a second Ctrl-C aborted a step (the run ends "interrupted", the exception goes on);
    - "peer": another process of a distributed run died or hung (the run ends "failed", no traceback);
    - "crash": anything else, a bug (the run ends "failed" and the exception goes on).
    """
    if not started:
        return "setup" if isinstance(e, (ConfigError, DistError)) else "raise"
    if isinstance(e, TrainError):
        return "failed"
    if isinstance(e, (torch.OutOfMemoryError, MemoryError)) or (
        isinstance(e, RuntimeError) and re.search(r"out of memory|can't allocate memory", str(e), re.I)
    ):
        return "oom"
    if isinstance(e, (DataError, OSError, SafetensorError)):
        return "io"
    if isinstance(e, KeyboardInterrupt):
        return "interrupted"
    if isinstance(e, RuntimeError) and distributed and _is_peer_failure(e):
        return "peer"
    return "crash"


def _is_peer_failure(e: RuntimeError) -> bool:
    """A collective that failed because another rank died or hung (gloo/NCCL), not a bug here."""
    import torch.distributed as tdist

    if isinstance(e, getattr(tdist, "DistError", ())):
        return True
    return re.search(r"gloo|nccl|connection (reset|closed|refused)|peer|timed out", str(e), re.I) is not None


def peer_failure_reason(e: BaseException, step: int, last_checkpoint: Path | None) -> str:
    first = re.sub(r"^\[[^]]*\] ", "", (str(e).strip().splitlines() or [""])[0])  # gloo's source location
    first = first.split(". ")[0][:160]
    kept = f"the last checkpoint ({last_checkpoint.name}) is kept" if last_checkpoint else "no checkpoint was saved"
    return f"another process of the distributed run failed or lost its connection at step {step} ({first}); {kept}"


def out_of_memory_reason(
    step: int,
    device,
    measured: tuple[int, int | None],
    planned: int | None,
    micro_batch: int,
    checkpointing: str,
    last_checkpoint: Path | None,
) -> str:
    """The one sentence a run that ran out of memory in a training step ends with: the measured peak
    (bytes, and the device's total when known), the plan's figure, the setting to change, the checkpoint."""
    peak, total = measured
    seen = f"measured peak {_size(peak)}" + (f" of {_size(total)}" if total else "") + f" on {device}"
    plan = f", the plan's figure {_size(planned)}" if planned is not None else ", no plan figure for this device"
    remedy = f"lower --micro-batch (now {micro_batch})"
    if checkpointing == "off":
        remedy += " or use --checkpointing blocks"
    kept = f"the last checkpoint ({last_checkpoint.name}) is intact" if last_checkpoint else "no checkpoint was saved"
    return f"out of memory in training step {step + 1} ({seen}{plan}): {remedy}; {kept}"


def _size(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"
